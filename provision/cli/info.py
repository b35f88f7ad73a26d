"""What is on the hosts, changing nothing: status, releases, logs, and the inventory itself."""

from __future__ import annotations

import json
import shlex

from .. import config as cfg
from .. import secrets
from ..facts import gather
from ..errors import ProvisionError
from ..history import DONE, History
from ..hosts import Job, jobs, targets
from ..layout import SLOTS
from ..output import Printer
from ..release import current_release, releases_on_host
from ..runner import HostResult
from ..fleet import run_fleet
from . import connect_job, exit_for_failures, guarded


@guarded
def show_inventory(c) -> None:
    for t in targets(c):
        secrets.remember(cfg.secret_values(t.vars))
        extra = " ".join(f"{k}={v}" for k, v in sorted(t.vars.items()))
        print(secrets.mask(f"{t.alias:<16} {t.address:<32} key={t.key or '-'} {extra}".rstrip()))





@guarded
def show_releases(c) -> None:
    """Each host's releases, hosts in parallel; each host's lines together, in the selection's order."""
    work = jobs(c, {})
    lines: dict[str, list[str]] = {}

    def one(job: Job) -> HostResult:
        s = job.settings
        remote = connect_job(job, c)
        try:
            facts = gather(remote, [("ls", s.layout.releases), ("content", s.layout.release_log),
                                    ("file", s.layout.current)])
        finally:
            remote.close()
        live, history = current_release(s, facts), History.read(facts.content(s.layout.release_log))
        names = releases_on_host(s, facts)
        out = lines[job.target.alias] = [f"{job.target.alias}: {len(names)} release(s) in {s.layout.releases}"]
        for n in names:
            e = history.first.get(n)  # none: the log never saw it go live or be refused
            what = (f"{DONE.get(e.get('action'), '')} {e.get('time')} by {e.get('by') or '?'}{origin(e)}" if e
                    else "NEVER LIVE")
            out.append(f"  {'*' if n == live else ' '} {n:<40} {what}".rstrip())
        return HostResult(job.target.alias)

    results = run_fleet(work, lambda j: j.target.alias, one)
    for job in work:
        for line in lines.get(job.target.alias, ()):
            print(line)
    exit_for_failures(results, Printer())


def origin(entry: dict) -> str:
    """Where a release came from, as its release log entry says (``fab ship``, a git push): the
    commit and the tests it passed."""
    tests = entry.get("tests") if isinstance(entry.get("tests"), dict) else {}
    out = f", commit {str(entry['commit'])[:12]}" if entry.get("commit") else ""
    if tests.get("result") == "none":
        out += ", no tests"
    elif tests:
        out += f", tests {tests.get('result', '?')}" + (f" in {tests['seconds']:.1f}s" if isinstance(
            tests.get("seconds"), (int, float)) else "")
    return out + (f" (via {entry['via']})" if entry.get("via") else "")


@guarded
def show_status(c) -> None:
    printer = Printer()

    def one(job: Job) -> HostResult:
        s = job.settings
        units = [*(s.layout.unit(slot) for slot in SLOTS), "nginx", *app_units(s)]
        remote = connect_job(job, c)
        try:
            facts = gather(remote, [("file", s.layout.current), ("content", s.layout.release_log),
                                    ("content", s.layout.upstream_file), ("content", "/proc/uptime"), ("os", "")]
                           + [("service", u) for u in units])
        finally:
            remote.close()
        slot = s.layout.live_slot(facts.content(s.layout.upstream_file))
        states, down = [], []
        for u in units:
            st = facts.service(u) or {}
            if st.get("active") or u == "nginx" or (slot and u == s.layout.unit(slot)) or u in app_units(s):
                up = "waiting" if u.endswith(".timer") else "running"  # an active timer waits for its time
                states.append(f"{u} {up if st.get('active') else 'STOPPED'}")
                if not st.get("active"):
                    down.append(u)
        log = (facts.content(s.layout.release_log) or "").strip().splitlines()
        try:
            last = json.loads(log[-1]) if log else {}
        except ValueError:
            last = {}
        uptime = float((facts.content("/proc/uptime") or "0").split()[0])
        osf = facts[("os", "")]
        printer.line(f"{job.target.alias}: release {current_release(s, facts) or '(none)'}; {', '.join(states)}; "
                     f"up {uptime / 86400:.1f} days; {osf['id']} {osf['version']}")
        if last:
            printer.line(f"{job.target.alias}: last {last.get('action')} {last.get('release')} at {last.get('time')} "
                         f"by {last.get('by') or '?'}")
        if down:  # the host does not serve the app: say so in the exit code too
            return HostResult(job.target.alias, error=f"{job.target.alias}: {' and '.join(down)} not running; "
                                                      "`fab deploy` starts what is missing")
        return HostResult(job.target.alias)

    results = run_fleet(jobs(c, {}), lambda j: j.target.alias, one)
    exit_for_failures(results, printer)


def app_units(s: cfg.Settings) -> list[str]:
    """The app's process services and timers, as `fab status` shows them."""
    return [*map(s.layout.process_unit, s.processes), *map(s.layout.timer_unit, s.timers)]


def process_unit(s: cfg.Settings, process: str) -> str:
    """The service of a process or timer named in the settings."""
    if process not in s.processes and process not in s.timers:
        known = ", ".join([*s.processes, *s.timers]) or "none (app.processes, app.timers, a Procfile)"
        raise ProvisionError(f"app {s.name} has no process or timer {process!r}; it has {known}")
    return s.layout.process_unit(process)


@guarded
def show_logs(c, follow: bool = False, lines: int = 20, process: str | None = None) -> None:
    printer = Printer()
    work = jobs(c, {})
    only = {job.target.alias: process_unit(job.settings, process) for job in work} if process else {}

    def one(job: Job) -> HostResult:
        s, label = job.settings, job.target.alias
        f = " -f" if follow else ""
        units = " ".join(f"-u {shlex.quote(u)}" for u in ([only[label]] if only else
                                               (*(s.layout.unit(slot) for slot in SLOTS), "nginx", *app_units(s))))
        cmd = f"journalctl {units} -n {lines} --no-pager -o short-iso{f}" + (" & " + (
            f"tail -q -n {lines}{' -F' if follow else ''} {s.layout.access_log} {s.layout.error_log} "
            "2>/dev/null & wait") if not only else "")
        remote = connect_job(job, c)
        try:
            remote.exec(f"{remote.sudo}bash -c {shlex.quote(cmd)}", on_line=lambda l: printer.line(f"{label} | {l}"))
        finally:
            remote.close()
        return HostResult(label)

    results = run_fleet(work, lambda j: j.target.alias, one, parallel=max(1, len(work)))
    exit_for_failures(results, printer)
