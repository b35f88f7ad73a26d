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
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the earliest --since
SINCE_HELP = "expected 10m, 2h, 1d, today, yesterday or a UTC time like 2026-11-24 05:00"


def parse_since(text: str, now: datetime) -> datetime:
    """The UTC time ``--since`` names: ``10m``/``2h``/``1d``/``1w`` ago, ``today``/``yesterday`` (UTC
    midnight), ``now``, or a date and time (UTC; a trailing ``Z`` or `` UTC`` allowed)."""
    word = " ".join(str(text).split()).lower()
    now = now.astimezone(timezone.utc)
    found = AGO_RE.fullmatch(word.removesuffix(" ago"))
    if found:
        try:
            return max(EPOCH, now - timedelta(seconds=int(found.group(1)) * UNIT_SECONDS[found.group(2)]))
        except OverflowError:  # before the year 1 (999999w): before anything logged
            return EPOCH
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if word in ("today", "yesterday", "now"):
        return {"today": midnight, "yesterday": midnight - timedelta(days=1), "now": now}[word]
    stamp = re.sub(r"(z| utc)$", "", word).upper()
    for fmt in FORMATS:
        try:  # before 1970, nothing was logged (and journalctl takes no such time): 1970
            return max(EPOCH, datetime.strptime(stamp, fmt).replace(tzinfo=timezone.utc))
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
    (since ``since``, matching ``grep``), then, with ``follow``, new ones as they come. Its exit code:
    2 when the host's grep -E refuses ``grep`` (grep's message on stderr), else journalctl's (its own
    message on stderr); nginx's files may be missing (nothing to show)."""
    if grep is not None and grep_problem(grep):
        raise ProvisionError(f"--grep {grep!r}: {grep_problem(grep)}")
    pattern = shlex.quote(grep) if grep is not None else ""
    match = f" | grep -E --line-buffered -e {pattern}" if grep is not None else ""
    last = f" | tail -n {lines}" if grep is not None and not follow else ""
    journal = "journalctl " + " ".join(f"-u {shlex.quote(u)}" for u in units) + " --no-pager -o short-iso"
    journal += f" --since {shlex.quote(journal_since(since))}" if since else ""
    # with grep, the last matching lines: the journal's count is taken after grep (unless following)
    journal += (f" -n {lines}" if grep is None or follow else "") + (" -f" if follow else "") + match + last
    if match or last:  # the pipeline's status is journalctl's (grep's 1 is "no line matched")
        journal = f'{{ {journal}; exit "${{PIPESTATUS[0]}}"; }}'
    # the pattern first, as this host's grep -E takes it: a bad one is one line and exit 2, not silence
    check = (f'e=$(grep -E -e {pattern} 2>&1 </dev/null); [ $? -le 1 ] || {{ echo "${{e:-grep -E failed}}" >&2; '
             f'exit 2; }}; ' if grep is not None else "")
    if not files:
        return check + journal
    paths = " ".join(shlex.quote(f) for f in files)
    # --since: each file's lines kept by their own times, the filter's state starting afresh in each
    keep = (" | " + remote.python("log_filter.py", {"since": since.timestamp(), "headers": follow})) if since else ""
    if follow:  # one tail for all: with --since its ==> file <== headers tell the filter where each begins
        tail = f"tail -n {lines} -F{'' if since else ' -q'} {paths} 2>/dev/null{keep}{match}"
    elif grep is None:
        tail = f'for f in {paths}; do tail -n {lines} "$f" 2>/dev/null{keep}; done'
    else:  # the last matching lines of each file
        tail = f'for f in {paths}; do grep -hE -e {pattern} "$f" 2>/dev/null{keep} | tail -n {lines}; done'
    # each waited for on its own: the journal's status is the command's
    return check + f"{journal} & j=$!; {tail} & f=$!; wait $j; s=$?; wait $f; exit $s"
