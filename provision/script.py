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
__run() { ( exec 9>&-; set -eE; trap 'echo "@@command: ${BASH_COMMAND%%$'"'"'\n'"'"'*}" >&2' ERR; "s$1" ); }
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
__bg() { __bgt0[$1]=${EPOCHREALTIME:-0}; __run "$1" >"$__log.$1" 2>&1 9>&- & __bgpid[$1]=$!; }
__join() {
  local i rc
  for i in "${!__bgpid[@]}"; do
    wait "${__bgpid[$i]}"; rc=$?; unset "__bgpid[$i]"; __done "$i" "$rc" "${__bgt0[$i]}" "$__log.$i"
  done
}
"""


# The deploy lock: flock on a file only root can open ({run_dir}/<app>.lock, 0600), held by
# the script's main shell alone (steps close it), so no one else can hold or forge it and it
# ends with the holder. Each deploy also moves itself into a transient systemd scope of its
# own (provision-deploy-<app>-<pid>.scope): every process it starts is in it. The holder file
# beside the lock (root's) names both. A later deploy that finds the holder gone but its scope
# still running (a holder killed outright: its steps finish their work) waits for that scope;
# --break-lock stops the holder's scope (systemd kills exactly its processes), never a pid read
# from a file.
LOCK = """\
__lockf={lock}
__holder={holder}
__unit=provision-deploy-{app}-$$.scope
__procs() {{  # the processes of a scope (any cgroup layout: v2, hybrid, v1)
  local d; for d in {cgroup} {cgroup}/unified {cgroup}/systemd; do
    cat "$d/system.slice/$1/cgroup.procs" 2>/dev/null; done | sort -u
}}
__scope_of() {{ printf '%s' "$1" | sed -n 's/.*"scope": *"\\(provision-deploy-{app}-[0-9]*\\.scope\\)".*/\\1/p'; }}
__stop_scope() {{  # TERM, then KILL, whatever is left of a deploy's scope
  local i sig; for sig in SIGTERM SIGKILL; do
    systemctl kill --signal=$sig "$1" 2>/dev/null
    for i in $(seq 100); do [ -z "$(__procs "$1")" ] && return 0; sleep 0.05; done
  done
}}
umask 077; mkdir -p {run_dir}; chmod 755 {run_dir}
exec 9>>"$__lockf"
if ! flock -n 9; then
  for __i in $(seq 20); do  # a holder that just started writes its name at once
    __h=$(cat "$__holder" 2>/dev/null); [ -n "$__h" ] && break; sleep 0.05
  done
  __hpid=$(printf '%s' "$__h" | sed -n 's/.*"pid": *\\([0-9]*\\).*/\\1/p')
  if [ {break_lock} = 1 ] && [ -n "$(__scope_of "$__h")" ]; then
    __stop_scope "$(__scope_of "$__h")"
    flock -w 10 9 || {{ echo "@@locked $__h"; exit 75; }}
    echo "@@broken $__h"
  elif [ -n "$__hpid" ] && [ "$(cut -d' ' -f4 /proc/$__hpid/stat 2>/dev/null)" = 1 ]; then
    # its client is gone: it stops after its current step
    flock -w 300 9 || {{ echo "@@locked $__h"; exit 75; }}
    echo "@@waited $__h"; exit 76  # the host changed meanwhile: gather facts again
  else echo "@@locked $__h"; exit 75; fi
elif [ -s "$__holder" ]; then
  __h=$(cat "$__holder")
  __old=$(__scope_of "$__h")
  if [ -n "$__old" ] && [ -n "$(__procs "$__old")" ]; then  # the last holder was killed; its steps run on
    if [ {break_lock} = 1 ]; then __stop_scope "$__old"; echo "@@broken $__h"
    else
      for __i in $(seq 6000); do [ -z "$(__procs "$__old")" ] && break; sleep 0.05; done
      [ -z "$(__procs "$__old")" ] || {{ echo "@@locked $__h"; exit 75; }}
      echo "@@waited $__h"; exit 76
    fi
  else echo "@@stale $__h"; fi
fi
busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \\
  StartTransientUnit 'ssa(sv)a(sa(sv))' "$__unit" fail 2 PIDs au 1 $$ CollectMode s inactive-or-failed 0 \\
  >/dev/null 2>&1 && for __i in $(seq 100); do grep -qs "/$__unit\\$" /proc/$$/cgroup && break; sleep 0.01; done
printf '%s\\n' {holder_json} | sed -e "s/\\"pid\\": 0/\\"pid\\": $$/" -e "s/@scope@/$__unit/" > "$__holder"
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
    cgroup: str = "/sys/fs/cgroup"

    @property
    def path(self) -> str:
        return f"{self.run_dir}/{self.app}.lock"

    @property
    def holder_path(self) -> str:
        return f"{self.run_dir}/{self.app}.deploy"

    def script(self) -> str:
        holder = json.dumps(dict(self.holder, pid=0, scope="@scope@"), sort_keys=True)
        return LOCK.format(lock=shlex.quote(self.path), holder=shlex.quote(self.holder_path), app=self.app,
                           run_dir=shlex.quote(self.run_dir), cgroup=shlex.quote(self.cgroup),
                           holder_json=shlex.quote(holder),
                           break_lock=int(self.break_lock))


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
