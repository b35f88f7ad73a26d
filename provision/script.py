"""Turn a plan into one remote bash script, and read its report back.

Each change becomes a function run in a ``set -e`` subshell with its output
captured; the script prints ``@@ok N`` per change and stops at the first
failure with ``@@fail N RC``, the failing command and the tail of the output.
The body is wrapped in ``main`` so bash has read all of it before anything
runs (commands cannot swallow the script from stdin).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .steps import Planned

PRELUDE = """\
set -u -o pipefail
export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
__log=$(mktemp)
trap 'rm -f "$__log"*' EXIT
declare -A __bgpid=() __bgt0=()
__run() { ( set -eE; trap 'echo "@@command: $BASH_COMMAND" >&2' ERR; "s$1" ); }
__done() {  # step, rc, start time, log
  if [ "$2" -eq 0 ]; then echo "@@ok $1 $3 ${EPOCHREALTIME:-0}"; return; fi
  echo "@@fail $1 $2"; grep -a '^@@command: ' "$4" | tail -n 1
  grep -av '^@@command: ' "$4" | tail -n 40 | sed 's/^/@@out /'
  wait; exit "$2"  # let background steps finish: nothing left running behind the report
}
__step() { local t0=${EPOCHREALTIME:-0}; __run "$1" >"$__log" 2>&1; __done "$1" $? "$t0" "$__log"; }
__bg() { __bgt0[$1]=${EPOCHREALTIME:-0}; __run "$1" >"$__log.$1" 2>&1 & __bgpid[$1]=$!; }
__join() {
  local i rc
  for i in "${!__bgpid[@]}"; do
    wait "${__bgpid[$i]}"; rc=$?; unset "__bgpid[$i]"; __done "$i" "$rc" "${__bgt0[$i]}" "$__log.$i"
  done
}
"""


def build_script(planned: list[Planned], env: dict[str, str] | None = None) -> str:
    parts = [PRELUDE]
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


@dataclass
class Report:
    done: set[int]
    seconds: dict[int, float] = field(default_factory=dict)
    failed: int | None = None
    rc: int = 0
    command: str = ""
    output: str = ""


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
        elif line.startswith("@@command: "):
            r.command = line[len("@@command: "):]
        elif line.startswith("@@out "):
            out.append(line[len("@@out "):])
    r.output = "\n".join(out)
    return r
