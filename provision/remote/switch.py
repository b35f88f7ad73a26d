# Runs on the managed host as root (stdlib python3, after lib_http and lib_nginx): moves traffic
# to a release without dropping a request. argv[1] is JSON (built by switch_command in
# provision/remote/__init__.py, every path from the layout): app, release, action, by,
# daemon_reload, release_dir, release_own_dir (its name inside a release), venv (the release's
# link), current, current_target, release_log, upstream_file, site_enabled, socket_unit_file,
# wants, sockets_wants (boot link dirs), nginx_pid, nginx (host:port of nginx), tmp (the suffix
# of a path being written), health {path, host, timeout, header (the one the site names the
# socket that answered in, or null)}, new {slot, unit, unit_file, socket, slot_link,
# slot_target, upstream (the upstream file's content)}, old ({slot, unit} or null), stage
# (below), log (more for the release log's lines: where the release came from).
#
#  1. point the new slot's link at the release, install the release's unit as the slot's unit
#     and (re)start it on its own socket (made by systemd: <unit>.socket);
#  2. health gate: the new instance must answer the health path on its socket, or
#     it is stopped, its log tail printed, and nothing else changes;
#  3. write the nginx upstream to the new socket, `nginx -t`, reload, and wait for
#     the old nginx workers to finish their requests; then, when the site says which socket
#     answered, prove that nginx answers from the new one (or put the upstream back);
#  4. switch `current`, record the release log, then stop the old instance gracefully
#     (gunicorn finishes in-flight requests on TERM).
# The stage (a fleet deploys as one transaction, see provision/cli/apply.py):
#  "all": 1-4; "prepare": 1-2 only (traffic, `current`, the log and the boot links untouched);
#  "commit": 1-4, but an idle slot that already runs the release with its own unit and answers
#  (prepared) is not restarted, only gated again, and the old instance keeps running (stopped once
#  the whole fleet has switched, or taken back if it has not); "revert": as "commit", but the old
#  instance stops (a host going back to the release its idle slot still runs).
# Every intermediate state serves a complete release. Everything written here is in
# directories only root can write, and written without following symlinks.
import json
import os
import stat
import re
import subprocess
import sys
import time

a = json.loads(sys.argv[1])
release, new, old, health = a["release"], a["new"], a["old"], a["health"]
unit, unit_file, upstream = new["unit"], new["unit_file"], a["upstream_file"]
host = health["host"] or "localhost"


def run(*cmd, check=True):
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if check and res.returncode != 0:
        fail("`%s` failed (exit %d): %s" % (" ".join(cmd), res.returncode, res.stdout.strip()))
    return res


STARTED = time.time()


EXCEPTION = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure))(: .*)?$")


def log_excerpt(limit=40):
    """The exception that stopped the new instance (the last line of its first traceback, as
    Python prints it), then its log from the start of that traceback up to that line."""
    lines = run("journalctl", "-u", unit, "--since", "@%d" % int(STARTED - 1), "--no-pager", "-o", "cat",
                check=False).stdout.splitlines()
    at = next((i for i, l in enumerate(lines) if EXCEPTION.match(l)), None)
    if at is None:
        return "\n".join("  " + l for l in lines[-limit:])
    start = max(0, at + 1 - limit)
    start = next((i for i in range(at, start - 1, -1) if "Traceback" in lines[i]), start)
    # indented: the app's own lines can never pass for the apply script's report lines
    return "exception: %s\n%s" % (lines[at].strip(), "\n".join("  " + l for l in lines[start:at + 1]))


def fail(message, stop_new=False):
    if stop_new:
        excerpt = log_excerpt()
        run("systemctl", "stop", unit + ".service", unit + ".socket", check=False)
        run("systemctl", "reset-failed", unit + ".service", unit + ".socket", check=False)
        record("refused")
        message += "\n--- %s's log ---\n%s" % (unit, excerpt)
    sys.stderr.write(message + "\n")
    sys.exit(1)


def link(path, target):
    tmp = path + a["tmp"]
    if os.path.lexists(tmp):
        os.unlink(tmp)  # never follows: removes a link itself
    os.symlink(target, tmp)
    os.replace(tmp, path)


def write(path, text, mode=0o644):
    """Atomically, through a fresh temporary file (O_EXCL|O_NOFOLLOW: never through a link)."""
    tmp = path + a["tmp"]
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read(path):
    """A regular file's text, or None (a link, a FIFO the app may have left in an older, app-owned
    release: opened without waiting for a writer, never read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        return fh.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def record(action):
    """A line in the release log: what went live (deploy, rollback) or was refused, by whom, when."""
    log_release(a["release_log"], release, action, a["by"], **dict(a.get("log") or {}, slot=new["slot"]))


def shown(properties):
    return dict(l.split("=", 1) for l in run("systemctl", "show", "-p", properties, unit + ".service",
                                            check=False).stdout.split())


def exited():
    """Why the new instance is not starting any more (it exited or systemd restarts it), or None."""
    state = shown("ActiveState,SubState,NRestarts,Job")
    if state.get("SubState") == "auto-restart" or int(state.get("NRestarts") or 0) > 0:
        return "%s exited (it is %s)" % (unit, state.get("SubState"))
    # its start job not run yet (`start --no-block` returns once the job is queued, maybe behind another:
    # a docker restart, a busy host): still "inactive", not exited. A job that failed is gone: exited.
    if state.get("ActiveState") in ("failed", "inactive") and not state.get("Job"):
        return "%s exited (it is %s)" % (unit, state.get("SubState") or state.get("ActiveState"))
    return None


class Exited(Exception):
    pass


def still_starting():
    """Raises Exited once the new instance stopped starting."""
    why = exited()
    if why:
        raise Exited(why)


def healthy():
    """None once the new instance answers the health path on its socket with a 2xx. systemd accepts
    connections for the instance even before it runs, so the answer is awaited while watching
    that it still starts."""
    deadline = time.time() + health["timeout"]
    last = "no answer"
    while time.time() < deadline:
        try:
            status, _ = http_get(new["socket"], health["path"], host, timeout=max(0.1, deadline - time.time()),
                                 waiting=still_starting)
            if 200 <= status < 300:
                return None
            last = "HTTP %s" % status if status else "no answer"
        except Exited as e:
            return str(e)
        except OSError as e:
            last = str(e) or type(e).__name__
        why = exited()
        if why:
            return why
        time.sleep(0.03)
    return "no healthy answer within %ss (last: %s)" % (health["timeout"], last)


def through_nginx():
    """None once nginx answers the health path from the new socket (its site says which socket
    answered a request from the host itself), else what it answered."""
    want = new.get("address") or "unix:" + new["socket"]
    # nginx answers at once after a reload: no longer than 10 s, nor than the gate waits
    deadline, last = time.time() + min(10, health["timeout"]), "no answer"
    while time.time() < deadline:
        try:
            status, got = http_get(a["nginx"], health["path"], host, health["header"])
            if 200 <= status < 300 and got == want:
                return None
            last = "HTTP %d from %s" % (status, got or "something else than %s (nginx's own page?)" % a["app"])
        except OSError as e:
            last = str(e) or type(e).__name__
        time.sleep(0.05)
    return last


def reload_nginx():
    """Returns once the old workers, with the old configuration, are gone."""
    res = reload_and_drain(a["nginx_pid"])
    if res.returncode != 0:
        fail("`systemctl reload-or-restart nginx` failed (exit %d): %s" % (res.returncode, res.stdout.strip()))


def put_back(previous):
    """The upstream file as it was before this switch."""
    if previous is None:
        os.unlink(upstream)
    else:
        write(upstream, previous)


def roots(path):
    """Made by root and writable by root only (the app could not have changed it)."""
    try:
        st = os.stat(path)
        acl = any(x.startswith("system.posix_acl") for x in os.listxattr(path))
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022 and not acl


def taken(where):
    """Something accepts connections on ``where`` (host:port)."""
    name, _, port = where.partition(":")
    try:
        socket.create_connection((name, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


release_dir = a["release_dir"]
if old and old["slot"] == new["slot"]:  # it would stop the instance it just made live
    fail("the new slot %s is the live one; the switch starts a release in the idle slot only" % new["slot"])
own_dir = os.path.join(release_dir, a["release_own_dir"])
if not os.path.isdir(release_dir):
    fail("release %s does not exist on this host (see `fab releases`)" % release)
container = a.get("container")  # a container app: its slots run the release's image (container-run.py)


def kind(engine):
    return "a container app's (%s)" % engine if engine else "a virtualenv app's"


try:  # the kind of app the release was made for: its venv key ("container-<engine>" for a container app's)
    made = str(json.loads(read(os.path.join(own_dir, "release.json")) or "{}").get("venv") or "")
except ValueError:
    made = ""
made = made[len("container-"):] if made.startswith("container-") else None
if made != (container["engine"] if container else None):
    fail("release %s is %s and the app is %s now (app.container or app.engine changed since): it cannot go "
         "live again; deploy the app instead" % (release, kind(made), kind(container and container["engine"])))
if container:
    if run(container["engine"], "image", "inspect", container["image"], check=False).returncode != 0:
        fail("release %s has no image %s on this host (it was pruned?); deploy it again instead"
             % (release, container["image"]))
    runs = [os.path.join(own_dir, "container-run.py"), os.path.join(own_dir, "container.json")]
else:
    if not os.path.exists(os.path.join(a["venv"], "bin", "gunicorn")):
        fail("release %s has no complete virtualenv (it was pruned?); deploy it again instead" % release)
    runs = [os.path.join(own_dir, "gunicorn.conf.py"), os.path.realpath(a["venv"])]
# What a slot runs must be root's: a release of an older layout (app-owned) may be tampered with.
for path in [release_dir, own_dir, os.path.join(own_dir, "unit")] + runs:
    if not roots(path):
        fail("release %s is not root's alone (%s): made by an older provision or tampered with; deploy "
             "again instead" % (release, path))
own_unit = read(os.path.join(own_dir, "unit"))
stage = a.get("stage", "all")


def prepared():
    """The idle slot already runs this release, with its own unit, untouched since (a prepare)."""
    return (stage != "all" and not a["daemon_reload"] and os.path.islink(new["slot_link"])
            and os.readlink(new["slot_link"]) == new["slot_target"] and read(unit_file) == own_unit
            and run("systemctl", "is-active", "--quiet", unit + ".service", check=False).returncode == 0
            and exited() is None)


# 1. the new instance, with the unit of its own release (kept when a prepare started it already)
if prepared():
    print("%s already runs %s (prepared): not restarted" % (unit, release))
else:
    link(new["slot_link"], new["slot_target"])
    daemon_reload = a["daemon_reload"]
    if read(unit_file) != own_unit:
        write(unit_file, own_unit)
        daemon_reload = True
    if daemon_reload:
        run("systemctl", "daemon-reload")
    run("systemctl", "stop", unit + ".service", check=False)
    # a unit that failed before (a refused release) would read as failed until the start job runs
    run("systemctl", "reset-failed", unit + ".service", check=False)
    if container and taken(new["socket"]):
        # another program would answer the health gate in the container's stead (and the container
        # could not publish its port)
        fail("port %s of slot %s is taken by another program (`ss -ltnp` names it); stop it or rename the "
             "app (its ports come from its name); traffic stays on the previous release" % (new["socket"], new["slot"]))
    if not container:
        run("systemctl", "restart", unit + ".socket", check=False)
    # --no-block: a release that crashes would hold `start` through systemd's restarts (seconds);
    # the health gate sees the crash at once instead.
    started = run("systemctl", "start", "--no-block", unit + ".service", check=False)
    if started.returncode != 0:  # no job queued (the unit cannot load, a dependency refused): no waiting for it
        fail("%s could not start: %s" % (unit, started.stdout.strip()), stop_new=True)

def container_running():
    """None when the slot's container runs (so its port is the container's), else why not."""
    name = container["name"]
    deadline = time.time() + health["timeout"]
    while time.time() < deadline:
        res = run(container["engine"], "inspect", "-f", "{{.State.Running}}", name, check=False)
        if res.stdout.strip() == "true":
            return None
        why = exited()
        if why:
            return why
        time.sleep(0.05)
    return "container %s is not running" % name


# 2. health gate (a container app's answer counts once its container runs: only then is the port its own)
problem = healthy() or (container and container_running())
if problem:
    fail("health check of release %s failed: %s; traffic stays on the previous release" % (release, problem),
         stop_new=True)
if stage == "prepare":
    print("%s prepared %s on its own socket; traffic stays where it was" % (unit, release))
    sys.exit(0)

# 3. nginx
os.makedirs(os.path.dirname(upstream), exist_ok=True)
previous = read(upstream)
write(upstream, new["upstream"])
test = run("nginx", "-t", "-q", check=False)
if test.returncode != 0:
    put_back(previous)
    fail("nginx -t failed, traffic not moved: %s" % test.stdout.strip(), stop_new=True)
reload_nginx()
if health["header"] and os.path.lexists(a["site_enabled"]):
    problem = through_nginx()
    if problem:
        put_back(previous)
        reload_nginx()
        fail("release %s answers on its socket, but not through nginx (%s); traffic stays on the previous "
             "release" % (release, problem), stop_new=True)

# 4. record, then retire the old instance
link(a["current"], a["current_target"])
record(a["action"])
# Enabled at boot = wants links, as `systemctl enable` makes them (without its daemon reload).
for wants, name, target in ((a["wants"], unit + ".service", unit_file),
                            (a["sockets_wants"], unit + ".socket", a["socket_unit_file"]))[:1 if container else 2]:
    os.makedirs(wants, exist_ok=True)
    link(os.path.join(wants, name), target)
if old:
    for wants, name in ((a["wants"], old["unit"] + ".service"), (a["sockets_wants"], old["unit"] + ".socket")):
        if os.path.lexists(os.path.join(wants, name)):
            os.unlink(os.path.join(wants, name))
    # No new request reaches it now; it finishes the ones it has (gunicorn's graceful
    # stop) without holding up the deploy. A commit keeps it: the fleet may still come back to it.
    if stage != "commit":
        run("systemctl", "stop", "--no-block", old["unit"] + ".service", *([] if container else [old["unit"] + ".socket"]),
            check=False)
print("%s now serves %s" % (unit, release))
