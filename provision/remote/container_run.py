# Runs on the managed host as root (stdlib python3, after lib_envfile): a container app's release
# runs its image. Kept in each release's own directory as container-run.py (root's), with its
# settings in container.json beside it (engine, name, user, port, slot_ports, slot_containers,
# process_containers, graceful_timeout, env_files, run_dir, repo, init); the image is the release's:
# <repo>:<release id>, the id the name of the release holding it.
#
#   container-run.py serve SLOT      the slot's service (its unit's ExecStart): becomes `<engine> run`
#                                    of the image, its port published on 127.0.0.1:<the slot's port>
#   container-run.py once [-t] [--name NAME] -- CMD..
#                                    CMD (all that follows `--`, never an option here) in a one-off
#                                    container of the image (the release command, fab run, a process's
#                                    or timer's unit, NAME its container: only ever a process's, never a
#                                    slot's; a one-off's <process_containers><pid>); exits with CMD's
#                                    status. TERM or HUP stops the container (`<engine> stop`).
#
# The app's environment (the release's app.env, the secrets, shared/.env: later ones win) reaches the
# engine as an --env-file that only root can read, written fresh at each start (never a command line:
# `ps` shows those). Every container runs as the app's user of the host (its uid:gid, whatever the
# image's USER says: a container escape lands on that unprivileged user, never on root), with no
# capabilities and no new privileges.
import json
import os
import pwd
import re
import signal
import subprocess
import sys

own = os.path.dirname(os.path.abspath(sys.argv[0]))
c = json.load(open(os.path.join(own, "container.json")))
release = os.path.basename(os.path.dirname(os.path.realpath(own)))
image = "%s:%s" % (c["repo"], release)
engine = "/usr/bin/" + c["engine"]
# No proxy reaches a container from the engine: podman's `run` copies its own environment's *_proxy
# variables in (the deploy's and logins' hold app.proxy, its password too) unless --http-proxy=false;
# docker's client, the proxies of its config.json (root's ~/.docker/config.json: never provision's,
# an admin's may have some): it gets a config directory that does not exist, its defaults (podman
# would look for credentials there, and fail).
for key in [k for k in os.environ if k.lower().endswith("_proxy") or k == "DOCKER_CONFIG"]:
    del os.environ[key]
if c["engine"] == "docker":
    os.environ["DOCKER_CONFIG"] = os.path.join(own, "no-docker-config")


def environment():
    """The app's variables, later files winning; a file that is not root's (or a link) counts as none."""
    out = {}
    plain = os.path.join(own, c["env_files"][0])
    try:
        fd = os.open(plain, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as fh:
            if os.fstat(fh.fileno()).st_uid == 0:
                out.update(env_parse(fh.read()))
    except OSError:
        pass
    out.update(env_read(c["env_files"][1]))
    out.update(env_read(c["env_files"][2], group_may_read=True))
    return out


def env_file(path):
    """The app's environment as the engine reads an --env-file (KEY=VALUE, the value as it is), root's alone."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = path + ".provision-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    env = environment()
    env.update(home(env))
    with os.fdopen(fd, "w") as fh:
        fh.write("".join("%s=%s\n" % (k, v) for k, v in sorted(env.items())))
    os.replace(tmp, path)
    return path


def app_user():
    """The app user's uid:gid on this host (the deploy makes the user), for --user."""
    try:
        pw = pwd.getpwnam(c["user"])
    except KeyError:
        sys.exit("container-run.py: no user %s on this host (the deploy makes it); deploy again" % c["user"])
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        sys.exit("container-run.py: user %s is root's (uid or gid 0): no container of the app runs as root" % c["user"])
    return "%d:%d" % (pw.pw_uid, pw.pw_gid)


def home(env):
    """A HOME the app user can write when neither the app's environment nor the image sets one (the
    engine's default, /, is root's): /tmp."""
    if "HOME" in env:
        return {}
    res = subprocess.run([engine, "image", "inspect", "--format", "{{json .Config.Env}}", image],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
    try:
        declared = (json.loads(res.stdout) or []) if res.returncode == 0 else []
    except ValueError:  # none readable: the image's own HOME, if any, is not known
        declared = []
    return {} if any(v.startswith("HOME=") for v in declared) else {"HOME": "/tmp"}


# --init: an init process (docker's tini, podman's catatonit) passes the engine's stop signal on to the app
HARDENING = ["--user", app_user(), "--cap-drop=ALL", "--security-opt=no-new-privileges"] + (
    ["--init"] if c.get("init") else []) + (["--http-proxy=false"] if c["engine"] == "podman" else []) + [
    "--cgroup-parent=" + c["slice"]]

# the app's own network (releases made before it existed: the engine's default one)
NETWORK = ["--network", c["network"]] if c.get("network") else []

USAGE = "usage: container-run.py serve SLOT | once [-t] [--name %sPROCESS] -- CMD [ARGS]" % c["process_containers"]
PROCESS_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")  # a process's or timer's (provision/processes.py)
if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
    slot = sys.argv[2]
    name = c["slot_containers"][slot]
    envs = env_file(os.path.join(c["run_dir"], "%s.env" % slot))
    # one left by an instance killed outright would hold the name
    subprocess.run([engine, "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.execv(engine, [engine, "run", "--rm", "--name", name, "--env-file", envs, "--label", "provision.app=" + c["name"],
                      "-p", "127.0.0.1:%d:%d" % (c["slot_ports"][slot], c["port"])] + NETWORK + HARDENING + [image])
elif sys.argv[1:2] == ["once"] and "--" in sys.argv[2:-1]:
    # its own options end at the first `--`: whatever follows is the command's, never read here
    end = sys.argv.index("--", 2)
    options, args = sys.argv[2:end], sys.argv[end + 1:]
    tty = options[:1] == ["-t"]
    options = options[1:] if tty else options
    prefix = c["process_containers"]
    if options and not (len(options) == 2 and options[0] == "--name" and options[1].startswith(prefix)
                        and PROCESS_NAME.fullmatch(options[1][len(prefix):])):
        sys.exit(USAGE)
    if options:  # a process's container (its unit's): one left by a killed one removed first
        name = options[1]
        subprocess.run([engine, "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:  # a one-off's, after this program's pid: never a process's (theirs start with a letter)
        name = prefix + str(os.getpid())
    stopping = []  # TERM (its unit stopped) or HUP (fab run's connection gone): its container is stopped
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.append(True))
    envs = env_file(os.path.join(c["run_dir"], "once-%d.env" % os.getpid()))
    rc, stopped = 143, False
    try:
        client = None if stopping else subprocess.Popen([engine, "run", "--rm", "-i"] + (["-t"] if tty else []) + [
            "--name", name, "--env-file", envs, "--label", "provision.app=" + c["name"]] + NETWORK + HARDENING + [image] + args)
        while client:
            try:
                rc = client.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                # the engine's client ends with its container: graceful_timeout for it, then KILL (tried
                # again while the container does not exist yet)
                if stopping and not stopped:
                    stopped = subprocess.run([engine, "stop", "--time", str(c["graceful_timeout"]), name],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    finally:
        os.unlink(envs)  # whatever happened
        if stopping or rc < 0:
            # its client gone first (killed, or a hangup with a TTY: the client passes no signal on then)
            # while the container may still run: removed, never left running without anyone to stop it
            subprocess.run([engine, "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sys.exit(rc if rc >= 0 else 128 - rc)
else:
    sys.exit(USAGE)
