"""`fab check` without a network: which hosts the checks run on, with which settings, and over which
connection (the one provision opens and pins the host key of, never one of testinfra's own)."""

import io
from pathlib import Path
from types import SimpleNamespace

import paramiko

from provision import config as cfg
from provision.checks import plugin
from provision.checks.plugin import CheckHost, CheckHosts, PinnedBackend
from provision.cli.check import check_hosts
from provision.hosts import Job
from provision.layout import Layout
from provision.errors import ProvisionError
from provision.inventory import Target

ROOT = Path(__file__).resolve().parents[2]


def job(alias: str, user: str = "root", **over) -> Job:
    return Job(Target(alias, "10.0.0.1", user), cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, over), ROOT))


def test_one_check_host_per_job_by_alias_with_its_settings_connecting_only_when_asked():
    opened = []
    work = [job("web1"), job("root@10.0.0.9:2222", name="other", open_ports="8443"), job("web2", user="deploy")]
    hosts = check_hosts(work, lambda j: opened.append(j.target.alias) or f"remote of {j.target.alias}")
    assert [h.alias for h in hosts] == ["web1", "root@10.0.0.9:2222", "web2"]
    assert hosts[1].settings == {"name": "other", "user": "other", "server_name": "_", "health_path": "/",
                                 "deploy_user": "deploy", "open_ports": ["8443/tcp"], "unattended_upgrades": True, "tls": False, "container": False, "engine": "docker",
                                 **Layout("other").variables(), "process_units": [], "monitor_units": []}
    assert hosts[1].settings["root"] == "/srv/other" and hosts[1].settings["sockets"]["a"] == "/run/provision/other/a.sock"
    assert [h.sudo for h in hosts] == [False, False, True]  # sudo only where the user is not root
    assert opened == []
    assert hosts[2].open() == "remote of web2" and opened == ["web2"]


class FakeSSH:
    """What testinfra's paramiko backend uses of an SSHClient; every command answers the host's alias."""

    def __init__(self, alias: str, log: list, drops: int = 0):
        self.alias, self.log, self.drops, self.closed = alias, log, drops, False

    def get_transport(self):
        return self

    def is_active(self) -> bool:
        return not self.drops

    def open_session(self):
        if self.drops:
            raise paramiko.SSHException("connection dropped")
        return self

    def exec_command(self, command: bytes) -> None:
        self.log.append((self.alias, command.decode()))

    def makefile(self, mode):
        return io.BytesIO(f"{self.alias}\n".encode())

    def makefile_stderr(self, mode):
        return io.BytesIO(b"")

    def recv_exit_status(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class Hosts:
    """Fake hosts for CheckHosts: counts connections, records commands, refuses the ones told to."""

    def __init__(self, refuse: dict | None = None, drops: int = 0):
        self.refuse, self.drops = refuse or {}, drops
        self.opened: dict[str, int] = {}
        self.clients: list[FakeSSH] = []
        self.log: list = []

    def opener(self, alias: str):
        def open_():
            self.opened[alias] = self.opened.get(alias, 0) + 1
            if alias in self.refuse:
                raise ProvisionError(self.refuse[alias])
            client = FakeSSH(alias, self.log, drops=self.drops if len(self.clients) == 0 else 0)
            self.clients.append(client)
            return SimpleNamespace(conn=SimpleNamespace(client=client), close=client.close)

        return open_

    def target(self, alias: str, user: str = "root") -> CheckHost:
        return CheckHost(alias, {"name": alias.replace("@", "-")}, self.opener(alias), sudo=user != "root")


USER_CHECKS = '''
def test_runs_on_its_host_with_its_settings(host, app):
    assert host.check_output("uname -n").replace("@", "-") == app["name"]
'''


class Reports:
    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome
        if report.failed:
            self.errors[report.nodeid] = str(report.longrepr)


def run(tmp_path: Path, hosts: CheckHosts) -> tuple[int, Reports]:
    for n in ("one", "two"):  # module names unique in this process: pytest imports them by name
        (tmp_path / f"test_{n}_{tmp_path.name}.py").write_text(USER_CHECKS)
    reports = Reports()
    code = plugin.main(hosts, [str(tmp_path)], tmp_path, plugins=[reports])
    return code, reports


def test_checks_run_on_every_host_over_one_connection_each_opened_by_provision(tmp_path):
    fake = Hosts()
    hosts = CheckHosts([fake.target("web1"), fake.target("root@10.0.0.9:2222"), fake.target("web2", "deploy")])
    code, reports = run(tmp_path, hosts)
    assert code == 0, reports.errors
    assert sorted(reports.outcomes) == sorted(f"test_{n}_{tmp_path.name}.py::test_runs_on_its_host_with_its_settings[{a}]"
                                              for n in ("one", "two") for a in ("web1", "root@10.0.0.9:2222", "web2"))
    assert set(reports.outcomes.values()) == {"passed"}
    assert fake.opened == {"web1": 1, "root@10.0.0.9:2222": 1, "web2": 1}  # once per host, across modules
    assert all(c.closed for c in fake.clients)  # closed at session end
    assert hosts.errors() == {}
    commands = {alias: {cmd for a, cmd in fake.log if a == alias} for alias, _ in fake.log}
    assert all(cmd.startswith("sudo ") for cmd in commands["web2"])
    assert not any(cmd.startswith("sudo ") for cmd in commands["web1"])


def test_a_refused_host_runs_no_check_is_asked_once_and_keeps_its_one_line_error(tmp_path):
    changed = "web1: host key of 10.0.0.1 has CHANGED (now ssh-ed25519 SHA256:x); refusing to connect"
    fake = Hosts(refuse={"web1": changed})
    hosts = CheckHosts([fake.target("web1"), fake.target("web2")])
    code, reports = run(tmp_path, hosts)
    assert code != 0
    web1 = {k: v for k, v in reports.outcomes.items() if k.endswith("[web1]")}
    assert sorted(web1.values()) == ["failed", "failed"]  # an error at set-up: not a single check ran
    assert all(reports.errors[k].strip() == changed for k in web1)  # the one line, no traceback
    assert [v for k, v in reports.outcomes.items() if k.endswith("[web2]")] == ["passed", "passed"]
    assert fake.opened == {"web1": 1, "web2": 1}
    assert not any(a == "web1" for a, _ in fake.log)
    assert {a: str(e) for a, e in hosts.errors().items()} == {"web1": changed}


def test_a_dropped_connection_is_reopened_through_the_same_pinned_connect():
    fake = Hosts(drops=1)
    backend = PinnedBackend(fake.target("web1"))
    assert backend.run("true").stdout == "web1\n"
    assert fake.opened == {"web1": 2}  # testinfra's reconnect goes through provision's connect again
    backend.close()
    assert all(c.closed for c in fake.clients)


def test_the_host_fixture_is_provisions_not_testinfras(tmp_path):
    (tmp_path / f"test_which_{tmp_path.name}.py").write_text(
        "from provision.checks.plugin import PinnedBackend\n"
        "def test_which(host, request):\n"
        "    assert isinstance(host.backend, PinnedBackend)\n"
        "    assert request.config.pluginmanager.get_plugin('pytest11.testinfra') is None\n")
    fake = Hosts()
    reports = Reports()
    assert plugin.main(CheckHosts([fake.target("web1")]), [str(tmp_path)], tmp_path, plugins=[reports]) == 0, \
        reports.errors


def test_several_hosts_sessions_exit_with_a_failed_check_first():
    from provision.cli.check import session_code

    assert session_code([0, 0]) == 0 and session_code([]) == 0
    assert session_code([0, 5, 1, 0]) == 1  # a check failed somewhere, whatever else
    assert session_code([0, 5]) == 5 and session_code([2, 4]) == 4
