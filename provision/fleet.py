"""Many hosts at once: bounded parallelism, rolling batches, failures that stay per host."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from .errors import ProvisionError
from .runner import HostResult

T = TypeVar("T")
DEFAULT_PARALLEL = 50


def batches(items: Sequence[T], serial: int | None) -> list[list[T]]:
    """Rolling batches of ``serial`` hosts (all at once when serial is not set)."""
    if not serial or serial >= len(items):
        return [list(items)] if items else []
    return [list(items[i:i + serial]) for i in range(0, len(items), serial)]


def run_fleet(items: Sequence[T], label: Callable[[T], str], fn: Callable[[T], HostResult], *,
              parallel: int = DEFAULT_PARALLEL, serial: int | None = None, max_fail: int = 0,
              on_skip: Callable[[str], None] | None = None,
              on_interrupt: Callable[[], None] | None = None) -> list[HostResult]:
    """Run ``fn`` for every item, ``parallel`` at a time, batch after batch.

    A host's failure (a failed step, an unreachable host, a refused key) is its
    own: the others in its batch go on. After a batch with more than
    ``max_fail`` failed hosts in total, later batches are skipped. On Ctrl-C,
    ``on_interrupt`` runs before the batch's threads are waited for (closing
    their connections ends the commands they wait on).
    """

    def one(item: T) -> HostResult:
        try:
            return fn(item)
        except ProvisionError as e:
            return HostResult(label(item), error=str(e), code=e.code)

    results: list[HostResult] = []
    todo = batches(items, serial)
    for n, batch in enumerate(todo):
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(batch)))) as pool:
            try:
                results += list(pool.map(one, batch))
            except KeyboardInterrupt:
                if on_interrupt:
                    on_interrupt()
                raise
        failed = sum(1 for r in results if r.failed)
        if failed > max_fail and n + 1 < len(todo):
            for rest in todo[n + 1:]:
                for item in rest:
                    results.append(HostResult(label(item), error="skipped: an earlier batch failed", code=1,
                                              skipped=True))
                    if on_skip:
                        on_skip(label(item))
            break
    return results


# Where a host stands in a fleet transaction (provision/cli/apply.py), and what it does next.
READY = "ready"  # nothing to switch: its whole deploy ran in the first stage
PREPARED = "prepared"  # the new release healthy in its idle slot, traffic untouched
REFUSED = "refused"  # its first stage failed (a release that fails its health gate, a host unreachable)
SWITCHED = "switched"  # traffic moved, its checks passed, its old release still running
BROKEN = "broken"  # traffic moved, then its commit failed (its final check after switching)
HALTED = "halted"  # its commit failed before traffic moved
FAILED = (REFUSED, BROKEN, HALTED)
COMMIT, REVERT, ABORT, FINISH = "commit", "revert", "abort", "finish"


def called_off(states: dict[str, str], max_fail: int) -> bool:
    """More hosts failed than the fleet tolerates: no host may stay switched."""
    return sum(1 for st in states.values() if st in FAILED) > max_fail


def transaction_moves(states: dict[str, str], max_fail: int, last: bool) -> dict[str, str]:
    """What each host does now, from where every host stands (``last``: no wave is left to commit).

    A host that broke after switching goes back (its old release still runs), one that halted
    stops what it prepared; when the fleet is called off, every switched host goes back and
    every prepared one stops its release; after the last wave, every switched host stops its
    old release."""
    off = called_off(states, max_fail)
    moves = {}
    for host, st in states.items():
        if st == BROKEN or (off and st == SWITCHED):
            moves[host] = REVERT
        elif st == HALTED or (off and st == PREPARED):
            moves[host] = ABORT
        elif st == SWITCHED and last:
            moves[host] = FINISH
    return moves


def exit_code(results: Sequence[HostResult]) -> int:
    """0 all well; 1 a step failed somewhere; else the connection problem's code (2 or 3)."""
    codes = {r.code for r in results if r.failed}
    if not codes:
        return 0
    return 1 if 1 in codes else min(codes)
