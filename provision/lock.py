"""The deploy lock: the first thing the apply script does on a host (``remote/lock.sh``).

flock on a file only root can open (the layout's ``lock``, 0600), held by the script's main
shell alone (steps close it), so no one else can hold or forge it and it ends with the holder.
Each deploy also moves itself into a transient systemd scope of its own (the layout's
``deploy_scope_prefix``, its pid, ``.scope``): every process it starts is in it. The holder file
beside the lock (root's) names both. A later deploy that finds the holder gone but its scope
still running (a holder killed outright: its steps finish their work) waits for that scope;
--break-lock stops the holder's scope (systemd kills exactly its processes), never a pid read
from a file. A fleet transaction holds the lock from its first stage on a host to its last
(``transaction``, ``hold``; see ``remote/lock.sh``), never longer than its SSH connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from . import remote
from .layout import CGROUP, Layout


@dataclass
class Lock:
    """A deploy lock on the host, with who holds it."""

    layout: Layout
    holder: dict
    break_lock: bool = False
    cgroup: str = CGROUP
    transaction: str = ""  # a fleet transaction's token: its stages pass the lock on to each other
    hold: bool = False  # keep the lock for the transaction's next stage after this script

    def script(self) -> str:
        holder = dict(self.holder, pid=0, scope="@scope@", **({"transaction": self.transaction} if self.transaction else {}))
        return remote.bash("lock.sh", {
            "__lock_file": self.layout.lock, "__holder": self.layout.lock_holder,
            "__scope_prefix": self.layout.deploy_scope_prefix, "__run_dir": self.layout.run_dir,
            "__cgroup": self.cgroup, "__holder_json": json.dumps(holder, sort_keys=True),
            "__break_lock": int(self.break_lock), "__transaction": self.transaction, "__hold": int(self.hold)})

    def stage(self, hold: bool) -> "Lock":
        """This transaction's lock for one stage (``hold``: a later stage follows)."""
        return replace(self, hold=hold)


def describe_holder(h: dict) -> str:
    if "raw" in h or not h:
        return h.get("raw", "an unknown process")
    return (f"{h.get('user', '?')} on {h.get('machine', '?')} since {h.get('time', '?')} "
            f"({h.get('action', 'deploy')} of {h.get('release', '?')}, remote pid {h.get('pid', '?')})")
