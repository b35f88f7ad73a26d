"""The one place that acts: runs a list of steps against a host.

Round trips per host: one to gather every fact, one to apply every change (none when nothing
changes); a dry run applies nothing, and gathers what its diffs need (old contents) in its
second, if they need anything. The result carries what happened per step for the summary.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ProvisionError
from .facts import Facts, gather
from .output import Printer
from .lock import Lock, describe_holder
from .script import SHOW, build_script, loader, parse_report
from .upload import describe, megabytes
from .steps import Planned, Recipe, Step, Steps, plan

if TYPE_CHECKING:  # the host's own deploys (a push) run with provision.local's transport: no SSH there
    from .ssh import Remote


@dataclass
class HostResult:
    host: str
    planned: list[Planned] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    failed_step: int | None = None
    error: str = ""
    duration: float = 0.0
    round_trips: int = 0
    code: int = 1  # exit code this host's failure stands for
    skipped: bool = False
    outcome: str = ""  # in a fleet transaction: switched, reverted, aborted, refused, ...

    @property
    def changed(self) -> int:
        return sum(1 for i, p in enumerate(self.planned) if p.status == "change" and i in self.done)

    @property
    def ok(self) -> int:
        return sum(1 for i, p in enumerate(self.planned) if p.status != "change" and
                   (p.change is None or i in self.done))

    @property
    def failed(self) -> bool:
        return bool(self.error)

    def changed_steps(self) -> list[str]:
        return [p.step.name for i, p in enumerate(self.planned) if p.status == "change" and i in self.done]


def upload_progress(printer: Printer, label: str, what: str, first: float = 1.0, every: float = 2.0):
    """What shows an upload's progress: a line once it has taken ``first`` seconds, then one every
    ``every`` seconds while it goes on."""
    start = time.monotonic()
    shown = [start - every + first]

    def sent(n: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= every:
            shown[0] = now
            printer.line(f"{label} | uploading {what}: {megabytes(n)} sent ({megabytes(n / (now - start))}/s)")
    return sent


def run_steps(remote: Remote, recipe: Recipe | list[Step], *, dry_run: bool = False, printer: Printer | None = None,
              env: dict[str, str] | None = None, lock: Lock | None = None, _retry: bool = True) -> HostResult:
    """Gather the facts, decide the target and plan every step, then apply (or, in a dry run,
    show) the changes."""
    printer = printer or Printer()
    start = time.monotonic()
    result = HostResult(remote.label)
    if not isinstance(recipe, Recipe):
        recipe = Steps(recipe)
    facts = gather(remote, [("os", ""), *recipe.facts()])
    osf = facts[("os", "")]
    if not (osf["apt"] and osf["systemd"]):
        missing = " and ".join(w for w, ok in (("apt", osf["apt"]), ("systemd", osf["systemd"])) if not ok)
        raise ProvisionError(f"{remote.label}: unsupported OS ({osf['id'] or 'unknown'} {osf['version']}): no "
                             f"{missing}; provision manages Debian and Ubuntu hosts with apt and systemd")
    try:
        result.planned = planned = plan(recipe.steps(recipe.target(facts)), facts)
    except ProvisionError as e:  # found while planning, before anything was applied
        raise ProvisionError(f"{remote.label}: {e}", e.code) from None
    for note in recipe.notes(facts) if _retry else ():
        printer.line(f"{remote.label}: {note}")
    if dry_run:
        # What the diffs need beyond the plan's facts (old contents): one more round trip at most
        changing = [p for p in planned if p.status == "change"]
        wanted = list(dict.fromkeys(f for p in changing for f in p.step.diff_facts(facts)))
        more = gather(remote, wanted) if wanted else Facts({})
        for p in planned:
            printer.step(remote.label, "would" if p.status == "change" else p.status, p)
            d = p.step.show_diff(facts, more) if p.status == "change" else ""
            if d:
                printer.line(d.rstrip("\n"))
        result.duration = time.monotonic() - start
        result.round_trips = remote.round_trips
        return result
    for p in planned:  # what is already as desired, known before anything runs
        if p.change is None:
            printer.step(remote.label, "ok", p)
    if any(p.change is not None for p in planned):
        script = build_script(planned, env, lock)

        def progress(line: str) -> None:  # a line per step as it completes: every done step passes here
            if line.startswith(SHOW):
                printer.line(f"{remote.label} | {line[len(SHOW):]}")
            elif line.startswith("@@ok "):
                i = int(line.split()[1])
                p = planned[i]
                printer.step(remote.label, "ok" if p.change.check else "changed", p, parse_report(line).seconds.get(i))

        uploads = [p.change.upload for p in planned if p.change is not None and p.change.upload is not None]
        if len(uploads) > 1:
            raise ValueError("one upload per apply: the steps' files go in one stream")
        data = script.encode()
        if uploads:
            stream, size = uploads[0].open()
            with stream:
                rc, out, err = remote.exec(f"{remote.sudo}bash -c {shlex.quote(loader(len(data), size))}",
                                           data, timeout=1800, on_line=progress, then=stream,
                                           on_sent=upload_progress(printer, remote.label, describe(uploads[0])))
            if uploads[0].failures:
                raise ProvisionError(f"{remote.label}: {uploads[0].failures[0]}", uploads[0].failures[0].code)
        else:
            rc, out, err = remote.exec(f"{remote.sudo}bash -s", data, timeout=1800, on_line=progress)
        report = parse_report(out)
        resend = (report.resend and report.rc == 75 and report.failed is not None
                  and planned[report.failed].change.upload is not None)
        if resend and _retry and recipe.resend_all() is not None:
            printer.line(f"{remote.label}: files of the live release were changed on the host since provision "
                         "wrote them; sending the whole release")
            return run_steps(remote, recipe.resend_all(), dry_run=dry_run, printer=printer, env=env, lock=lock,
                             _retry=False)
        if report.waited and _retry:
            # An interrupted deploy finished its step meanwhile: plan again from fresh facts.
            printer.line(f"{remote.label}: waited for an interrupted deploy to finish its step; planning again")
            return run_steps(remote, recipe, dry_run=dry_run, printer=printer, env=env, lock=lock, _retry=False)
        result.done = report.done
        if report.stale is not None:
            printer.line(f"{remote.label}: took over the deploy lock left by {describe_holder(report.stale)}")
        if report.locked_by is not None:
            result.error = (f"{remote.label}: another deploy holds the lock: {describe_holder(report.locked_by)}; "
                            "wait for it, or if it is stuck re-run with --break-lock")
        elif rc != 0:
            result.failed_step = report.failed
            if report.failed is not None:
                name = planned[report.failed].step.name
                result.error = (f"{remote.label}: step `{name}` failed (exit {report.rc})"
                                + (f"\n  command: {report.command}" if report.command else "")
                                + ("\n  " + report.output.replace("\n", "\n  ") if report.output else ""))
            else:
                result.error = f"{remote.label}: remote script failed (exit {rc}): {err.strip()[-500:]}"
    if result.failed_step is not None:
        printer.step(remote.label, "FAILED", planned[result.failed_step])
    result.duration = time.monotonic() - start
    result.round_trips = remote.round_trips
    if result.error:
        printer.line(result.error)
    return result
