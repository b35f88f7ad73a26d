"""What `fab status` shows of a host: the command that collects it (``remote/status.py``, one round
trip) and, pure, what its numbers mean: the health verdict, request rate and 5xx ratio, CPU and
memory, disk, the certificate's days left, the live release's age, and the lines that say it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import remote
from .config import Settings
from .layout import NGINX_LOCAL, SLOTS
from .release import host_header

WINDOW = 300  # seconds of the access log the request rate and 5xx ratio cover
TAIL_BYTES = 4 << 20  # the most of the access log read (from its end)
SAMPLE = 0.5  # seconds between the two CPU readings of one status
SYSTEMD_TIMEOUT = 20  # seconds `systemctl show` may take: then the services' states are unknown (systemd busy)
ALARM = 50  # seconds the collector may take in all (fab status waits 60): then it says where it was stuck
ERROR_RATIO = 0.05  # a 5xx ratio above this is flagged (a note, not a failure)
DISK_FULL = 90.0  # % used of the app's file system that is flagged
CERT_SOON = 14  # days left that are flagged


def app_units(s: Settings) -> list[str]:
    """The app's process services and timers, as `fab status` shows them."""
    return [*map(s.layout.process_unit, s.processes), *map(s.layout.timer_unit, s.timers)]


def status_units(s: Settings) -> list[str]:
    return [*(s.layout.unit(slot) for slot in SLOTS), "nginx", *app_units(s)]


def command(s: Settings, sample: float = SAMPLE) -> str:
    """The one command that collects a host's status (JSON on stdout)."""
    lay = s.layout
    return remote.python("status.py", {
        "url": NGINX_LOCAL + s.health_path, "host": host_header(s), "units": status_units(s),
        "cgroups": [*(lay.unit(slot) for slot in SLOTS), *map(lay.process_unit, s.processes)],
        "slices": [list(lay.container_cgroups)] if s.container else [],
        "access_log": lay.access_log, "window": WINDOW, "tail_bytes": TAIL_BYTES, "release_log": lay.release_log,
        "current": lay.current, "upstream_file": lay.upstream_file, "root": lay.root,
        "certificate": lay.certificate if s.tls else None, "sample": sample,
        "systemd_timeout": SYSTEMD_TIMEOUT, "alarm": ALARM})


def parse(stdout: str) -> dict:
    return json.loads(stdout)


# -- the decisions: pure


def health_verdict(health: dict) -> tuple[bool, str]:
    """(healthy, how it is said): healthy is a 2xx answer through nginx."""
    status, error = health.get("status") or 0, health.get("error")
    if error:
        return False, f"DOWN ({error})"
    if 200 <= status < 300:
        return True, f"ok ({status}, {health.get('seconds', 0) * 1000:.0f} ms)"
    return False, f"FAILING (HTTP {status})" if status else "FAILING (not HTTP)"


def request_rate(requests: dict) -> tuple[float, float | None, float]:
    """(requests per second, 5xx ratio or None without requests, seconds covered) over the window, or,
    when it is not all there ("cut": the bytes read, or the access logs, began within it), over the time
    since the oldest request read."""
    seconds = max(1.0, requests["covered"]) if requests.get("cut") else float(requests["window"])
    n, errors = requests["count"], requests["errors"]
    return n / seconds, (errors / n if n else None), seconds


def cpu_percent(before: list | None, after: list) -> float | None:
    """CPU use between two readings [usage_usec, time] (100 = one core busy), None without two."""
    if not before or after[1] <= before[1] or after[0] < before[0]:
        return None
    return (after[0] - before[0]) / 1e6 / (after[1] - before[1]) * 100


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def disk_use(disk: dict | None) -> tuple[float, str] | None:
    """(% used, how it is said) of the app's file system."""
    if not disk or not disk.get("total"):
        return None
    used = disk["total"] - disk["free"]  # what the app may still write is `free` (non-root's share)
    pct = used / disk["total"] * 100
    return pct, f"{human_bytes(used)} of {human_bytes(disk['total'])} ({pct:.0f}%)"


def cert_days(not_after: str | None, now: float) -> int | None:
    """Whole days left of a certificate whose openssl notAfter is ``not_after`` ("Feb 22 05:00:00 2027 GMT"),
    None when unknown."""
    if not not_after:
        return None
    try:
        end = datetime.strptime(" ".join(not_after.split()), "%b %d %H:%M:%S %Y GMT").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return int((end.timestamp() - now) // 86400)


def live_since(release_log: str | None, live: str | None) -> dict | None:
    """The release log's newest entry that made ``live`` live (deploy or rollback)."""
    found = None
    for line in (release_log or "").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("release") == live and entry.get("action") in ("deploy", "rollback"):
            found = entry
    return found


def last_entry(release_log: str | None) -> dict:
    for line in reversed((release_log or "").strip().splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            return entry
    return {}


def entry_age(entry: dict | None, now: float) -> str | None:
    try:
        when = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, KeyError, ValueError):
        return None
    return human_age(now - when.timestamp())


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what makes the exit code 1: a service down, health failing


def report(alias: str, s: Settings, got: dict, before: list | None = None) -> Report:
    """The lines `fab status` prints for one host from what ``remote/status.py`` collected; ``before``: a
    CPU reading of an earlier refresh (``--watch``) when this one has a single reading."""
    lay, now, r = s.layout, got["now"], Report()
    slot = lay.live_slot(got.get("upstream"))
    states = [] if got["units"] is not None else ["service states unknown (systemd busy)"]
    for u, st in (got["units"] or {}).items():
        if st["active"] or u == "nginx" or (slot and u == lay.unit(slot)) or u in app_units(s):
            up = "waiting" if u.endswith(".timer") else "running"  # an active timer waits for its time
            states.append(f"{u} {up if st['active'] else 'STOPPED'}")
            if not st["active"]:
                r.problems.append(f"{u} not running")
    live = got.get("current")
    since = live_since(got.get("release_log"), live)
    age = entry_age(since, now)
    r.lines.append(f"{alias}: release {live or '(none)'}; {', '.join(states)}; up {got['uptime'] / 86400:.1f} days; "
                   f"{got['os']}" + (f"; live for {age}" if age else ""))
    healthy, said = health_verdict(got["health"])
    if not healthy:
        r.problems.append(f"health check {s.health_path} {said}")
    req = got["requests"]
    if req["log"]:
        rate, ratio, seconds = request_rate(req)
        traffic = (f"{rate:.2f} req/s, 5xx {ratio * 100:.1f}%" if ratio is not None else "no requests")
        traffic += f" over {seconds / 60:.0f} min" if seconds >= 60 else f" over {seconds:.0f}s"
        if ratio is not None and ratio > ERROR_RATIO:
            traffic += " (HIGH)"
    else:
        traffic = "no access log"
    r.lines.append(f"{alias}: health {said}; {traffic}")
    cpu = cpu_percent(got["cpu"]["before"] or before, got["cpu"]["after"])
    disk = disk_use(got.get("disk"))
    rss = " (RSS of its processes)" if got.get("usage_from") == "processes" else ""  # no cgroup counters
    if got["units"] is None:  # no cgroups known: no figures
        cpu, memory = None, "memory ?"
    else:
        memory = f"memory {human_bytes(got['memory'])}{rss}"
    usage = [memory, f"cpu {cpu:.1f}%" if cpu is not None else "cpu ?",
             (f"disk {disk[1]}" + (" (NEARLY FULL)" if disk[0] >= DISK_FULL else "")) if disk else "disk ?"]
    if got.get("cert") is not None:
        days = cert_days(got["cert"], now)
        usage.append("certificate " + (got["cert"] if got["cert"] == "missing" else "expiry unknown" if days is None
                                       else f"expires in {days} days" + (" (SOON)" if days < CERT_SOON else "")))
    r.lines.append(f"{alias}: {'; '.join(usage)}")
    last = last_entry(got.get("release_log"))
    if last:
        r.lines.append(f"{alias}: last {last.get('action')} {last.get('release')} at {last.get('time')} "
                       f"by {last.get('by') or '?'}")
    return r


def cpu_reading(got: dict) -> list:
    """This status's last CPU reading, for the next refresh of ``--watch`` (none when the services'
    cgroups were unknown: it read nothing)."""
    return got["cpu"]["after"] if got["units"] is not None else None

