"""pytest plugin for `fab check` (loaded with -p, so user checks get it too).

``host`` is a testinfra Host per selected host, named by its alias, whose paramiko client is the
connection provision's own ``connect`` opens: the same known_hosts files, the same refusal of an
unknown or changed host key, on every connection (testinfra's own plugin, which would connect
again and accept any key, is disabled).  ``app`` is that host's app settings as `fab check`
resolved them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paramiko
import pytest
import testinfra.host
from testinfra.backend.paramiko import ParamikoBackend

from provision.errors import ProvisionError

INI = Path(__file__).with_name("pytest.ini")
# testinfra's plugin registers under its entry point name; "testinfra" alone blocks nothing today.
NO_TESTINFRA = ["-p", "no:pytest11.testinfra", "-p", "no:testinfra"]


@dataclass(frozen=True)
class CheckHost:
    alias: str
    settings: dict  # what the `app` fixture gives
    open: Callable[[], Any]  # a provision.ssh.Remote, host key checked, or ProvisionError
    sudo: bool = False


class PinnedBackend(ParamikoBackend):
    """testinfra's paramiko backend over provision's connection, opened on first use. A refused
    connection is never tried again; a dropped one is reopened through the same ``open``."""

    def __init__(self, target: CheckHost):
        super().__init__(target.alias, sudo=target.sudo)
        self.target = target
        self.remote = None
        self.error: ProvisionError | None = None

    def get_pytest_id(self) -> str:
        return self.target.alias

    @functools.cached_property
    def client(self) -> paramiko.SSHClient:
        if self.error is not None:
            raise self.error
        self.close()
        try:
            self.remote = self.target.open()
        except ProvisionError as e:
            self.error = e
            raise
        return self.remote.conn.client

    def close(self) -> None:
        self.__dict__.pop("client", None)
        remote, self.remote = self.remote, None
        if remote is not None:
            remote.close()


HOSTS = pytest.StashKey["CheckHosts"]()


class CheckHosts:
    """The hosts of one `fab check` run, by alias; a plugin object for ``pytest.main(plugins=...)``."""

    def __init__(self, targets: list[CheckHost]):
        self.targets = {t.alias: t for t in targets}
        self.hosts: dict[str, testinfra.host.Host] = {}
        for t in targets:
            backend = PinnedBackend(t)
            self.hosts[t.alias] = testinfra.host.Host(backend)
            backend.set_host(self.hosts[t.alias])

    def errors(self) -> dict[str, ProvisionError]:
        """The hosts that refused (or could not make) a connection, with the one-line reason."""
        return {a: h.backend.error for a, h in self.hosts.items() if h.backend.error is not None}

    def close(self) -> None:
        for h in self.hosts.values():
            h.backend.close()

    def pytest_configure(self, config: pytest.Config) -> None:
        config.stash[HOSTS] = self

    def pytest_sessionfinish(self) -> None:
        self.close()


def main(hosts: CheckHosts, paths: list[str], rootdir: Path, extra_args: list[str] | None = None,
         plugins: list | None = None) -> int:
    """Run the checks in ``paths`` on ``hosts``; pytest's exit code."""
    args = [*paths, "-c", str(INI), f"--rootdir={rootdir}", "-p", "no:cacheprovider", *NO_TESTINFRA,
            "-p", __name__, "-v", "--no-header", "--tb=short", "-W", "ignore::UserWarning", *(extra_args or [])]
    return int(pytest.main(args, plugins=[hosts, *(plugins or [])]))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "_provision_host" not in metafunc.fixturenames:
        return
    hosts = metafunc.config.stash.get(HOSTS, None)
    if hosts is None:
        raise pytest.UsageError("these checks run on the hosts `fab -H HOST check` selects")
    aliases = list(hosts.targets)
    metafunc.parametrize("_provision_host", aliases, ids=aliases, scope="module", indirect=True)


@pytest.fixture(scope="module")
def _provision_host(request: pytest.FixtureRequest) -> CheckHost:
    return request.config.stash[HOSTS].targets[request.param]


@pytest.fixture(scope="module")
def host(request: pytest.FixtureRequest, _provision_host: CheckHost) -> testinfra.host.Host:
    h = request.config.stash[HOSTS].hosts[_provision_host.alias]
    try:
        h.backend.client  # connect now: a refused host key is this one line, before any check runs
    except ProvisionError:
        pass
    if h.backend.error is not None:
        pytest.fail(str(h.backend.error), pytrace=False)
    return h


host.__doc__ = testinfra.host.Host.__doc__


@pytest.fixture
def app(_provision_host: CheckHost) -> dict:
    return dict(_provision_host.settings)
