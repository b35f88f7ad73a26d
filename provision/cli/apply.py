"""deploy, provision and rollback: plan every host locally, then run each host's steps, in
parallel, in rolling batches when asked."""

from __future__ import annotations

import getpass
import socket
import time

from invoke import Exit

from .. import config as cfg
from ..app import Deploy, Rollback, provision_steps, proxy_env
from ..errors import ProvisionError
from ..fleet import DEFAULT_PARALLEL, exit_code, run_fleet
from ..hosts import inventory_paths, jobs, project
from ..output import Printer, summary_line, summary_table
from ..runner import HostResult, run_steps
from ..lock import Lock
from ..render import NAMES as TEMPLATES
from ..source import PROJECT_FILES, deploy_files, scan, untracked_note
from . import connect_job, guarded


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
    plans, sources, readers = [], {}, {}
    for job in work:  # decide everything locally before touching any host
        s = job.settings
        if mode == "deploy":
            own = [*(project(c) / f for f in PROJECT_FILES), *inventory_paths(c), *(s.templates / n for n in TEMPLATES)]
            key = (s.source, deploy_files(s.source, own), tuple((p, deploy_files(p, own)) for p in s.include))
            source = sources[key] = sources.get(key) or scan(*key)
            readers.setdefault(key, []).append(job.target.alias)
            rid = source.release_id()
            steps = Deploy(s, source, rid, deployer())
        elif mode == "rollback":
            rid = to or "previous release"
            steps = Rollback(s, to, deployer())
        else:
            rid, steps = "-", provision_steps(s)
        plans.append((job, steps, lock_for(s, mode, rid, break_lock)))
    printer = Printer(verbose=verbose)
    for key, hosts in readers.items():  # once per source, before any host is touched
        note = untracked_note(sources[key])
        if note:
            printer.line(f"{', '.join(hosts[:3])}{f' and {len(hosts) - 3} more' if len(hosts) > 3 else ''}: {note}")

    def one(plan) -> HostResult:
        job, steps, lock = plan
        t0 = time.monotonic()
        remote = None
        try:
            remote = connect_job(job, c, fleet.get("accept_new_host_key", False))
            r = run_steps(remote, steps, dry_run=dry_run, printer=printer, env=proxy_env(job.settings), lock=lock)
        except ProvisionError as e:  # this host's problem; the others go on
            printer.error(str(e))
            r = HostResult(job.target.alias, error=str(e), code=e.code)
        finally:
            if remote is not None:
                remote.conn.close()
        r.duration = time.monotonic() - t0
        if remote is not None:
            printer.line(summary_line(r, dry_run))
            if verbose:
                printer.line(f"{r.host}: {remote.round_trips} SSH round trip(s)")
        return r

    results = run_fleet(plans, lambda p: p[0].target.alias, one, parallel=fleet.get("parallel") or DEFAULT_PARALLEL,
                        serial=fleet.get("serial"), max_fail=fleet.get("max_fail", 0),
                        on_skip=lambda h: printer.line(f"{h}: skipped (an earlier batch failed; see --max-fail)"))
    if verbose:
        printer.line(f"total {time.monotonic() - start:.2f}s")
    summary_table(results, printer, json_file)
    code = exit_code(results)
    if code:
        raise Exit(code=code)
    return results
