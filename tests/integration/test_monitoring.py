"""Monitoring a container app (``container: true``) on container droplets: `fab status` counts the
container's memory (docker and podman run it outside its slot unit's cgroup), and the health monitor
(app.monitor) restarts a container app that stopped answering. Order matters: each test goes on from the
state the one before left."""

from __future__ import annotations

import re
import time

import pytest

from provision.layout import Layout

from . import test_containers
from .conftest import Host, wait_for
from .test_containers import APP_ENV, SERVER, container_app, deploy, get

cdroplet = test_containers.cdroplet  # a container droplet, docker ready (this module's own)
pdroplet = test_containers.pdroplet  # one with no engine yet

pytestmark = pytest.mark.integration

BALLAST_MIB = 80
PROGRAM = f"ballast = b'x' * ({BALLAST_MIB} << 20)  # written: resident\n" + SERVER
LAY = Layout("capp", container=True)
MONITOR = {"FABRIC_APP_MONITOR": "5", "FABRIC_APP_MONITOR_FAILURES": "2", "FABRIC_APP_GRACEFUL_TIMEOUT": "3"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return container_app(tmp_path_factory.mktemp("capps"), "m1", PROGRAM)


def answers(address: str) -> bool:
    try:
        return get(address) == "m1"
    except OSError:
        return False


def memory_in_status(host: Host, source: str, env: dict) -> float:
    """`fab status`'s memory of the deployed app, MiB; the container in the app's slice (the engine's
    client alone in its unit's cgroup)."""
    res, _ = deploy(host, source, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(host.address) == "m1"
    engine = env.get("FABRIC_APP_ENGINE", "docker")
    pid = host.sh(f"{engine} inspect -f '{{{{.State.Pid}}}}' {LAY.container_name(host.live_slot('capp'))}").strip()
    assert f"/{LAY.container_slice}/" in host.sh(f"cat /proc/{pid}/cgroup")
    res = host.fab("-H", host.name, "status", env={**APP_ENV, **env, "FABRIC_APP_SOURCE": source})
    assert res.returncode == 0, res.stdout + res.stderr
    amount, unit = re.search(r"memory (\d+\.\d) (KiB|MiB|GiB)", res.stdout).groups()
    print(f"fab status of a container app holding {BALLAST_MIB} MiB ({engine}): memory {amount} {unit}")
    return float(amount) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def test_status_counts_the_containers_memory(cdroplet, source):
    assert memory_in_status(cdroplet, source, MONITOR) >= BALLAST_MIB


def test_status_counts_a_podman_containers_memory(pdroplet, sandbox, source, tmp_path_factory):
    """podman: its client stays in the unit's cgroup; the container and its conmon go to the app's slice."""
    inv = tmp_path_factory.mktemp("inv") / "inventory.ini"
    inv.write_text(sandbox.inventory())
    sandbox.engine_ready(pdroplet, "podman")
    assert memory_in_status(Host(pdroplet, sandbox, inv), source, {"FABRIC_APP_ENGINE": "podman"}) >= BALLAST_MIB


def test_the_monitor_restarts_a_hung_container_app(cdroplet, source):
    slot = cdroplet.live_slot("capp")
    container = LAY.container_name(slot)
    before = cdroplet.sh(f"docker inspect -f '{{{{.Id}}}}' {container}").strip()
    # the app stops (SIGSTOP): its container runs, its port takes connections, nothing answers
    cdroplet.sh("pkill -STOP -f '^python3 /srv/app.py m1'")
    t0 = time.monotonic()
    # checks every 5 s, 2 failures (a check waits 5 s), the restart (graceful_timeout 3 s): within 90 s
    wait_for("a new container", lambda: cdroplet.run(f"docker inspect -f '{{{{.Id}}}}' {container}")[1].strip()
             not in ("", before), 90)
    wait_for("an answer", lambda: answers(cdroplet.address), 30)
    print(f"monitor: hung container app restarted after {time.monotonic() - t0:.1f}s")
    assert get(cdroplet.address) == "m1" and cdroplet.live_slot("capp") == slot
    assert f"restarted {LAY.unit(slot)}" in cdroplet.sh(f"journalctl -u {LAY.monitor_unit} --no-pager")
