"""Droplets are separate hosts: units of the same name in two droplets are two groups of processes.
Before each droplet had cgroups of its own, every droplet's systemd shared this machine's: stopping
`hello.worker.service` in one failed with EIO ("Failed to kill control group") and left the old
worker running, so a restarted app ran twice."""

import os

import pytest

from .conftest import PREFIX, Host

pytestmark = pytest.mark.integration

LOOP = "trap 'echo stopped > /run/same.txt; exit 0' TERM; while :; do sleep 0.1; done"


def test_a_unit_stopped_in_one_droplet_stops_there_and_only_there(sandbox):
    names = [f"{PREFIX}iso-a", f"{PREFIX}iso-b"]
    a, b = (sandbox.up(n) for n in names)
    try:
        hosts = [Host(d, sandbox, None) for d in (a, b)]
        for h in hosts:
            h.sh(f"rm -f /run/same.txt; systemd-run --unit=same --service-type=exec /bin/sh -c {LOOP!r}")
        hosts[0].sh("systemctl stop same")
        assert hosts[0].sh("cat /run/same.txt") == "stopped\n"  # TERM reached its process
        assert "Failed to kill" not in hosts[0].sh("journalctl -u same --no-pager")
        assert hosts[0].run("pgrep -f 'sleep 0.1|while :'")[0] == 1  # none left behind
        assert hosts[1].sh("systemctl is-active same") == "active\n"  # the other droplet's is untouched
        assert hosts[1].run("cat /run/same.txt")[0] == 1
    finally:
        for n in names:
            sandbox.down(n)
    assert not [g for d in (a, b) for g in d.cgroups if os.path.exists(g)]  # groups removed
