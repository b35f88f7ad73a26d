"""deploy, provision and rollback: plan every host locally, then run each host's steps, in
parallel, in rolling batches when asked.

A deploy of more than one host is one transaction (``--no-atomic``: each host on its own):

1. **prepare**, every host in parallel: the release uploaded, its virtualenv, its release command,
   a new instance healthy on its own socket in the idle slot; traffic untouched. A host with no
   traffic to move (nothing new) does its whole deploy here: a no-op deploy stays one round trip.
2. Unless more than ``--max-fail`` hosts failed, **commit** in ``--serial`` waves (all at once
   without): on fresh facts, the prepared instance takes the traffic (not restarted), the rest of
   the deploy and its final health check run; the old instance keeps running.
3. After each wave, a host that failed after switching goes back, and when more than
   ``--max-fail`` hosts have failed every switched host goes back to the release its idle slot
   still runs (**revert**, no restart) and every prepared one stops it (**abort**); after the last
   wave, the old instances stop (**finish**).

Each host's deploy lock is held from its first stage to its last (``provision/lock.py``), never
longer than fab's connection. Interrupted and re-run, a host whose idle slot runs the same release
(same source, virtualenv and configs) uses it: nothing is uploaded or built again. Which host does
what next is decided by ``provision.fleet.transaction_moves``, from where every host stands.
"""

from __future__ import annotations

import getpass
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from invoke import Exit

from .. import config as cfg
from .. import fleet as fl
from ..app import Commit, Deploy, Prepare, Revert, Rollback, Settle, prepares, provision_steps, proxy_env, switched
from ..errors import ProvisionError
from ..fleet import DEFAULT_PARALLEL, exit_code, run_fleet
from ..hosts import inventory_paths, jobs, project
from ..output import Printer, summary_line, summary_table
from ..runner import HostResult, run_steps
from ..lock import Lock
from ..render import NAMES as TEMPLATES
from ..source import PROJECT_FILES, Source, scan, source_key, untracked_note
from . import connect_job, guarded, host_failed, on_host


def deployer() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def lock_for(s: cfg.Settings, action: str, release: str, break_lock: bool) -> Lock:
    holder = {"user": getpass.getuser(), "machine": socket.gethostname(), "action": action, "release": release,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    return Lock(s.layout, holder, break_lock)


def own_files(c, s: cfg.Settings) -> list[Path]:
    """The deploy's own files (fabfile, Fabric's config, the inventories, provision's template
    overrides): never in a release, even where they lie inside the app's source."""
    return [*(project(c) / f for f in PROJECT_FILES), *inventory_paths(c), *(s.templates / n for n in TEMPLATES)]


def plan_hosts(c, flags: dict, *, mode: str = "deploy", break_lock: bool = False, to: str | None = None,
               origin: dict | None = None, source: Source | None = None,
               work: list | None = None) -> tuple[list, list[tuple[Source, list[str]]]]:
    """Every selected host's (job, steps, lock), decided locally, and each source read with the
    hosts that read it. ``source``: the app's files for every host (fab ship's tested export),
    instead of each host's ``app.source``; ``origin``: where the release comes from (its meta and
    the release log); ``work``: the jobs, already read (fab ship's)."""
    plans, sources, readers = [], {}, {}
    for job in jobs(c, flags) if work is None else work:  # decide everything locally before touching any host
        s = job.settings
        if mode == "deploy":
            if source is None:
                key = source_key(s, own_files(c, s))
                sources[key] = sources.get(key) or scan(*key)
                readers.setdefault(key, []).append(job.target.alias)
            app = sources[key] if source is None else source
            rid = app.release_id()
            steps = Deploy(s, app, rid, deployer(), origin)
        elif mode == "rollback":
            rid = to or "previous release"
            steps = Rollback(s, to, deployer())
        else:
            rid, steps = "-", provision_steps(s)
        plans.append((job, steps, lock_for(s, mode, rid, break_lock)))
    return plans, [(sources[key], hosts) for key, hosts in readers.items()]


@guarded
def run_apply(c, flags: dict, *, mode: str = "deploy", dry_run: bool = False, verbose: bool = False,
              json_file: str | None = None, break_lock: bool = False, to: str | None = None,
              fleet: dict | None = None, atomic: bool = True, origin: dict | None = None,
              source: Source | None = None, plans: list | None = None) -> list[HostResult]:
    """deploy, provision or rollback the selected hosts (``origin``, ``source``: see :func:`plan_hosts`).
    ``plans``: those :func:`plan_hosts` made already (fab ship's, made before its tests), deployed
    as they are: nothing is read again."""
    fleet = fleet or {}
    start = time.monotonic()
    if plans is None:
        plans, read = plan_hosts(c, flags, mode=mode, break_lock=break_lock, to=to, origin=origin, source=source)
    else:
        read = []
    printer = Printer(verbose=verbose)
    for app, hosts in read:  # once per source, before any host is touched
        note = untracked_note(app)
        if note:
            printer.line(f"{', '.join(hosts[:3])}{f' and {len(hosts) - 3} more' if len(hosts) > 3 else ''}: {note}")

    def one(plan) -> HostResult:
        job, steps, lock = plan
        r, remote = on_host(printer, job, c, fleet.get("accept_new_host_key", False), lambda remote: run_steps(
            remote, steps, dry_run=dry_run, printer=printer, env=proxy_env(job.settings), lock=lock))
        if remote is not None:
            printer.line(summary_line(r, dry_run))
            if verbose:
                printer.line(f"{r.host}: {remote.round_trips} SSH round trip(s)")
        return r

    if mode == "deploy" and atomic and not dry_run and len(plans) > 1:
        results = Transaction(c, plans, printer, fleet, verbose).run()
    else:
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


def merged(host: str, results: list[HostResult]) -> HostResult:
    """One host's stages as one result (its steps in turn, the last failure)."""
    out = HostResult(host)
    for r in results:
        out.done |= {i + len(out.planned) for i in r.done}
        if r.failed_step is not None:
            out.failed_step = r.failed_step + len(out.planned)
        out.planned += r.planned
        out.round_trips = max(out.round_trips, r.round_trips)
        if r.failed:
            out.error, out.code = r.error, r.code
    return out


def problem(r: HostResult) -> str:
    """What went wrong on a host in one line, without its name: the failed step and the first
    line of its output (the health check's verdict, say)."""
    first, *rest = r.error.splitlines()
    detail = next((line.strip() for line in rest if line.strip() and not line.strip().startswith("command:")), "")
    return first.removeprefix(r.host + ": ") + (f": {detail}" if detail else "")


class Transaction:
    """A deploy of many hosts as one transaction (see the module's docstring): the stages, run
    on every host over one connection each; what each host does next comes from
    ``fleet.transaction_moves``."""

    def __init__(self, c, plans, printer: Printer, fleet: dict, verbose: bool):
        self.c, self.printer, self.verbose = c, printer, verbose
        self.parallel = fleet.get("parallel") or DEFAULT_PARALLEL
        self.serial, self.max_fail = fleet.get("serial"), fleet.get("max_fail", 0)
        self.accept_new = fleet.get("accept_new_host_key", False)
        token = secrets.token_hex(16)
        self.hosts = [p[0].target.alias for p in plans]
        self.plans = {p[0].target.alias: (p[0], p[1], replace(p[2], transaction=token)) for p in plans}
        # states: where each host stands in the transaction (fleet.py); outcome: how it ended
        self.remotes, self.stages, self.states, self.outcome, self.notes = {}, {h: [] for h in self.hosts}, {}, {}, {}
        self.t0 = {}

    def each(self, hosts, fn) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(hosts)))) as pool:
            list(pool.map(fn, hosts))

    def stage(self, host: str, recipe, hold: bool) -> HostResult:
        job, _, lock = self.plans[host]
        try:
            r = run_steps(self.remotes[host], recipe, printer=self.printer, env=proxy_env(job.settings),
                          lock=lock.stage(hold))
        except ProvisionError as e:
            r = host_failed(self.printer, host, e)
        self.stages[host].append(r)
        return r

    def close(self, host: str) -> None:
        remote = self.remotes.pop(host, None)
        if remote is not None:
            if self.verbose:
                self.printer.line(f"{host}: {remote.round_trips} SSH round trip(s)")
            remote.close()

    def prepare(self, host: str) -> None:
        job, deploy, _ = self.plans[host]
        self.t0[host] = time.monotonic()
        try:
            self.remotes[host] = connect_job(job, self.c, self.accept_new)
        except ProvisionError as e:
            r = host_failed(self.printer, host, e)
            self.stages[host].append(r)
            self.states[host], self.notes[host] = fl.REFUSED, f"refused: {problem(r)}"
            return
        r = self.stage(host, Prepare(deploy), hold=True)
        if r.failed:
            self.states[host], self.notes[host] = fl.REFUSED, f"refused: {problem(r)}"
        elif prepares(r.planned):
            self.states[host] = fl.PREPARED
        else:
            self.states[host] = fl.READY
            self.notes[host] = summary_line(r, False).removeprefix(host + ": ")
        if self.states[host] != fl.PREPARED:
            self.close(host)

    def commit(self, host: str) -> None:
        r = self.stage(host, Commit(self.plans[host][1]), hold=True)
        if not r.failed:
            self.states[host] = fl.SWITCHED
        elif switched(r.planned, r.done):
            self.states[host], self.notes[host] = fl.BROKEN, f"failed after switching: {problem(r)}"
        else:
            self.states[host], self.notes[host] = fl.HALTED, f"not switched: {problem(r)}"

    def move(self, host: str, move: str) -> None:
        s, before = self.plans[host][0].settings, self.states[host]
        if move == fl.REVERT:
            recipe = Revert(s, None, deployer())
            r = self.stage(host, recipe, hold=False)
            why = self.notes.get(host, "the fleet failed")
            if r.failed or not recipe.to:
                self.outcome[host] = "revert failed"
                self.notes[host] = f"NOT reverted: {problem(r) if r.failed else 'no earlier release runs here'} ({why})"
            else:
                self.outcome[host], self.notes[host] = "reverted", f"reverted: back on {recipe.to} ({why})"
        elif move == fl.FINISH:
            recipe = Settle(s)
            r = self.stage(host, recipe, hold=False)
            self.outcome[host] = fl.SWITCHED if not r.failed else "finish failed"
            self.notes[host] = (f"switched to {recipe.live}" if not r.failed else
                                f"switched, but stopping the old release failed: {problem(r)}")
        else:
            recipe = Settle(s)
            r = self.stage(host, recipe, hold=False)
            self.outcome[host] = "aborted" if not r.failed else "abort failed"
            stays = (f"traffic stays on {recipe.live or 'nothing (no release was live)'}" if not r.failed else
                     f"traffic was not moved, but stopping the prepared release failed ({problem(r)})")
            self.notes[host] = (f"{self.notes[host]}; " if before == fl.HALTED else "prepared, aborted: ") + stays
        self.close(host)

    def run(self) -> list[HostResult]:
        self.each(self.hosts, self.prepare)
        waves = fl.batches([h for h in self.hosts if self.states[h] == fl.PREPARED], self.serial)
        done = set()
        for n in range(len(waves) + 1):
            last = n == len(waves) or fl.called_off(self.states, self.max_fail)
            moves = {h: m for h, m in fl.transaction_moves(self.states, self.max_fail, last).items() if h not in done}
            done |= set(moves)
            self.each(list(moves), lambda h: self.move(h, moves[h]))
            if last:
                break
            self.each(waves[n], self.commit)
        for h in list(self.remotes):
            self.close(h)
        off = fl.called_off(self.states, self.max_fail)
        results = []
        for h in self.hosts:
            r = merged(h, self.stages[h])
            r.duration = time.monotonic() - self.t0.get(h, time.monotonic())
            r.outcome = self.outcome.get(h, self.states[h])
            self.printer.line(f"{h}: {self.notes.get(h) or self.states[h]}")
            results.append(r)
        if off:
            failed = sum(1 for st in self.states.values() if st in fl.FAILED)
            self.printer.line(f"fleet: {failed} host(s) failed, more than --max-fail {self.max_fail}: the transaction "
                              "was called off, no host keeps the new release (each host's line says where it stands)")
        return results
