"""Turn a plan into one remote bash script, and read its report back.

Each change becomes a function run in a ``set -e`` subshell with its output
captured; the script prints ``@@ok N`` per change and stops at the first
failure with ``@@fail N RC``, the failing command and the tail of the output.
The body is wrapped in ``main`` so bash has read all of it before anything
runs (commands cannot swallow the script from stdin).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from .steps import Planned

PRELUDE = """\
set -u -o pipefail
export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
__log=$(mktemp -d)/step
trap 'rm -rf "${__log%/step}"' EXIT
declare -A __bgpid=() __bgt0=()
__run() { ( set -eE; trap 'echo "@@command: ${BASH_COMMAND%%$'"'"'\n'"'"'*}" >&2' ERR; "s$1" ); }
# The client went away (Ctrl-C, dropped connection, killed): let running steps
# finish, so the host is left with complete states only, then stop.
trap 'wait; exit 141' PIPE HUP TERM
__done() {  # step, rc, start time, log
  if [ "$2" -eq 0 ]; then echo "@@ok $1 $3 ${EPOCHREALTIME:-0}"; return; fi
  echo "@@fail $1 $2"; grep -a '^@@command: ' "$4" | tail -n 1
  grep -av '^@@command: ' "$4" | tail -n 60 | sed 's/^/@@out /'
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


# The deploy lock is a transient systemd scope named after the app: the script moves itself
# into it, and systemd refuses a second one while any process of the first is alive. Only root
# can make scopes, so no one else can hold or forge the lock; every process a deploy starts
# (background steps included) is in it, so --break-lock stops exactly a real deploy, and the
# lock ends when the last of them does. Who holds it is written beside it, readable by root only.
LOCK = """\
__unit={unit}
__holder={holder}
__scope() {{
  __why=$(busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \\
    StartTransientUnit 'ssa(sv)a(sa(sv))' "$__unit" fail 2 PIDs au 1 $$ CollectMode s inactive-or-failed 0 \\
    2>&1 >/dev/null)
}}
__empty() {{  # no process left: where cgroup notifications get lost, an empty scope can stay "active"
  local cg d; cg=$(systemctl show -p ControlGroup --value "$__unit" 2>/dev/null)
  for d in ${{cg:+/sys/fs/cgroup$cg /sys/fs/cgroup/unified$cg /sys/fs/cgroup/systemd$cg}}; do
    [ -n "$(cat "$d/cgroup.procs" 2>/dev/null)" ] && return 1  # cgroup v2, hybrid, v1
  done
  return 0
}}
__until_gone() {{  # seconds
  local i; for i in $(seq $(($1 * 20))); do
    systemctl is-active --quiet "$__unit" || return 0
    __empty && {{ systemctl stop "$__unit" 2>/dev/null; return 0; }}
    sleep 0.05
  done
  return 1
}}
__acquire() {{  # a scope that ended may stay loaded until systemd collects it: up to 2 s for that
  local i; for i in $(seq 40); do
    __scope && return 0
    systemctl is-active --quiet "$__unit" && ! __empty && return 1  # held
    systemctl stop "$__unit" 2>/dev/null; systemctl reset-failed "$__unit" 2>/dev/null; sleep 0.05
  done
  return 1
}}
umask 077; mkdir -p {run_dir}; chmod 755 {run_dir}
if ! __acquire; then
  for __i in $(seq 20); do  # a holder that just started writes its name at once
    __h=$(cat "$__holder" 2>/dev/null); [ -n "$__h" ] && break; sleep 0.05
  done
  __hpid=$(printf '%s' "$__h" | sed -n 's/.*"pid": *\\([0-9]*\\).*/\\1/p')
  [ -n "$__h" ] || __h="an unnamed process (systemd: ${{__why:-?}}; $(systemctl show -p ControlGroup --value "$__unit" \\
    2>/dev/null | xargs -I{{}} cat /sys/fs/cgroup/unified{{}}/cgroup.procs /sys/fs/cgroup{{}}/cgroup.procs 2>/dev/null \\
    | xargs -r ps -o pid=,args= -p | head -n 3 | tr '\\n' ' '))"
  if [ {break_lock} = 1 ]; then
    systemctl kill --signal=SIGTERM "$__unit" 2>/dev/null; __until_gone 10 || {{
      systemctl kill --signal=SIGKILL "$__unit" 2>/dev/null; __until_gone 10; }}
    __acquire || {{ echo "@@locked $__h"; exit 75; }}
    echo "@@broken $__h"
  elif [ -z "$__hpid" ] || {{ grep -qs "/$__unit\\$" /proc/$__hpid/cgroup \\
       && [ "$(cut -d' ' -f4 /proc/$__hpid/stat 2>/dev/null)" != 1 ]; }}; then
    echo "@@locked $__h"; exit 75  # a deploy whose client is connected
  else
    # its client is gone, or it was killed: what it started finishes its step, then the lock ends
    __until_gone 300 || {{ echo "@@locked $__h"; exit 75; }}
    echo "@@waited $__h"; exit 76  # the host changed meanwhile: gather facts again
  fi
elif [ -s "$__holder" ]; then echo "@@stale $(cat "$__holder")"; fi
for __i in $(seq 100); do grep -qs "/$__unit\\$" /proc/$$/cgroup && break; sleep 0.01; done
printf '%s\\n' {holder_json} | sed "s/\\"pid\\": 0/\\"pid\\": $$/" > "$__holder"
umask 022
trap 'rm -rf "${{__log%/step}}" "$__holder"' EXIT
"""


@dataclass
class Lock:
    """A deploy lock on the host (see LOCK), with who holds it."""

    app: str
    holder: dict
    break_lock: bool = False
    run_dir: str = "/run/provision"  # root's

    @property
    def unit(self) -> str:
        return f"provision-deploy-{self.app}.scope"

    @property
    def holder_path(self) -> str:
        return f"{self.run_dir}/{self.app}.deploy"

    def script(self) -> str:
        holder = json.dumps(dict(self.holder, pid=0), sort_keys=True)
        return LOCK.format(unit=shlex.quote(self.unit), holder=shlex.quote(self.holder_path),
                           run_dir=shlex.quote(self.run_dir),
                           holder_json=shlex.quote(holder), break_lock=int(self.break_lock))


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
    r.output = "\n".join(out)
    return r
