# The deploy lock, run by the apply script's main shell before any step (see provision/lock.py).
# Given (assigned before this text): __lock_file, __holder (the holder file), __scope_prefix
# (a deploy's scope is this, its shell's pid, ".scope"), __run_dir, __cgroup (the cgroup
# file system), __holder_json (who deploys, with "pid": 0 and "scope": "@scope@" to fill in),
# __break_lock (1 or 0), __transaction (a fleet transaction's token, or empty: see below), __hold (1
# or 0).
#
# A fleet transaction (provision/cli/apply.py) runs several scripts on a host, one per stage, over
# one SSH connection. A stage run with __hold=1 leaves, when it exits, a watcher that keeps the lock
# for the next stage for as long as that connection lives (fab killed or the connection lost: it
# goes within 0.2 s, and the next deploy finds the lock free). The next stage, with the same
# __transaction (in the holder file, root's alone), stops that watcher's scope and takes the lock.
__unit=$__scope_prefix$$.scope
__procs() {  # the processes of a scope (any cgroup layout: v2, hybrid, v1)
  local d; for d in "$__cgroup" "$__cgroup/unified" "$__cgroup/systemd"; do
    cat "$d/system.slice/$1/cgroup.procs" 2>/dev/null; done | sort -u
}
__scope_of() {  # the scope a holder names, when it is one of this app's deploy scopes
  local s; s=$(printf '%s' "$1" | sed -n 's/.*"scope": *"\([^"]*\)".*/\1/p')
  [[ $s == "$__scope_prefix"* && ${s#"$__scope_prefix"} =~ ^[0-9]+\.scope$ ]] && printf '%s' "$s"
}
__stop_scope() {  # TERM, then KILL, whatever is left of a deploy's scope
  local i sig; for sig in SIGTERM SIGKILL; do
    systemctl kill --signal=$sig "$1" 2>/dev/null
    for i in $(seq 100); do [ -z "$(__procs "$1")" ] && return 0; sleep 0.05; done
  done
}
__ours() {  # the holder is a stage of this same transaction
  [ -n "$__transaction" ] && printf '%s' "$1" | grep -qF "\"transaction\": \"$__transaction\""
}
__park() {  # keep the lock (fd 9) while this script's SSH connection (its sshd ancestor) lives
  local p=$$ c
  while [ "$p" -gt 1 ]; do
    p=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f2); [ -n "$p" ] || return 0
    c=$(cat "/proc/$p/comm" 2>/dev/null); [[ $c == sshd* ]] && break
  done
  [ "$p" -gt 1 ] || return 0  # not over SSH: nothing to wait for
  # gone with the connection: it names no holder any more (the next deploy finds the lock free)
  ( exec </dev/null >/dev/null 2>&1; while [ -d "/proc/$p" ]; do sleep 0.2; done
    rm -f "$__holder" ) &
}
__orphan() {  # a holder whose client is gone: sshd has gone too, init adopted it (give sshd a moment)
  local i; for i in $(seq 20); do
    [ "$(cut -d' ' -f4 "/proc/$1/stat" 2>/dev/null)" = 1 ] && return 0
    [ -d "/proc/$1" ] || return 1
    sleep 0.05
  done; return 1
}
umask 077; mkdir -p "$__run_dir"; chmod 755 "$__run_dir"
exec 9>>"$__lock_file"
if ! flock -n 9; then
  for __i in $(seq 20); do  # a holder that just started writes its name at once
    __h=$(cat "$__holder" 2>/dev/null); [ -n "$__h" ] && break; sleep 0.05
  done
  __hpid=$(printf '%s' "$__h" | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p')
  if { [ "$__break_lock" = 1 ] || __ours "$__h"; } && [ -n "$(__scope_of "$__h")" ]; then
    __stop_scope "$(__scope_of "$__h")"
    flock -w 10 9 || { echo "@@locked $__h"; exit 75; }
    __ours "$__h" || echo "@@broken $__h"
  elif [[ $__h == *'"transaction": '* ]] && flock -w 2 9; then
    :  # another transaction's lock, let go as its connection ended (its watcher goes within 0.2 s)
  elif [ -n "$__hpid" ] && __orphan "$__hpid"; then
    # its client is gone: it stops after its current step
    flock -w 300 9 || { echo "@@locked $__h"; exit 75; }
    echo "@@waited $__h"; exit 76  # the host changed meanwhile: gather facts again
  else echo "@@locked $__h"; exit 75; fi
elif [ -s "$__holder" ]; then
  __h=$(cat "$__holder")
  __old=$(__scope_of "$__h")
  if [ -n "$__old" ] && [ -n "$(__procs "$__old")" ]; then  # the last holder was killed; its steps run on
    if [ "$__break_lock" = 1 ]; then __stop_scope "$__old"; echo "@@broken $__h"
    else
      for __i in $(seq 6000); do [ -z "$(__procs "$__old")" ] && break; sleep 0.05; done
      [ -z "$(__procs "$__old")" ] || { echo "@@locked $__h"; exit 75; }
      echo "@@waited $__h"; exit 76
    fi
  elif ! __ours "$__h"; then echo "@@stale $__h"; fi
fi
busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \
  StartTransientUnit 'ssa(sv)a(sa(sv))' "$__unit" fail 2 PIDs au 1 $$ CollectMode s inactive-or-failed 0 \
  >/dev/null 2>&1 && for __i in $(seq 100); do grep -qs "/$__unit\$" /proc/$$/cgroup && break; sleep 0.01; done
printf '%s\n' "$__holder_json" | sed -e "s/\"pid\": 0/\"pid\": $$/" -e "s/@scope@/$__unit/" > "$__holder"
umask 022
# removed on exit with the rest of __gone (the script's prelude); a stage that holds the lock for the
# next one parks it instead
if [ "$__hold" = 1 ]; then trap '__park; rm -rf "${__gone[@]}"' EXIT
else __gone+=("$__holder"); fi
