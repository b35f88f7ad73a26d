"""The app's sandbox, defined once in the web unit: what it holds, how every other process of the app
(processes, timers, the release command, `fab run`) takes it over, and how `fab check` reads systemd's
exposure score of a unit."""

import shlex
from types import SimpleNamespace

import pytest

from provision import appenv
from provision.app import Deploy, rendered
from provision.checks.test_sandboxing import test_every_unit_of_the_app_is_sandboxed as sandbox_check
from provision.cli.check import check_hosts
from provision.cli.env import run_line
from provision.hosts import Job
from provision.inventory import Target
from provision.layout import Layout
from provision.processes import unit_steps
from provision.sandboxing import exposure, exposure_problem, hardening, run_properties
from provision.source import scan
from provision.steps import File

from .test_app import settings

SANDBOX = ("NoNewPrivileges=true", "PrivateTmp=true", "ProtectSystem=strict", "ReadOnlyPaths=/run",
           "ProtectHome=true", "PrivateDevices=true", "DevicePolicy=closed", "ProtectKernelTunables=true",
           "ProtectKernelModules=true", "ProtectKernelLogs=true", "ProtectControlGroups=true", "ProtectClock=true",
           "ProtectHostname=true", "ProtectProc=invisible", "ProcSubset=pid",
           "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "RestrictNamespaces=true", "RestrictRealtime=true",
           "RestrictSUIDSGID=true", "LockPersonality=true", "CapabilityBoundingSet=", "AmbientCapabilities=",
           "SystemCallFilter=@system-service", "SystemCallErrorNumber=EPERM", "SystemCallArchitectures=native",
           "UMask=0027", "RemoveIPC=true", "KeyringMode=private")
# the analyzer's last line, as systemd 252 prints it
REPORT = "  ✓ RemoveIPC=   Service user cannot leave SysV IPC objects around\n\n→ Overall exposure level for {}: {} {}\n"


def web_unit(**over) -> str:
    return rendered(settings(**over), "app@.service.j2").decode()


def service_lines(unit: str) -> list[str]:
    return unit.split("[Service]\n", 1)[1].split("\n[", 1)[0].splitlines()


def test_the_web_unit_is_sandboxed_and_may_write_only_the_apps_data_dirs():
    lines = service_lines(web_unit())
    assert set(SANDBOX) <= set(lines)
    assert [l for l in lines if l.startswith("ReadWritePaths")] == [
        "ReadWritePaths=-/srv/hello/shared/log -/srv/hello/shared/uploads"]
    assert not [l for l in lines if l.startswith("MemoryDenyWriteExecute")]  # cffi's callbacks need it off
    # no data dir: nothing writable (an empty ReadWritePaths= would only reset the list)
    assert not [l for l in service_lines(web_unit(linked_dirs=[])) if l.startswith("ReadWritePaths")]
    assert "ReadWritePaths=-/srv/hello/shared/data -/srv/hello/shared/media/up" in web_unit(
        linked_dirs=["data", "media/up"])


def test_the_data_dirs_are_the_layouts():
    assert Layout("hello").data_dir("media/up") == "/srv/hello/shared/media/up"
    assert settings(linked_dirs=["data"]).template_vars()["data_dirs"] == ["/srv/hello/shared/data"]


def test_processes_and_timers_take_the_web_units_sandbox_line_for_line():
    s = settings(processes={"worker": "python worker.py"},
                 timers={"tick": {"schedule": "hourly", "command": "python tick.py"}})
    unit = rendered(s, "app@.service.j2").decode()
    files = {st.path: st.content.decode() for st in unit_steps(s, "r1", unit) if isinstance(st, File)}
    for path in ("/etc/systemd/system/hello.worker.service", "/etc/systemd/system/hello.tick.service"):
        lines = service_lines(files[path])
        assert set(SANDBOX) <= set(lines), path
        assert "ReadWritePaths=-/srv/hello/shared/log -/srv/hello/shared/uploads" in lines
    # the sandbox is the web unit's: a unit of yours without one gives the processes none either
    assert "ProtectSystem" not in "".join(
        st.content.decode() for st in unit_steps(s, "r1", "[Service]\nUser=hello\n") if isinstance(st, File))


def test_systemd_run_gets_the_same_sandbox_and_environment_in_the_units_order():
    unit = web_unit()
    argv = appenv.app_process(Layout("hello"), "hello", "/srv/hello/current", ["python", "-i"], unit)
    props = [argv[i + 1] for i, a in enumerate(argv[:argv.index("--")]) if a == "-p"]
    assert props == ["EnvironmentFile=-/srv/hello/current/.provision/env", *hardening(unit)]
    assert set(SANDBOX) <= set(props)
    assert "--pty" in argv and "--pipe" in argv  # python -i stays interactive
    more = appenv.app_process(Layout("hello"), "hello", "/srv/r", ["true"], unit, ("/srv/r/static",))
    assert more[more.index("--") - 2:more.index("--")] == ["-p", "ReadWritePaths=/srv/r/static"]
    assert run_properties("[Service]\nProtectHome=true\nExecStart=/x %i\n") == ["-p", "ProtectHome=true"]


def test_fab_run_and_the_release_command_run_in_the_sandbox(tmp_path):
    argv = shlex.split(run_line(settings(), ["python", "-i"]).split("; fi; exec ", 1)[1])
    assert {"ProtectSystem=strict", "CapabilityBoundingSet=", "SystemCallFilter=@system-service"} <= set(argv)
    s = settings(release_command="python manage.py collectstatic", static={"/static/": "staticfiles"})
    deploy = Deploy(s, scan(s.source), "r2")
    [step] = [st for st in deploy.steps("r2") if isinstance(st, appenv.ReleaseCommand)]
    assert step.app_unit == deploy.app_unit
    run = step.plan(None, {"code"}).commands[1]
    for prop in ("ProtectSystem=strict", "ReadWritePaths=-/srv/hello/shared/log -/srv/hello/shared/uploads",
                 "ReadWritePaths=/srv/hello/releases/r2/staticfiles"):  # collectstatic fills its folder
        assert f'"{prop}"' in run, prop


@pytest.mark.parametrize("unit, rc, output, problem", [
    ("hello@a.service", 0, REPORT.format("hello@a.service", "1.6", "OK :-)"), None),
    ("hello@a.service", 0, REPORT.format("hello@a.service", "3.0", "OK :-)"), None),
    ("hello.worker.service", 0, REPORT.format("hello.worker.service", "8.7", "EXPOSED :-("),
     "hello.worker.service: exposure 8.7 is above 3.0; `systemd-analyze security --no-pager hello.worker.service`"),
    ("hello@a.service", 0, "\x1b[0;1;39m→ Overall exposure level for hello@a.service:\x1b[0m \x1b[1;31m9.2\x1b[0m",
     "hello@a.service: exposure 9.2 is above 3.0"),
    ("hello.tick.service", 1, "Unit hello.tick.service not found, cannot analyze.\n",
     "hello.tick.service: no exposure level from `systemd-analyze security --no-pager hello.tick.service` (exit 1: "
     "Unit hello.tick.service not found, cannot analyze.)"),
    ("hello.tick.service", 0, REPORT.format("other.service", "1.0", "OK"), "hello.tick.service: no exposure level"),
    ("hello.tick.service", 127, "", "(exit 127: no output)"),
])
def test_the_exposure_check_names_the_unit_and_its_score(unit, rc, output, problem):
    got = exposure_problem(unit, rc, output)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got and "\n" not in got


def test_exposure_is_the_named_units_score():
    out = REPORT.format("a.service", "2.5", "OK") + REPORT.format("b.service", "9.6", "UNSAFE")
    assert (exposure(out, "a.service"), exposure(out, "b.service"), exposure(out, "c.service")) == (2.5, 9.6, None)


def test_fab_check_knows_the_services_of_the_processes_and_timers():
    s = settings(processes={"worker": "python worker.py"},
                 timers={"tick": {"schedule": "hourly", "command": "python tick.py"}})
    [host] = check_hosts([Job(Target("web1", "10.0.0.1", "root"), s)], lambda job: None)
    assert host.settings["process_units"] == ["hello.worker.service", "hello.tick.service"]
    assert host.settings["monitor_units"] == []
    [host] = check_hosts([Job(Target("web1", "10.0.0.1", "root"), settings(monitor=30))], lambda job: None)
    assert host.settings["monitor_units"] == ["provision-monitor-hello.service"]


class FakeHost:
    """What the check uses of testinfra's host: the upstream file, and the analyzer's answer per unit."""

    def __init__(self, upstream: str, scores: dict):
        self.upstream, self.scores, self.ran = upstream, scores, []

    def file(self, path):
        return SimpleNamespace(content_string=self.upstream)

    def run(self, command):
        unit = shlex.split(command)[-1]
        self.ran.append(unit)
        if unit not in self.scores:
            return SimpleNamespace(rc=1, stdout="", stderr=f"Unit {unit} not found, cannot analyze.\n")
        return SimpleNamespace(rc=0, stdout=REPORT.format(unit, self.scores[unit], ""), stderr="")


def test_the_check_rates_the_live_slots_unit_and_each_process_and_timer_service():
    lay = Layout("hello")
    app = {"name": "hello", **lay.variables(), "process_units": ["hello.worker.service", "hello.tick.service"]}
    host = FakeHost(lay.upstream("b"), {"hello@b.service": "1.6", "hello.worker.service": "1.6",
                                        "hello.tick.service": "1.6"})
    sandbox_check(host, app)
    assert host.ran == ["hello@b.service", "hello.worker.service", "hello.tick.service"]
    host.ran, host.scores["provision-monitor-hello.service"] = [], "2.0"  # the health monitor's too
    sandbox_check(host, {**app, "monitor_units": ["provision-monitor-hello.service"]})
    assert host.ran[-1] == "provision-monitor-hello.service"
    host.scores["hello.worker.service"] = "8.7"
    del host.scores["hello.tick.service"]
    with pytest.raises(AssertionError) as e:
        sandbox_check(host, app)
    assert "hello.worker.service: exposure 8.7 is above 3.0" in str(e.value)
    assert "hello.tick.service: no exposure level" in str(e.value) and "hello@b.service" not in str(e.value)
    with pytest.raises(AssertionError, match="no live slot"):
        sandbox_check(FakeHost("", {}), app)
