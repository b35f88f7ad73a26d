"""What is on the hosts, changing nothing: status, releases, logs, and the inventory itself."""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timezone

from .. import config as cfg
from .. import logs, secrets, status
from ..facts import gather
from ..errors import ProvisionError, Unreachable
from ..history import DONE, History
from ..hosts import Job, jobs, targets
from ..output import Printer
from ..release import current_release, releases_on_host
from ..runner import HostResult
from ..fleet import run_fleet
from ..ssh import Remote
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
def show_status(c, watch: bool = False, interval: float | str = 2.0) -> None:
    """Each host's status, in one round trip per host (:mod:`provision.status`); with ``watch``, again
    every ``interval`` seconds over the same connections until Ctrl-C (exit 0 then)."""
    printer = Printer()
    try:
        seconds = float(interval)
        if not 0.5 <= seconds <= 3600:
            raise ValueError
    except ValueError:
        raise ProvisionError(f"--interval {str(interval)!r}: expected seconds from 0.5 to 3600")
    work = jobs(c, {})
    remotes: dict[str, Remote] = {}
    cpu: dict[str, list] = {}  # each host's last CPU reading: --watch's refreshes measure from it
    blocks: dict[str, list[str]] = {}

    def one(job: Job) -> HostResult:
        s, alias = job.settings, job.target.alias
        if alias not in remotes:
            remotes[alias] = connect_job(job, c)
        try:
            rc, out, err = remotes[alias].exec(
                f"{remotes[alias].sudo}{status.command(s, 0 if alias in cpu else status.SAMPLE)}", timeout=60)
            if rc == -1:  # no exit status: the connection went during the command
                raise Unreachable(f"{alias}: lost the SSH connection; check the host" +
                                  ("; the next refresh connects again" if watch else ""))
        except ProvisionError:  # a lost connection: --watch's next refresh connects again
            remotes.pop(alias).close()
            cpu.pop(alias, None)
            raise
        if rc != 0:
            raise ProvisionError(f"{alias}: status failed ({rc}): {err.strip()[-300:]}", code=1)
        got = status.parse(out)
        shown = status.report(alias, s, got, cpu.get(alias))
        cpu[alias] = status.cpu_reading(got)
        blocks[alias] = shown.lines
        if shown.problems:  # the host does not serve the app (well): say so in the exit code too
            return HostResult(alias, error=f"{alias}: {'; '.join(shown.problems)}; `fab deploy` starts what is "
                                           "missing, `fab logs` says why")
        return HostResult(alias)

    def close_all() -> None:  # Ctrl-C: the commands in flight end now, not after their 60 s
        for remote in list(remotes.values()):
            remote.close()

    try:
        while True:
            blocks.clear()
            results = run_fleet(work, lambda j: j.target.alias, one, on_interrupt=close_all)
            if watch and sys.stdout.isatty():
                print(CLEAR, end="")
            elif watch:
                printer.line(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}")
            for job in work:
                for line in blocks.get(job.target.alias, ()):
                    printer.line(line)
            if not watch:
                break
            for r in results:
                if r.failed:
                    printer.error(r.error)
            time.sleep(seconds)
    except KeyboardInterrupt:  # the way out of --watch
        return
    finally:
        close_all()
    exit_for_failures(results, printer)


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: --watch redraws in place on a terminal


def process_unit(s: cfg.Settings, process: str) -> str:
    """The service of a process or timer named in the settings."""
    if process not in s.processes and process not in s.timers:
        known = ", ".join([*s.processes, *s.timers]) or "none (app.processes, app.timers, a Procfile)"
        raise ProvisionError(f"app {s.name} has no process or timer {process!r}; it has {known}")
    return s.layout.process_unit(process)


@guarded
def show_logs(c, follow: bool = False, lines: int = 20, process: str | None = None, since: str | None = None,
              grep: str | None = None) -> None:
    printer = Printer()
    work = jobs(c, {})
    only = {job.target.alias: process_unit(job.settings, process) for job in work} if process else {}
    when = logs.parse_since(since, datetime.now(timezone.utc)) if since else None
    if grep is not None and logs.grep_problem(grep):
        raise ProvisionError(f"--grep {grep!r}: {logs.grep_problem(grep)}")

    def one(job: Job) -> HostResult:
        s, label = job.settings, job.target.alias
        units = [only[label]] if only else status.status_units(s)
        files = [] if only else [s.layout.access_log, s.layout.error_log]
        cmd = logs.command(units, files, lines, follow, when, grep)
        remote = connect_job(job, c)
        try:
            rc, _, err = remote.exec(f"{remote.sudo}bash -c {shlex.quote(cmd)}",
                                     on_line=lambda l: printer.line(f"{label} | {l}"))
        finally:
            remote.close()
        if rc != 0:  # 2: the host's grep -E refused the pattern; else journalctl's failure (its message)
            why = " ".join(err.strip().splitlines()[-3:]) or f"exit {rc}"
            if rc == 2 and grep is not None:
                raise ProvisionError(f"{label}: --grep {grep!r}: {why}", code=2)
            raise ProvisionError(f"{label}: reading the logs failed ({rc}): {why}", code=1)
        return HostResult(label)

    results = run_fleet(work, lambda j: j.target.alias, one, parallel=max(1, len(work)))
    exit_for_failures(results, printer)
