# Runs on the managed host (stdlib python3, after lib_http and lib_logtime): what `fab status` shows
# of one app, collected in one go; the numbers only (provision/status.py decides what they mean).
# argv[1] is JSON: url, host (Host header), units (every unit to report), cgroups (the units whose
# memory and CPU count), slices (more cgroups that count, of each list of paths the first there: a
# container app's containers, which the engine runs outside their units' cgroups), access_log, window
# (seconds of it), tail_bytes (most of it read), release_log, current, upstream_file, root (disk),
# certificate (path or null), sample (seconds between two CPU readings; 0: one reading), systemd_timeout
# (seconds `systemctl show` may take), alarm (seconds the whole may take). Prints one JSON object; on stderr, the seconds each step took (and, stopped by the alarm,
# the step it was stuck in: exit 1).
import json
import os
import signal
import subprocess
import sys
import time

a = json.loads(sys.argv[1])
out = {"now": time.time()}
steps = [["start", time.time()]]  # [step, when it began]


def step(name):
    steps.append([name, time.time()])


def timings():
    ends = [t for _, t in steps[1:]] + [time.time()]
    return ", ".join("%s %.3fs" % (name, end - t) for (name, t), end in zip(steps, ends))


def stuck(signum, frame):
    print("status: stopped after %ss, stuck in %s (%s)" % (a["alarm"], steps[-1][0], timings()), file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


signal.signal(signal.SIGALRM, stuck)
signal.alarm(a["alarm"])


def read(path, limit=None):
    try:
        with open(path, "rb") as fh:
            if limit:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return None


# health: through nginx, as a visitor (the deploy's own check)
step("health")
where, path = split_url(a["url"])
t0 = time.time()
try:
    status, _ = http_get(where, path, a["host"] or where, timeout=5.0)
    out["health"] = {"status": status, "error": None}
except OSError as e:
    out["health"] = {"status": 0, "error": str(e) or type(e).__name__}
out["health"]["seconds"] = round(time.time() - t0, 3)

# services and their cgroups
step("services")
units = {}
try:
    shown = subprocess.run(["systemctl", "show", "--property=Id,ActiveState,ControlGroup", "--"] + a["units"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           universal_newlines=True, timeout=a["systemd_timeout"]).stdout
except subprocess.TimeoutExpired:  # a busy systemd: the states unknown this time (units: null), not stopped
    shown = None
blocks = (shown or "").split("\n\n")
for unit, block in zip(a["units"], blocks + [""] * (len(a["units"]) - len(blocks))):  # none: not running
    props = dict(l.partition("=")[::2] for l in block.splitlines() if "=" in l)
    units[unit] = {"active": props.get("ActiveState") == "active", "cgroup": props.get("ControlGroup") or ""}
out["units"] = {u: {"active": v["active"]} for u, v in units.items()} if shown is not None else None


CGROUP_ROOTS = tuple(a.get("cgroup_roots") or  # v2, hybrid's v2, v1's
                     ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"))
TICK = os.sysconf("SC_CLK_TCK")
source = {"from": "cgroup"}


def group_usage(group):
    """(memory bytes, CPU microseconds) of one unit's cgroup: its v2 counters (memory.current less the
    page cache, memory.stat's file: what its processes use, as RSS says), or (a hybrid host without the
    memory controller there, a container) the sum over its processes: their RSS and CPU time."""
    for root in CGROUP_ROOTS[:2]:
        m, c = read(root + group + "/memory.current"), read(root + group + "/cpu.stat")
        if m and m.strip().isdigit() and c:
            usec = [int(l.split()[1]) for l in c.splitlines() if l.startswith("usage_usec ")]
            cache = [int(l.split()[1]) for l in (read(root + group + "/memory.stat") or "").splitlines()
                     if l.startswith("file ") and l.split()[1].isdigit()]
            return max(0, int(m) - (cache[0] if cache else 0)), usec[0] if usec else 0
    source["from"] = "processes"
    pids = []  # the group's and its descendants' (a slice's are all in the groups below it)
    for root in CGROUP_ROOTS:
        if os.path.isdir(root + group):
            for top, _, _ in os.walk(root + group):
                pids += (read(top + "/cgroup.procs") or "").split()
            break
    mem, cpu = 0, 0
    for pid in pids:
        status, stat = read("/proc/%s/status" % pid), read("/proc/%s/stat" % pid)
        rss = [l.split()[1] for l in (status or "").splitlines() if l.startswith("VmRSS:")]
        mem += int(rss[0]) * 1024 if rss else 0
        fields = (stat or "").rpartition(")")[2].split()
        cpu += (int(fields[11]) + int(fields[12])) * 1000000 // TICK if len(fields) > 12 else 0
    return mem, cpu


def usage():
    mem, cpu = 0, 0
    groups = [units.get(unit, {}).get("cgroup") for unit in a["cgroups"]]
    groups += [next((g for g in paths for r in CGROUP_ROOTS if os.path.isdir(r + g)), None) for paths in a["slices"]]
    for group in groups:
        if group:
            m, c = group_usage(group)
            mem, cpu = mem + m, cpu + c
    return mem, cpu, time.time()


step("usage")
first = usage()
if a["sample"]:
    time.sleep(a["sample"])
    second = usage()
    out["cpu"] = {"before": [first[1], first[2]], "after": [second[1], second[2]]}
    out["memory"] = second[0]
else:
    out["cpu"] = {"before": None, "after": [first[1], first[2]]}
    out["memory"] = first[0]

out["usage_from"] = source["from"]

step("access log")
# requests over the window, from the newest part of the access log, read backwards from its end, and on
# into the one before it (<log>.1, logrotate's) when the window began before the log did; at most
# tail_bytes of the two. "cut": the window is not all there (the bytes read, or the logs, began within
# it): the figures are over the `covered` seconds since the oldest request read.
since, requests, errors, oldest = out["now"] - a["window"], 0, 0, None
budget, complete, cut, found = a["tail_bytes"], False, False, False
for path in (a["access_log"], a["access_log"] + ".1"):
    try:
        size = os.stat(path).st_size
    except OSError:
        break
    text = read(path, budget)
    if text is None:
        break
    found = True
    lines = text.splitlines()
    if size > budget:
        lines, cut = lines[1:], True  # the first line read is cut (decided by the file's size, not the text's)
    for line in reversed(lines):
        when = access_time(line)
        if when is None:
            continue
        if when < since:
            complete = True  # the window is all there
            break
        oldest = when
        code = access_status(line)
        requests += 1
        errors += 1 if code is not None and code >= 500 else 0
    budget -= size
    if complete or cut or budget <= 0:
        break
out["requests"] = {"count": requests, "errors": errors, "log": found, "cut": not complete and oldest is not None,
                   "covered": out["now"] - (oldest if oldest is not None else out["now"]), "window": a["window"]}

# the live release and its history, uptime, OS, disk
step("release, disk")
out["current"] = os.path.basename(os.readlink(a["current"])) if os.path.islink(a["current"]) else None
out["release_log"] = read(a["release_log"], 65536)
out["upstream"] = read(a["upstream_file"])
out["uptime"] = float((read("/proc/uptime") or "0").split()[0])
osr = dict(l.partition("=")[::2] for l in (read("/etc/os-release") or "").splitlines())
out["os"] = "%s %s" % (osr.get("ID", "?").strip('"'), osr.get("VERSION_ID", "").strip('"'))
try:
    st = os.statvfs(a["root"])
    out["disk"] = {"total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize,
                   "used": (st.f_blocks - st.f_bfree) * st.f_frsize}
except OSError:
    out["disk"] = None

step("certificate")
# the certificate's expiry, as openssl says it (no openssl: as python's ssl module decodes it, or unknown)
out["cert"] = None
if a["certificate"] and os.path.exists(a["certificate"]):
    try:
        res = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", a["certificate"]], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True, timeout=10)
        out["cert"] = res.stdout.strip().partition("=")[2] or "unknown"
    except (OSError, subprocess.SubprocessError):  # no openssl: CPython's own decoder (ssl's, private)
        try:
            import ssl
            out["cert"] = ssl._ssl._test_decode_cert(a["certificate"])["notAfter"]
        except Exception:
            out["cert"] = "unknown"
elif a["certificate"]:
    out["cert"] = "missing"
signal.alarm(0)
print(json.dumps(out))
print("status: " + timings(), file=sys.stderr)
