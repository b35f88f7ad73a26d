"""Turn a plan into one remote bash script, and read its report back.

Each change becomes a function run in a ``set -e`` subshell with its output
captured; the script prints ``@@ok N`` per change (after the lines of its output that start
with ``@@show ``: what a step shows even when it succeeds) and stops at the first
failure with ``@@fail N RC``, the failing command and the tail of the output.
The body is wrapped in ``main`` so bash has read all of it before anything
runs (commands cannot swallow the script from stdin).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .steps import Planned

if TYPE_CHECKING:
    from .lock import Lock

SHOW = "@@show "  # a line of a step's output shown as it is, once the step is done

PRELUDE = """\
set -u -o pipefail
export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
__log=$(mktemp -d)/step
# run by the loader: $1 is the root-only folder holding this script and the upload sent with it
__spool=${1:-}
__upload=${__spool:+$__spool/upload}
__gone=("${__log%/step}" ${__spool:+"$__spool"})  # what the script leaves behind: nothing
trap 'rm -rf "${__gone[@]}"' EXIT
declare -A __bgpid=() __bgt0=()
__run() { ( exec 9>&-; set -eE; trap 'echo "@@command: ${BASH_COMMAND%%$'"'"'\n'"'"'*}" >&2' ERR; "s$1" ); }
# The client went away (Ctrl-C, dropped connection, killed): let running steps
# finish, so the host is left with complete states only, then stop.
trap 'wait; exit 141' PIPE HUP TERM
__done() {  # step, rc, start time, log
  # a step's own lines to show (the release command's output), then its report
  if [ "$2" -eq 0 ]; then grep -a '^@@show ' "$4"; echo "@@ok $1 $3 ${EPOCHREALTIME:-0}"; return; fi
  echo "@@fail $1 $2"; grep -a '^@@command: ' "$4" | tail -n 1
  grep -av '^@@command: ' "$4" | tail -n 60 | sed 's/^/@@out /'
  wait; exit "$2"  # let background steps finish: nothing left running behind the report
}
__step() { local t0=${EPOCHREALTIME:-0}; __run "$1" >"$__log" 2>&1; __done "$1" $? "$t0" "$__log"; }
__bg() { __bgt0[$1]=${EPOCHREALTIME:-0}; __run "$1" >"$__log.$1" 2>&1 9>&- & __bgpid[$1]=$!; }
__join() {
  local i rc
  for i in "${!__bgpid[@]}"; do
    wait "${__bgpid[$i]}"; rc=$?; unset "__bgpid[$i]"; __done "$i" "$rc" "${__bgt0[$i]}" "$__log.$i"
  done
}
"""


def build_script(planned: list[Planned], env: dict[str, str] | None = None, lock: Lock | None = None) -> str:
    parts = [PRELUDE]
    if lock:
        parts.append(lock.script())
    for k, v in (env or {}).items():
        parts.append(f"export {k}={shlex.quote(v)}\n")
    body = []
    pending = False  # background changes not yet joined
    for i, p in enumerate(planned):
        if p.change is None:
            continue
        parts.append(f"s{i}() {{\n" + "\n".join(p.change.commands) + "\n}\n")
        if pending and p.step.barrier:
            body.append("  __join\n")
            pending = False
        body.append(f"  __bg {i}\n" if p.change.background else f"  __step {i}\n")
        pending |= p.change.background
    body.append("  __join\n")
    parts.append("main() {\n" + "".join(body) + "}\nmain </dev/null\n")
    return "".join(parts)


def loader(script_size: int, upload_size: int | None) -> str:
    """The command that runs a script sent with an upload: the first ``script_size`` bytes of its
    input are the script, the rest the upload (``upload_size`` bytes, when known: else gzip's own
    end and checksum tell a cut stream), spooled into a folder only root reads (on disk:
    /var/tmp, not a RAM-backed /tmp); then the script runs (bash reads a script file in blocks:
    a script piped in it reads a byte at a time)."""
    check = ("" if upload_size is None else f'if [ "$(stat -c %s "$d/upload")" != {upload_size} ]; then '
             'rm -rf "$d"; echo "upload cut short" >&2; exit 141; fi; ')
    return ("set -eu; d=$(mktemp -d -p /var/tmp provision.XXXXXXXXXX); "
            f'head -c {script_size} > "$d/script"; cat > "$d/upload"; {check}'
            'exec bash "$d/script" "$d"')


@dataclass
class Report:
    done: set[int]
    seconds: dict[int, float] = field(default_factory=dict)
    failed: int | None = None
    rc: int = 0
    command: str = ""
    output: str = ""
    locked_by: dict | None = None  # the lock was held by this holder
    waited: bool = False  # waited for a holder whose client died; nothing was applied
    stale: dict | None = None  # a dead holder's lock was taken over (or broken)
    resend: bool = False  # a step could not reuse the host's copy of some files: send them all


def parse_report(stdout: str) -> Report:
    r = Report(done=set())
    out = []
    for line in stdout.splitlines():
        if line.startswith("@@ok "):
            _, i, *times = line.split()
            r.done.add(int(i))
            if len(times) == 2:
                r.seconds[int(i)] = max(0.0, float(times[1]) - float(times[0]))
        elif line.startswith("@@fail "):
            _, i, rc = line.split()
            r.failed, r.rc = int(i), int(rc)
        elif line.startswith("@@waited"):
            r.waited = True
        elif line.startswith(("@@locked", "@@stale", "@@broken")):
            word, _, raw = line.partition(" ")
            try:
                holder = json.loads(raw) if raw.strip() else {}
            except ValueError:
                holder = {"raw": raw}
            if word == "@@locked":
                r.locked_by = holder
            else:
                r.stale = holder
        elif line.startswith("@@command: "):
            r.command = line[len("@@command: "):]
            if len(r.command) > 160:
                r.command = r.command[:157] + "..."
        elif line.startswith("@@out "):
            out.append(line[len("@@out "):])
            r.resend |= out[-1].startswith("@@resend ")
    r.output = "\n".join(out)
    return r
