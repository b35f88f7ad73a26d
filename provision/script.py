"""Turn a plan into one remote bash script, and read its report back.

Each change becomes a function run in a ``set -e`` subshell with its output
captured; the script prints ``@@ok N`` per change and stops at the first
failure with ``@@fail N RC``, the failing command and the tail of the output.
The body is wrapped in ``main`` so bash has read all of it before anything
runs (commands cannot swallow the script from stdin).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .steps import Planned

PRELUDE = """\
set -u -o pipefail
export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
__log=$(mktemp)
trap 'rm -f "$__log"' EXIT
__step() {
  ( set -eE; trap 'echo "@@command: $BASH_COMMAND" >&2' ERR; "s$1" ) >"$__log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then echo "@@ok $1"; else
    echo "@@fail $1 $rc"; grep -a '^@@command: ' "$__log" | tail -n 1
    grep -av '^@@command: ' "$__log" | tail -n 40 | sed 's/^/@@out /'; exit $rc
  fi
}
"""


def build_script(planned: list[Planned], env: dict[str, str] | None = None) -> str:
    parts = [PRELUDE]
    for k, v in (env or {}).items():
        parts.append(f"export {k}={shlex.quote(v)}\n")
    body = []
    for i, p in enumerate(planned):
        if p.change is None:
            continue
        parts.append(f"s{i}() {{\n" + "\n".join(p.change.commands) + "\n}\n")
        body.append(f"  __step {i}\n")
    parts.append("main() {\n" + ("".join(body) or "  :\n") + "}\nmain </dev/null\n")
    return "".join(parts)


@dataclass
class Report:
    done: set[int]
    failed: int | None = None
    rc: int = 0
    command: str = ""
    output: str = ""


def parse_report(stdout: str) -> Report:
    r = Report(done=set())
    out = []
    for line in stdout.splitlines():
        if line.startswith("@@ok "):
            r.done.add(int(line.split()[1]))
        elif line.startswith("@@fail "):
            _, i, rc = line.split()
            r.failed, r.rc = int(i), int(rc)
        elif line.startswith("@@command: "):
            r.command = line[len("@@command: "):]
        elif line.startswith("@@out "):
            out.append(line[len("@@out "):])
    r.output = "\n".join(out)
    return r
