"""Real hosts for integration tests: sandbox droplets (systemd-nspawn).

Tests drive the real `fab` command line against them; nothing is mocked.
Skipped, with one line saying why, only where this machine cannot run droplets.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from provision.layout import Layout
from provision.ssh import connect
from provision.sandbox import Droplet, Sandbox, can_run

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).with_name("fab"))


@dataclass
class Host:
    droplet: Droplet
    sandbox: Sandbox
    inventory: Path

    @property
    def name(self) -> str:
        return self.droplet.name

    @property
    def address(self) -> str:
        return self.droplet.address

    def env(self, **extra: str) -> dict:
        return {**os.environ, "FABRIC_INVENTORY": str(self.inventory), **extra}

    def fab(self, *args: str, env: dict | None = None, timeout: int = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([FAB, *args], cwd=ROOT, env=self.env(**(env or {})), capture_output=True, text=True,
                              timeout=timeout, input=input)

    def run(self, command: str) -> tuple[int, str, str]:
        """Run a command on the droplet as root over SSH: (rc, stdout, stderr)."""
        remote = connect(self.address, "root", 22, str(self.sandbox.key), str(self.sandbox.known_hosts))
        try:
            return remote.exec(command, timeout=120)
        finally:
            remote.close()

    def sh(self, command: str) -> str:
        """Run a command on the droplet over SSH; returns stdout, fails on non-zero exit."""
        rc, out, err = self.run(command)
        assert rc == 0, f"`{command}` failed ({rc}): {err}"
        return out

    def live_slot(self, app: str = "hello") -> str | None:
        """The slot nginx sends the app's traffic to, as the layout reads it from the upstream file."""
        layout = Layout(app)
        return layout.live_slot(self.run(f"cat {layout.upstream_file}")[1])


def check_outcomes(stdout: str) -> dict[str, set[str]]:
    """What `fab check` (pytest -v) printed of each check: {"PASSED": {"test_x", ...}, "SKIPPED": ...}."""
    out: dict[str, set[str]] = {}
    for name, outcome in re.findall(r"::(test_\w+)(?:\[[^\]]*\])? (PASSED|FAILED|SKIPPED|ERROR)", stdout):
        out.setdefault(outcome, set()).add(name)
    return out



def wait_for(what, probe, seconds: float = 20):
    """probe() once it is true, polling every 0.5 s for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        got = probe()
        if got or time.monotonic() > deadline:
            assert got, f"no {what} within {seconds}s"
            return got
        time.sleep(0.5)


PREFIX = os.environ.get("PROVISION_TEST_PREFIX", "it-")  # of droplet names: see `droplet`


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    reason = can_run()
    if reason:
        pytest.skip(f"no sandbox droplets on this machine: {reason}")
    sb = Sandbox()
    sb.prepare()
    return sb


@pytest.fixture(scope="module")
def droplet(sandbox, request, tmp_path_factory) -> Host:
    """A fresh droplet per test module, destroyed afterwards. Its name comes from the module, after
    PROVISION_TEST_PREFIX (default ``it-``): test runs side by side on one machine use distinct ones."""
    name = PREFIX + request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")[:16]
    with booted(sandbox, name, tmp_path_factory) as host:
        yield host


@contextlib.contextmanager
def booted(sandbox: Sandbox, name: str, tmp_path_factory, **options):
    """Droplet ``name`` up (``options``: Sandbox.up's) as a Host with an inventory naming it; down after."""
    d = sandbox.up(name, **options)
    inv = tmp_path_factory.mktemp("inv") / "inventory.ini"
    inv.write_text(sandbox.inventory())
    try:
        yield Host(d, sandbox, inv)
    finally:
        sandbox.down(name)
