"""`fab logs`: what ``--since`` means (one absolute UTC time, parsed here) and the one command that
prints a host's lines: the journal of the app's units and nginx's log files, each chosen on the
host (``--since`` by their timestamps, ``--grep`` by ``grep -E``) so unmatched lines never cross
the wire. Pure: settings and words in, a shell command out."""

from __future__ import annotations

import re
import shlex
from datetime import datetime, timedelta, timezone

from . import remote
from .errors import ProvisionError

AGO_RE = re.compile(r"(\d{1,6})\s*(s|m|min|h|d|w)")
UNIT_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d")
SINCE_HELP = "expected 10m, 2h, 1d, today, yesterday or a UTC time like 2026-11-24 05:00"


def parse_since(text: str, now: datetime) -> datetime:
    """The UTC time ``--since`` names: ``10m``/``2h``/``1d``/``1w`` ago, ``today``/``yesterday`` (UTC
    midnight), ``now``, or a date and time (UTC; a trailing ``Z`` or `` UTC`` allowed)."""
    word = " ".join(str(text).split()).lower()
    now = now.astimezone(timezone.utc)
    found = AGO_RE.fullmatch(word.removesuffix(" ago"))
    if found:
        return now - timedelta(seconds=int(found.group(1)) * UNIT_SECONDS[found.group(2)])
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word in ("today", "yesterday", "now"):
        return {"today": midnight, "yesterday": midnight - timedelta(days=1), "now": now}[word]
    stamp = re.sub(r"(z| utc)$", "", word).upper()
    for fmt in FORMATS:
        try:
            return datetime.strptime(stamp, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise ProvisionError(f"--since {text!r}: {SINCE_HELP}")


def grep_problem(pattern: str) -> str | None:
    if not pattern or "\n" in pattern or "\0" in pattern:
        return "expected one line of an extended regular expression (grep -E)"
    return None


def journal_since(when: datetime) -> str:
    """``when`` as journalctl --since takes it (systemd.time: a UTC time)."""
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def command(units: list[str], files: list[str], lines: int, follow: bool, since: datetime | None = None,
            grep: str | None = None) -> str:
    """The bash command that prints the last ``lines`` lines of the units' journal and of ``files``
    (since ``since``, matching ``grep``), then, with ``follow``, new ones as they come."""
    if grep is not None and grep_problem(grep):
        raise ProvisionError(f"--grep {grep!r}: {grep_problem(grep)}")
    match = f" | grep -E --line-buffered -e {shlex.quote(grep)}" if grep is not None else ""
    last = f" | tail -n {lines}" if grep is not None and not follow else ""
    journal = "journalctl " + " ".join(f"-u {shlex.quote(u)}" for u in units) + " --no-pager -o short-iso"
    journal += f" --since {shlex.quote(journal_since(since))}" if since else ""
    # with grep, the last matching lines: the journal's count is taken after grep (unless following)
    journal += (f" -n {lines}" if grep is None or follow else "") + (" -f" if follow else "") + match + last
    parts = [journal]
    if files:
        paths = " ".join(shlex.quote(f) for f in files)
        keep = (" | " + remote.python("log_filter.py", {"since": since.timestamp()})) if since else ""
        if follow or grep is None:
            tail = f"tail -q -n {lines}{' -F' if follow else ''} {paths} 2>/dev/null{keep}{match}"
        else:  # the last matching lines of each file
            tail = f"for f in {paths}; do grep -hE -e {shlex.quote(grep)} \"$f\" 2>/dev/null{keep} | tail -n {lines}; done"
        parts.append(tail)
    return " & ".join(parts) + " & wait" if len(parts) > 1 else parts[0]
