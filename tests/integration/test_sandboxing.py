"""Every process of the app runs in the web unit's sandbox, as systemd rates it (`systemd-analyze
security`, exposure 3.0 or less): the web service, a process, a timer's service, the release command
and `fab run`. They write their data dirs (and the release command its static folder), nothing else,
not even where the app user could without a sandbox (/run/lock is world-writable). Order matters: one
droplet."""

import json
import time
import urllib.parse
import urllib.request

import pytest

from provision.sandboxing import MAX_EXPOSURE, exposure, exposure_command

pytestmark = pytest.mark.integration

# /write?PATH appends a line to PATH and says whether it could
APP = '''def app(environ, start_response):
    body = "ok\\n"
    if environ["PATH_INFO"] == "/write":
        body = attempt(environ["QUERY_STRING"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]


def attempt(path):
    try:
        with open(path, "a") as fh:
            fh.write("x\\n")
        return "wrote %s\\n" % path
    except OSError as e:
        return "refused %s: %s\\n" % (path, e.strerror)
'''
WORKER = '''import time
from app import attempt

print(attempt("log/worker.txt"), attempt("/run/lock/worker.txt"), end="", flush=True)
while True:
    time.sleep(1)
'''
# the release command: its static folder and the data dirs, nothing else
RELEASE = '''from app import attempt

for path in ("collected/site.css", "log/release.txt", "release.txt", "/etc/release.txt", "/run/lock/release.txt"):
    print(attempt(path), end="")
'''
TIMERS = {"tick": {"schedule": "*:*:0/5", "command": "echo tick >> log/timer.txt"}}
SETTINGS = {"FABRIC_APP_TIMERS": json.dumps(TIMERS), "FABRIC_APP_STATIC": json.dumps({"/static/": "collected"}),
            "FABRIC_APP_RELEASE_COMMAND": "python release.py"}
UNITS = ("hello.worker.service", "hello.tick.service")  # and the live slot's


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = tmp_path_factory.mktemp("sandboxed") / "hello"
    d.mkdir()
    (d / "app.py").write_text(APP)
    (d / "worker.py").write_text(WORKER)
    (d / "release.py").write_text(RELEASE)
    (d / "Procfile").write_text("worker: python worker.py\n")
    (d / "requirements.txt").write_text("")
    return d


@pytest.fixture(scope="module")
def fab(droplet, app):
    def run(*args, **kw):
        return droplet.fab("-H", droplet.name, *args, env={**SETTINGS, "FABRIC_APP_SOURCE": str(app)}, **kw)
    return run


def get(address: str, path: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def write(droplet, path: str) -> str:
    return get(droplet.address, "/write?" + urllib.parse.quote(path))[1]


def scores(droplet) -> dict[str, float | None]:
    units = (f"hello@{droplet.live_slot()}.service", *UNITS)
    return {u: exposure(droplet.run(exposure_command(u))[1], u) for u in units}


@pytest.fixture(scope="module")
def deployed(fab) -> str:
    """The first deploy's output."""
    res = fab("deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_every_unit_of_the_app_is_sandboxed_and_runs(droplet, deployed):
    measured = scores(droplet)
    print("exposure:", measured)
    assert all(s is not None and s <= MAX_EXPOSURE for s in measured.values()), measured
    assert get(droplet.address, "/") == (200, "ok\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and droplet.run("test -s /srv/hello/shared/log/timer.txt")[0] != 0:
        time.sleep(0.5)
    assert droplet.sh("cat /srv/hello/shared/log/timer.txt").startswith("tick\n")  # the timer's service ran
    assert droplet.sh("systemctl is-active hello.worker.service").strip() == "active"
    logged = droplet.sh("journalctl -u hello.worker.service --no-pager -o cat")
    assert "wrote log/worker.txt" in logged and "refused /run/lock/worker.txt: Read-only file system" in logged


def test_the_release_command_writes_its_static_folder_and_the_data_dirs_only(droplet, deployed):
    said = [l.split(" | ", 1)[1] for l in deployed.splitlines() if l.startswith(f"{droplet.name} | ")]
    assert said[:2] == ["wrote collected/site.css", "wrote log/release.txt"], deployed
    assert [l.split(":")[0] for l in said[2:]] == [
        "refused release.txt", "refused /etc/release.txt", "refused /run/lock/release.txt"], deployed
    assert said[-1] == "refused /run/lock/release.txt: Read-only file system"
    assert get(droplet.address, "/static/site.css") == (200, "x\n")  # collected, served by nginx
    assert droplet.sh("cat /srv/hello/shared/log/release.txt") == "x\n"


def test_the_web_service_writes_only_its_data_dirs(droplet):
    assert write(droplet, "/srv/hello/shared/uploads/w.txt") == "wrote /srv/hello/shared/uploads/w.txt\n"
    assert write(droplet, "log/w.txt") == "wrote log/w.txt\n"  # through the release's link
    for path in ("/etc/evil", "/run/lock/evil", "/srv/hello/current/evil", "/srv/hello/evil"):
        assert write(droplet, path).startswith(f"refused {path}: "), path
    # not mere file modes: the app user may write /run/lock (1777) outside the sandbox, not in it
    assert write(droplet, "/run/lock/evil") == "refused /run/lock/evil: Read-only file system\n"
    assert droplet.run("runuser -u hello -- touch /run/lock/outside && rm /run/lock/outside")[0] == 0
    assert droplet.run("test -e /etc/evil || test -e /srv/hello/current/evil || test -e /srv/hello/evil")[0] != 0
    # /dev/shm: the app has one (multiprocessing's semaphores live there), its own, not the host's
    assert write(droplet, "/dev/shm/evil") == "wrote /dev/shm/evil\n"
    assert droplet.run("test -e /dev/shm/evil")[0] != 0


def test_fab_run_is_in_the_sandbox_too(droplet, fab):
    res = fab("run", "--", "sh", "-c", "touch log/run.txt && echo data-ok; touch /run/lock/run.txt || echo lock-refused; "
                                       "touch /etc/run.txt || echo etc-refused; touch run.txt || echo release-refused")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split() == ["data-ok", "lock-refused", "etc-refused", "release-refused"], res.stdout
    assert "Read-only file system" in res.stderr


def test_fab_check_rates_each_unit_and_names_one_above_the_limit(droplet, fab):
    res = fab("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test_sandboxing.py::test_every_unit_of_the_app_is_sandboxed" in res.stdout
    # a drop-in loosening the worker's sandbox: the check names it and its score
    droplet.sh("mkdir -p /etc/systemd/system/hello.worker.service.d && printf '[Service]\\nProtectSystem=no\\n"
               "PrivateDevices=no\\nSystemCallFilter=\\nRestrictAddressFamilies=\\nRestrictNamespaces=no\\n' "
               "> /etc/systemd/system/hello.worker.service.d/loose.conf && systemctl daemon-reload")
    try:
        loose = exposure(droplet.run(exposure_command("hello.worker.service"))[1], "hello.worker.service")
        assert loose is not None and loose > MAX_EXPOSURE
        res = fab("check")
        assert res.returncode != 0, res.stdout
        assert f"hello.worker.service: exposure {loose} is above {MAX_EXPOSURE}" in res.stdout, res.stdout
    finally:
        droplet.sh("rm -r /etc/systemd/system/hello.worker.service.d && systemctl daemon-reload")
    assert fab("check").returncode == 0
