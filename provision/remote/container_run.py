# Runs on the managed host as root (stdlib python3, after lib_envfile): a container app's release
# runs its image. Kept in each release's own directory as container-run.py (root's), with its
# settings in container.json beside it (engine, name, port, slot_ports, env_files, run_dir, repo,
# init); the image is the release's: <repo>:<release id>, the id the name of the release holding it.
#
#   container-run.py serve SLOT      the slot's service (its unit's ExecStart): becomes `<engine> run`
#                                    of the image, its port published on 127.0.0.1:<the slot's port>
#   container-run.py once [-t] [--name NAME] CMD..
#                                    CMD in a one-off container of the image (the release command, fab
#                                    run, a process's or timer's unit, NAME its container); exits with
#                                    CMD's status
#
# The app's environment (the release's app.env, the secrets, shared/.env: later ones win) reaches the
# engine as an --env-file that only root can read, written fresh at each start (never a command line:
# `ps` shows those). The container gets no capabilities and no new privileges.
import json
import os
import signal
import subprocess
import sys

own = os.path.dirname(os.path.abspath(sys.argv[0]))
c = json.load(open(os.path.join(own, "container.json")))
release = os.path.basename(os.path.dirname(os.path.realpath(own)))
image = "%s:%s" % (c["repo"], release)
engine = "/usr/bin/" + c["engine"]


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
    with os.fdopen(fd, "w") as fh:
        fh.write("".join("%s=%s\n" % (k, v) for k, v in sorted(environment().items())))
    os.replace(tmp, path)
    return path


# --init: an init process (docker's tini, podman's catatonit) passes the engine's stop signal on to the app
HARDENING = ["--cap-drop=ALL", "--security-opt=no-new-privileges"] + (["--init"] if c.get("init") else [])
# the app's own network (releases made before it existed: the engine's default one)
NETWORK = ["--network", c["network"]] if c.get("network") else []

if sys.argv[1] == "serve":
    slot = sys.argv[2]
    name = "%s-%s" % (c["name"], slot)
    envs = env_file(os.path.join(c["run_dir"], "%s.env" % slot))
    # one left by an instance killed outright would hold the name
    subprocess.run([engine, "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.execv(engine, [engine, "run", "--rm", "--name", name, "--env-file", envs, "--label", "provision.app=" + c["name"],
                      "-p", "127.0.0.1:%d:%d" % (c["slot_ports"][slot], c["port"])] + NETWORK + HARDENING + [image])
elif sys.argv[1] == "once":
    args = sys.argv[2:]
    tty = args[:1] == ["-t"]
    args = args[1:] if tty else args
    named = []  # a process's container (its unit's): named, one left by a killed one removed first
    if args[:1] == ["--name"]:
        named, args = ["--name", args[1]], args[2:]
        subprocess.run([engine, "rm", "-f", named[1]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the env file goes all the same
    envs = env_file(os.path.join(c["run_dir"], "once-%d.env" % os.getpid()))
    try:
        rc = subprocess.run([engine, "run", "--rm", "-i"] + (["-t"] if tty else []) + named + [
            "--env-file", envs, "--label", "provision.app=" + c["name"]] + NETWORK + HARDENING + [image] + args).returncode
    finally:
        os.unlink(envs)
    sys.exit(rc)
else:
    sys.exit("usage: container-run.py serve SLOT | once [-t] CMD [ARGS]")
