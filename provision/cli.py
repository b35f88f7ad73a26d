"""What the fab tasks do, kept out of the fabfile so it stays thin.

Every task validates everything it can locally (inventory, settings, source,
templates) for every selected host before it opens a connection, so bad
input never leaves a half-changed host.
"""

from __future__ import annotations

import functools
import getpass
import json
import shlex
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from invoke import Exit
from invoke.config import AmbiguousMergeError
from invoke.util import yaml

from . import config as cfg
from . import secrets
from .app import deploy_steps, provision_steps, proxy_env, rollback_steps
from .errors import ProvisionError
from .executor import HostResult, Printer, connect, gather, run_steps
from .fleet import DEFAULT_PARALLEL, exit_code, run_fleet
from .release import History, current_release, log_path, releases_on_host
from .lock import Lock
from .hosts import SANDBOX_INVENTORY, Job, jobs, project, targets
from .layout import SLOTS
from .source import scan

if TYPE_CHECKING:
    from .checks.plugin import CheckHost

def _connect(job: Job, c, accept_new_host_key: bool = False):
    t = job.target
    return connect(t.host, t.user, t.port, t.key, t.known_hosts, config=c.config, label=t.alias,
                   accept_new_host_key=accept_new_host_key)


def _finish(results: list[HostResult], printer: Printer, json_file: str | None = None) -> None:
    printer.line(f"{'host':<20} {'ok':>4} {'changed':>8} {'failed':>7} {'time':>7}")
    for r in results:
        state = " skipped" if r.skipped else ""
        printer.line(f"{r.host:<20} {r.ok:>4} {r.changed:>8} {int(r.failed):>7} {r.duration:>6.1f}s{state}")
    if json_file:
        Path(json_file).write_text(secrets.mask(json.dumps([
            {"host": r.host, "ok": r.ok, "changed": r.changed, "failed": r.failed, "duration": round(r.duration, 3),
             "round_trips": r.round_trips, "changed_steps": r.changed_steps(), "error": r.error}
            for r in results], indent=2)) + "\n")
    code = exit_code(results)
    if code:
        raise Exit(code=code)


def _summary_line(r: HostResult, dry_run: bool) -> str:
    if dry_run and r.failed:
        return f"{r.host}: dry run stopped, nothing was touched ({r.duration:.1f}s)"
    if dry_run:
        n = sum(1 for p in r.planned if p.status == "change")
        return (f"{r.host}: dry run: {n} step(s) would change, nothing was touched ({r.duration:.1f}s)" if n else
                f"{r.host}: dry run: nothing would change ({r.duration:.1f}s)")
    if r.failed:
        return f"{r.host}: FAILED after {r.changed} change(s) ({r.duration:.1f}s)"
    if r.changed == 0:
        return f"{r.host}: no changes, nothing restarted (ok={r.ok}, {r.duration:.1f}s)"
    return f"{r.host}: {r.changed} changed, ok={r.ok} ({r.duration:.1f}s)"


def guarded(fn):
    """Turn user-caused errors into one line and an exit code, no traceback."""

    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ProvisionError as e:
            raise Exit(f"error: {secrets.mask(str(e))}", code=e.code)
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130)
        except BrokenPipeError:  # output piped into `head` and the like
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=0)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def config_error(error: BaseException, tb) -> str | None:
    """The one line for an error invoke raises while it reads its configuration, else None.

    Invoke reads fabric.yaml and FABRIC_* variables after importing the fabfile but
    before any task runs, so `guarded` cannot catch what goes wrong there."""
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark else "a config file"
        problem = getattr(error, "problem", None) or str(error)
        return f"{where}: {' '.join(problem.split())}; fix the YAML"
    if isinstance(error, AmbiguousMergeError):  # its message holds whole config sections: not shown
        return ("a config file (fabric.yaml) gives a list or a single value where a mapping is expected, "
                "or the reverse; fix the YAML")
    if any(frame.f_globals.get("__name__") == "invoke.env" for frame, _ in traceback.walk_tb(tb)):
        names = ", ".join(sorted(k for k in os.environ if k.startswith("FABRIC_")))
        return (f"cannot use the FABRIC_* environment variables ({names}): {' '.join(str(error).split())}; "
                "unset the wrong one, or set its value in fabric.yaml")
    return None


def _excepthook(kind, error, tb) -> None:
    """Python's hook for uncaught exceptions (sys.excepthook): errors of `config_error`
    end the process with one line and exit code 2; others print as usual.

    A hook returning leaves the process with code 1, so this one exits itself (os._exit,
    after flushing): no task has run, nothing is left to clean up."""
    message = config_error(error, tb)
    if message is None:
        return sys.__excepthook__(kind, error, tb)
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


# `fab` imports the fabfile, and so this module, before it reads fabric.yaml and FABRIC_* variables.
sys.excepthook = _excepthook


def deployer() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def lock_for(s: cfg.Settings, action: str, release: str, break_lock: bool) -> Lock:
    holder = {"user": getpass.getuser(), "machine": socket.gethostname(), "action": action, "release": release,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    return Lock(s.layout, holder, break_lock)


@guarded
def run_apply(c, flags: dict, *, mode: str = "deploy", dry_run: bool = False, verbose: bool = False,
              json_file: str | None = None, break_lock: bool = False, to: str | None = None,
              fleet: dict | None = None) -> list[HostResult]:
    """deploy, provision or rollback the selected hosts."""
    fleet = fleet or {}
    start = time.monotonic()
    work = jobs(c, flags)
    plans, sources = [], {}
    for job in work:  # decide everything locally before touching any host
        s = job.settings
        if mode == "deploy":
            source = sources.get(s.source) or sources.setdefault(s.source, scan(s.source))
            rid = source.release_id()
            steps = deploy_steps(s, source, rid, deployer())
        elif mode == "rollback":
            rid = to or "previous release"
            steps = rollback_steps(s, to, deployer())
        else:
            rid, steps = "-", provision_steps(s)
        plans.append((job, steps, lock_for(s, mode, rid, break_lock)))
    printer = Printer(verbose=verbose)

    def one(plan) -> HostResult:
        job, steps, lock = plan
        t0 = time.monotonic()
        remote = None
        try:
            remote = _connect(job, c, fleet.get("accept_new_host_key", False))
            r = run_steps(remote, steps, dry_run=dry_run, printer=printer, env=proxy_env(job.settings), lock=lock)
        except ProvisionError as e:  # this host's problem; the others go on
            printer.error(str(e))
            r = HostResult(job.target.alias, error=str(e), code=e.code)
        finally:
            if remote is not None:
                remote.conn.close()
        r.duration = time.monotonic() - t0
        if remote is not None:
            printer.line(_summary_line(r, dry_run))
            if verbose:
                printer.line(f"{r.host}: {remote.round_trips} SSH round trip(s)")
        return r

    results = run_fleet(plans, lambda p: p[0].target.alias, one, parallel=fleet.get("parallel") or DEFAULT_PARALLEL,
                        serial=fleet.get("serial"), max_fail=fleet.get("max_fail") or 0,
                        on_skip=lambda h: printer.line(f"{h}: skipped (an earlier batch failed; see --max-fail)"))
    if verbose:
        printer.line(f"total {time.monotonic() - start:.2f}s")
    _finish(results, printer, json_file)
    return results


def check_hosts(work: list[Job], connector) -> list["CheckHost"]:
    """The hosts `fab check` runs on, by alias: each with its app settings (the `app` fixture) and
    a way to connect (``connector(job)``, called only when a check needs the host)."""
    from .checks.plugin import CheckHost  # pytest and testinfra: only `fab check` needs them

    out = []
    for job in work:
        t, s = job.target, job.settings
        settings = {"name": s.name, "user": s.user, "server_name": s.server_name, "health_path": s.health_path,
                    **s.layout.variables()}
        out.append(CheckHost(t.alias, settings, functools.partial(connector, job), sudo=t.user != "root"))
    return out


@guarded
def run_checks(c, flags: dict, extra_args: list[str] | None = None) -> int:
    """Every host reachable with a known key first (in parallel, one line per problem); then the
    checks, over connections that check the host key again: they never go through testinfra's."""
    from .checks.plugin import CheckHosts, main

    work = jobs(c, flags)
    printer = Printer()

    def verify(job: Job) -> HostResult:
        _connect(job, c).conn.close()
        return HostResult(job.target.alias)

    _exit_for_failures(run_fleet(work, lambda j: j.target.alias, verify), printer)
    paths = [str(Path(__file__).parent / "checks")]
    paths += sorted({str(j.settings.checks) for j in work if j.settings.checks.is_dir()})
    hosts = CheckHosts(check_hosts(work, lambda job: _connect(job, c)))
    code = main(hosts, paths, project(c), extra_args)
    _exit_for_failures([HostResult(alias, error=str(e), code=e.code) for alias, e in hosts.errors().items()],
                       printer)
    if code != 0:
        raise Exit(code=code)
    return 0


@guarded
def show_inventory(c) -> None:
    for t in targets(c):
        secrets.remember(cfg.secret_values(t.vars))
        extra = " ".join(f"{k}={v}" for k, v in sorted(t.vars.items()))
        print(secrets.mask(f"{t.alias:<16} {t.address:<32} key={t.key or '-'} {extra}".rstrip()))


# -- sandbox ------------------------------------------------------------------
def _sandbox():
    from .sandbox import Sandbox, can_run

    reason = can_run()
    if reason:
        raise ProvisionError(f"cannot run sandbox droplets here: {reason}")
    return Sandbox()


def _write_sandbox_inventory(sb, c) -> Path:
    path = project(c) / SANDBOX_INVENTORY
    path.parent.mkdir(exist_ok=True)
    path.write_text(sb.inventory())
    return path


@guarded
def sandbox_up(c, names: list[str]) -> list:
    sb = _sandbox()
    sb.prepare()
    out = []
    for name in names:
        t0 = time.monotonic()
        d = sb.up(name)
        out.append(d)
        print(f"{d.name}: up at {d.address} in {time.monotonic() - t0:.1f}s  "
              f"(ssh -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} root@{d.address})")
    inv = _write_sandbox_inventory(sb, c)
    print(f"inventory: {inv} (use -H {names[0] if names else 'sandbox'} or -H sandbox)")
    return out


@guarded
def sandbox_down(c, names: list[str], everything: bool = False) -> None:
    sb = _sandbox()
    gone = sb.down_all() if everything else [n for n in names if sb.down(n)]
    for n in names:
        if n not in gone and not everything:
            print(f"{n}: no such droplet", file=sys.stderr)
    for n in gone:
        print(f"{n}: destroyed")
    _write_sandbox_inventory(sb, c)


@guarded
def sandbox_list(c) -> None:
    sb = _sandbox()
    for d in sb.list():
        state = "running" if d.running() else "stopped"
        print(f"{d.name:<16} {d.address:<15} {state:<8} pid={d.pid} key={sb.key}")


@guarded
def sandbox_info(name: str) -> None:
    sb = _sandbox()
    d = sb.get(name)
    if d is None or not d.running():
        raise ProvisionError(f"no running droplet {name!r}; start it with `fab sandbox.up --name {name}`")
    print(f"URL:  http://{d.address}/")
    print(f"SSH:  ssh -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} root@{d.address}")
    print(f"Stop: fab sandbox.down --name {name}")


DONE = {"deploy": "deployed", "rollback": "rolled back to", "refused": "REFUSED"}  # release log actions


@guarded
def show_releases(c) -> None:
    for job in jobs(c, {}):
        s = job.settings
        remote = _connect(job, c)
        try:
            facts = gather(remote, [("ls", s.layout.releases), ("content", log_path(s)),
                                    ("file", s.layout.current)])
        finally:
            remote.conn.close()
        live, history = current_release(s, facts), History.read(facts.content(log_path(s)))
        names = releases_on_host(s, facts)
        print(f"{job.target.alias}: {len(names)} release(s) in {s.layout.releases}")
        for n in names:
            e = history.first.get(n)  # none: the log never saw it go live or be refused
            what = (f"{DONE.get(e.get('action'), '')} {e.get('time')} by {e.get('by') or '?'}" if e
                    else "NEVER LIVE")
            print(f"  {'*' if n == live else ' '} {n:<40} {what}".rstrip())


def _exit_for_failures(results: list[HostResult], printer: Printer) -> None:
    for r in results:
        if r.failed:
            printer.error(r.error)
    code = exit_code(results)
    if code:
        raise Exit(code=code)


@guarded
def show_status(c) -> None:
    printer = Printer()

    def one(job: Job) -> HostResult:
        s = job.settings
        units = [*(s.layout.unit(slot) for slot in SLOTS), "nginx"]
        remote = _connect(job, c)
        try:
            facts = gather(remote, [("file", s.layout.current), ("content", log_path(s)),
                                    ("content", s.layout.upstream_file), ("content", "/proc/uptime"), ("os", "")]
                           + [("service", u) for u in units])
        finally:
            remote.conn.close()
        slot = s.layout.live_slot(facts.content(s.layout.upstream_file))
        states, down = [], []
        for u in units:
            st = facts.service(u) or {}
            if st.get("active") or u == "nginx" or (slot and u == s.layout.unit(slot)):
                states.append(f"{u} {'running' if st.get('active') else 'STOPPED'}")
                if not st.get("active"):
                    down.append(u)
        log = (facts.content(log_path(s)) or "").strip().splitlines()
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
    _exit_for_failures(results, printer)


@guarded
def show_logs(c, follow: bool = False, lines: int = 20) -> None:
    printer = Printer()

    def one(job: Job) -> HostResult:
        s, label = job.settings, job.target.alias
        f = " -f" if follow else ""
        units = " ".join(f"-u {u}" for u in (*(s.layout.unit(slot) for slot in SLOTS), "nginx"))
        cmd = (f"journalctl {units} -n {lines} --no-pager -o short-iso{f} & "
               f"tail -q -n {lines}{' -F' if follow else ''} {s.layout.access_log} {s.layout.error_log} "
               "2>/dev/null & wait")
        remote = _connect(job, c)
        try:
            remote.exec(f"{remote.sudo}bash -c {shlex.quote(cmd)}", on_line=lambda l: printer.line(f"{label} | {l}"))
        finally:
            remote.conn.close()
        return HostResult(label)

    work = jobs(c, {})
    results = run_fleet(work, lambda j: j.target.alias, one, parallel=max(1, len(work)))
    _exit_for_failures(results, printer)
