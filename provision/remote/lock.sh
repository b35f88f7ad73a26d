# The deploy lock, run by the apply script's main shell before any step (see provision/lock.py).
# Given (assigned before this text): __lock_file, __holder (the holder file), __scope_prefix
# (a deploy's scope is this, its shell's pid, ".scope"), __run_dir, __cgroup (the cgroup
# file system), __holder_json (who deploys, with "pid": 0 and "scope": "@scope@" to fill in),
# __break_lock (1 or 0).
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
  if [ "$__break_lock" = 1 ] && [ -n "$(__scope_of "$__h")" ]; then
    __stop_scope "$(__scope_of "$__h")"
    flock -w 10 9 || { echo "@@locked $__h"; exit 75; }
    echo "@@broken $__h"
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
  else echo "@@stale $__h"; fi
fi
busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager \
  StartTransientUnit 'ssa(sv)a(sa(sv))' "$__unit" fail 2 PIDs au 1 $$ CollectMode s inactive-or-failed 0 \
  >/dev/null 2>&1 && for __i in $(seq 100); do grep -qs "/$__unit\$" /proc/$$/cgroup && break; sleep 0.01; done
printf '%s\n' "$__holder_json" | sed -e "s/\"pid\": 0/\"pid\": $$/" -e "s/@scope@/$__unit/" > "$__holder"
umask 022
__gone+=("$__holder")  # removed on exit, with the rest of __gone (the script's prelude)
