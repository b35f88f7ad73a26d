# Runs on the managed host as root (stdlib python3): moves traffic to a release without
# dropping a request.  argv[1] is JSON: app, root, slot (the idle one), old (the live slot
# or ""), release, health_path, host, timeout, action, by, upstream, log (the release log),
# socket (the slot's), prove ([header, value] nginx must answer with, or null), site (the
# enabled nginx site), wants, sockets_wants (boot link dirs), daemon_reload.
#
#  1. point slots/<slot> at the release, install the release's unit as <app>@<slot>.service
#     and (re)start it on its own socket (made by systemd: <app>@<slot>.socket);
#  2. health gate: the new instance must answer the health path on its socket, or
#     it is stopped, its log tail printed, and nothing else changes;
#  3. write the nginx upstream to the new socket, `nginx -t`, reload, and wait for
#     the old nginx workers to finish their requests;
#  4. switch `current`, record the live slot and the release log, then stop the
#     old instance gracefully (gunicorn finishes in-flight requests on TERM).
# Every intermediate state serves a complete release. Everything written here is in
# directories only root can write, and written without following symlinks.
import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import time

a = json.loads(sys.argv[1])
app, root, slot, old, release = a["app"], a["root"], a["slot"], a["old"], a["release"]
unit, old_unit = "%s@%s" % (app, slot), "%s@%s" % (app, old)
sock_path, upstream = a["socket"], a["upstream"]
unit_file = "/etc/systemd/system/%s.service" % unit


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
    tmp = path + ".provision-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)  # never follows: removes a link itself
    os.symlink(target, tmp)
    os.replace(tmp, path)


def write(path, text, mode=0o644):
    """Atomically, through a fresh temporary file (O_EXCL|O_NOFOLLOW: never through a link)."""
    tmp = path + ".provision-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        return fh.read()


def append_log(path, line):
    """The release log is root's: anything else found there (a link, another owner) is replaced."""
    try:
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path) or st.st_uid != 0:
            os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a") as fh:
        fh.write(line)


def record(action):
    """A line in the release log: what went live (deploy, rollback) or was refused, by whom, when."""
    append_log(a["log"], json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "release": release, "action": action,
        "by": a["by"], "slot": slot}, sort_keys=True) + "\n")


def exited():
    """Why the new instance is not starting any more (it exited or systemd restarts it), or None."""
    state = dict(l.split("=", 1) for l in run("systemctl", "show", "-p", "ActiveState,SubState,NRestarts",
                                             unit + ".service", check=False).stdout.split())
    if state.get("ActiveState") in ("failed", "inactive") or state.get("SubState") == "auto-restart" \
            or int(state.get("NRestarts") or 0) > 0:
        return "%s exited (it is %s)" % (unit, state.get("SubState") or state.get("ActiveState"))
    return None


def ask(deadline):
    """The status line of GET health_path on the new socket. systemd accepts connections for the
    instance even before it runs, so the answer is awaited while watching that it still starts."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5)
        conn.connect(sock_path)
        conn.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (a["health_path"], a["host"] or "localhost")).encode())
        data = b""
        while b"\r\n" not in data and time.time() < deadline:
            if select.select([conn], [], [], 0.1)[0]:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            else:
                why = exited()
                if why:
                    raise Exited(why)
        return data.split(b"\r\n", 1)[0].decode("latin-1")
    finally:
        conn.close()


class Exited(Exception):
    pass


def healthy():
    deadline = time.time() + a["timeout"]
    last = "no answer"
    while time.time() < deadline:
        try:
            status = ask(deadline).split()
            if len(status) > 1 and status[1].isdigit() and 200 <= int(status[1]) < 300:
                return None
            last = "HTTP %s" % status[1] if len(status) > 1 else "no answer"
        except Exited as e:
            return str(e)
        except OSError as e:
            last = str(e) or type(e).__name__
        why = exited()
        if why:
            return why
        time.sleep(0.03)
    return "no healthy answer within %ss (last: %s)" % (a["timeout"], last)


def nginx_workers():
    try:
        master = int(open("/run/nginx.pid").read().strip())
        return set(open("/proc/%d/task/%d/children" % (master, master)).read().split())
    except (OSError, ValueError):
        return set()


def alive(pid):
    return os.path.exists("/proc/%s" % pid)


release_dir = "%s/releases/%s" % (root, release)
if not os.path.isdir(release_dir):
    fail("release %s does not exist on this host (see `fab releases`)" % release)
if not os.path.exists(release_dir + "/.venv/bin/gunicorn"):
    fail("release %s has no complete virtualenv (it was pruned?); deploy it again instead" % release)
def roots(path):
    """Made by root and writable by root only (the app could not have changed it)."""
    try:
        st = os.stat(path)
        acl = any(x.startswith("system.posix_acl") for x in os.listxattr(path))
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022 and not acl


# What a slot runs must be root's: a release of an older layout (app-owned) may be tampered with.
for path in (release_dir, release_dir + "/.provision", release_dir + "/.provision/unit",
             release_dir + "/.provision/gunicorn.conf.py", os.path.realpath(release_dir + "/.venv")):
    if not roots(path):
        fail("release %s is not root's alone (%s): made by an older provision or tampered with; deploy "
             "again instead" % (release, path))
own_unit = read(release_dir + "/.provision/unit")

# 1. the new instance, with the unit of its own release
link("%s/slots/%s" % (root, slot), "../releases/" + release)
daemon_reload = a["daemon_reload"]
if read(unit_file) != own_unit:
    write(unit_file, own_unit)
    daemon_reload = True
if daemon_reload:
    run("systemctl", "daemon-reload")
run("systemctl", "stop", unit + ".service", check=False)
run("systemctl", "restart", unit + ".socket", check=False)
# --no-block: a release that crashes would hold `start` through systemd's restarts (seconds);
# the health gate sees the crash at once instead.
run("systemctl", "start", "--no-block", unit + ".service", check=False)

# 2. health gate
problem = healthy()
if problem:
    fail("health check of release %s failed: %s; traffic stays on the previous release" % (release, problem),
         stop_new=True)

# 3. nginx
os.makedirs(os.path.dirname(upstream), exist_ok=True)
previous = read(upstream)
write(upstream, "server unix:%s fail_timeout=0;\n" % sock_path)
test = run("nginx", "-t", "-q", check=False)
if test.returncode != 0:
    if previous is None:
        os.unlink(upstream)
    else:
        write(upstream, previous)
    fail("nginx -t failed, traffic not moved: %s" % test.stdout.strip(), stop_new=True)
def reload_nginx():
    """Returns once the old workers, with the old configuration, are gone."""
    before = nginx_workers()
    run("systemctl", "reload-or-restart", "nginx")
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in before):
        time.sleep(0.02)


def through_nginx():
    """None once nginx answers the health path from the new socket (its site says which socket
    answered a request from the host itself), else what it answered."""
    header, want = a["prove"]
    deadline, last = time.time() + 10, "no answer"
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=5)
            conn.request("GET", a["health_path"], headers={"Host": a["host"] or "localhost"})
            resp = conn.getresponse()
            got = resp.getheader(header) or ""
            conn.close()
            if 200 <= resp.status < 300 and got == want:
                return None
            last = "HTTP %d from %s" % (resp.status, got or "something else than %s (nginx's own page?)" % app)
        except OSError as e:
            last = str(e) or type(e).__name__
        time.sleep(0.05)
    return last


reload_nginx()
if a["prove"] and os.path.lexists(a["site"]):
    problem = through_nginx()
    if problem:
        if previous is None:
            os.unlink(upstream)
        else:
            write(upstream, previous)
        reload_nginx()
        fail("release %s answers on its socket, but not through nginx (%s); traffic stays on the previous "
             "release" % (release, problem), stop_new=True)

# 4. record, then retire the old instance
link(root + "/current", "releases/" + release)
record(a["action"])
# Enabled at boot = wants links, as `systemctl enable` makes them (without its daemon reload).
for wants, name, target in ((a["wants"], unit + ".service", unit_file),
                            (a["sockets_wants"], unit + ".socket", "/etc/systemd/system/%s@.socket" % app)):
    os.makedirs(wants, exist_ok=True)
    link("%s/%s" % (wants, name), target)
if old and old != slot:
    for wants, name in ((a["wants"], old_unit + ".service"), (a["sockets_wants"], old_unit + ".socket")):
        if os.path.lexists("%s/%s" % (wants, name)):
            os.unlink("%s/%s" % (wants, name))
    # No new request reaches it now; it finishes the ones it has (gunicorn's graceful
    # stop) without holding up the deploy.
    run("systemctl", "stop", "--no-block", old_unit + ".service", old_unit + ".socket", check=False)
print("%s now serves %s" % (unit, release))
