"""Output: everything a run prints goes through :class:`Printer` (secrets masked in every line):
a line per step and host, the host's summary line, and the table that ends a run."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from . import secrets
from .steps import Planned

if TYPE_CHECKING:
    from .runner import HostResult


class Printer:
    """All output of a run goes through here, so that secrets are masked in every line."""

    def __init__(self, stream=None, verbose: bool = False):
        self.stream = stream or sys.stdout
        self.verbose = verbose
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:  # hosts run in threads: one whole line at a time
            print(secrets.mask(text), file=self.stream, flush=True)

    def error(self, text: str) -> None:
        """A host's one-line problem (unreachable, refused key, ...), on stderr."""
        with self._lock:
            print(secrets.mask(f"error: {text}"), file=sys.stderr, flush=True)

    def step(self, host: str, status: str, p: Planned, seconds: float | None = None) -> None:
        summary = f" ({p.change.summary})" if p.change is not None and p.change.summary else ""
        timing = f" [{seconds:.2f}s]" if self.verbose and seconds is not None else ""
        self.line(f"{host}: {status:<7} {p.step.name}{summary}{timing}")
        if self.verbose and p.change is not None:
            for c in p.change.commands:
                if "__PROVISION_EOF__" in c:  # a payload: show the command, not the data
                    c = c.split("\n", 1)[0] + " … (payload)"
                lines = c.split("\n")
                if len(lines) > 4:  # an inline script: its first and last lines say what it is
                    lines = [lines[0], f"… ({len(lines) - 2} more lines)", lines[-1]]
                self.line("    $ " + "\n      ".join(lines))


def summary_table(results: list[HostResult], printer: Printer, json_file: str | None = None) -> None:
    """The per-host table that ends a run, and the same as JSON for CI (``--json FILE``)."""
    printer.line(f"{'host':<20} {'ok':>4} {'changed':>8} {'failed':>7} {'time':>7}")
    for r in results:
        state = " skipped" if r.skipped else f" {r.outcome}" if r.outcome else ""
        printer.line(f"{r.host:<20} {r.ok:>4} {r.changed:>8} {int(r.failed):>7} {r.duration:>6.1f}s{state}")
    if json_file:
        Path(json_file).write_text(secrets.mask(json.dumps([
            {"host": r.host, "ok": r.ok, "changed": r.changed, "failed": r.failed, "duration": round(r.duration, 3),
             "round_trips": r.round_trips, "changed_steps": r.changed_steps(), "error": r.error,
             **({"outcome": r.outcome} if r.outcome else {})}
            for r in results], indent=2)) + "\n")


def summary_line(r: HostResult, dry_run: bool) -> str:
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
