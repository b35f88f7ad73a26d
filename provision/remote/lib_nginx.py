# lib_nginx: reload nginx (or another master/workers service) and wait for its old workers
# (stdlib only, python 3.7+).
import os
import subprocess
import time


def children(pid_file):
    """The pids of the processes whose parent is the master named in ``pid_file`` (none without one)."""
    try:
        with open(pid_file) as fh:
            master = int(fh.read().strip())
    except (OSError, ValueError):
        return set()
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % entry) as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])  # after the command name, which may hold anything
        except (OSError, ValueError, IndexError):
            continue
        if ppid == master:
            found.add(entry)
    return found


def reload_and_drain(pid_file, action="reload-or-restart", service="nginx", timeout=30):
    """``systemctl ACTION SERVICE``, then wait until the workers its master had before are gone:
    `systemctl reload` returns while old workers, with the old configuration, still accept.
    Returns the systemctl's CompletedProcess (nothing is waited for when it failed)."""
    before = children(pid_file)
    res = subprocess.run(["systemctl", action, service], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True)
    deadline = time.time() + timeout
    while res.returncode == 0 and time.time() < deadline and any(os.path.exists("/proc/" + p) for p in before):
        time.sleep(0.02)
    return res
