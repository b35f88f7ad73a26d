"""Droplets from a snapshot: a droplet with the app deployed becomes a read-only layer, and new
droplets booted from it (several at once) serve the app at once, each a host of its own."""

import json

import pytest

from .conftest import PREFIX, Host
from .test_tls import http

pytestmark = pytest.mark.integration
SNAPSHOT = f"{PREFIX}snap"
NAMES = [f"{PREFIX}snap1", f"{PREFIX}snap2"]


def test_droplets_from_a_snapshot_serve_the_app_as_hosts_of_their_own(droplet, sandbox, tmp_path):
    res = droplet.fab("-H", droplet.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    origin_machine_id = droplet.sh("cat /etc/machine-id")
    try:
        sandbox.snapshot(droplet.name, SNAPSHOT)
        assert sandbox.get(droplet.name) is None  # released
        droplets = sandbox.up_many(NAMES, snapshot=SNAPSHOT)
        assert [d.name for d in droplets] == NAMES and all(d.snapshot == SNAPSHOT for d in droplets)
        inv = tmp_path / "inventory.ini"
        inv.write_text(sandbox.inventory() + "\n[snap]\n" + "\n".join(NAMES) + "\n")
        hosts = [Host(d, sandbox, inv) for d in droplets]
        for h in hosts:
            status, _, body = http(h.address, "example.org")
            assert (status, body) == (200, b"Hello from provision!\n")
        keys = [h.sh("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1] for h in hosts]
        machine_ids = [h.sh("cat /etc/machine-id") for h in hosts]
        assert len({*keys}) == 2 and len({origin_machine_id, *machine_ids}) == 3
        assert [h.sh("hostname").strip() for h in hosts] == NAMES
        assert hosts[0].sh("ls /var/log/journal") == f"{machine_ids[0].strip()}\n"  # not the origin's journal

        res = hosts[0].fab("-H", "snap", "deploy", "--json", str(tmp_path / "s.json"))
        assert res.returncode == 0, res.stdout + res.stderr
        summary = json.loads((tmp_path / "s.json").read_text())
        assert [(r["host"], r["changed"]) for r in summary] == [(n, 0) for n in NAMES], res.stdout
        # Asked again, a droplet running from that snapshot is kept.
        assert sandbox.up(NAMES[0], snapshot=SNAPSHOT).pid == droplets[0].pid
    finally:
        for n in NAMES:
            sandbox.down(n)
        sandbox.drop_snapshot(SNAPSHOT)
    assert SNAPSHOT not in sandbox.list_snapshots()
