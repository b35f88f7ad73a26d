"""fresh droplet -> deploy -> check; no-op redeploy; code edit; failures. Order matters: one droplet."""

import json
import re
import shutil
import urllib.request

import pytest

from .conftest import ROOT, check_outcomes

pytestmark = pytest.mark.integration
SMOKE = (ROOT / "provision/checks/test_smoke.py").read_text()


def smoke_checks_passed(stdout: str) -> bool:
    """Every built-in smoke check and the sandboxing check passed; nothing failed."""
    outcomes = check_outcomes(stdout)
    smoke = set(re.findall(r"^def (test_\w+)", SMOKE, re.M)) | {"test_every_unit_of_the_app_is_sandboxed"}
    assert len(smoke) > 5, smoke
    return smoke <= outcomes.get("PASSED", set()) and not outcomes.keys() - {"PASSED", "SKIPPED"}

STATE = ("stat -c '%n %Y %s' /etc/nginx/sites-available/hello /srv/hello/current/.provision/gunicorn.conf.py "
         "/etc/systemd/system/hello@a.service /etc/systemd/system/hello@.socket; "
         "systemctl show -p MainPID --value hello@a hello@b nginx; "
         "dpkg-query -W -f='${Package} ${Version}\\n' | sha256sum")
CHECKSUM = "find /etc /srv -xdev -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum"


def get(address: str, path: str = "/") -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}{path}", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory):
    d = tmp_path_factory.mktemp("app") / "hello"
    shutil.copytree(ROOT / "examples/hello", d)
    return d


def test_fresh_deploy_serves_the_app_and_passes_checks(droplet):
    res = droplet.fab("-H", droplet.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{droplet.name}: ok      health http://127.0.0.1/" in res.stdout
    assert get(droplet.address) == "Hello from provision!\n"
    # shared files and dirs are links into /srv/hello/shared
    assert droplet.sh("readlink /srv/hello/current/.env /srv/hello/current/log").split() == [
        "/srv/hello/shared/.env", "/srv/hello/shared/log"]
    droplet.sh("echo GREETING=kept > /srv/hello/shared/.env")
    check = droplet.fab("-H", droplet.name, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert smoke_checks_passed(check.stdout)


def test_second_deploy_changes_and_restarts_nothing(droplet, tmp_path):
    before = droplet.sh(STATE)
    res = droplet.fab("-H", droplet.name, "deploy", "-v", "--json", str(tmp_path / "summary.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    [summary] = json.loads((tmp_path / "summary.json").read_text())
    assert summary == dict(summary, host=droplet.name, changed=0, failed=False, round_trips=1, changed_steps=[])
    assert f"{droplet.name}: no changes, nothing restarted" in res.stdout
    assert f"{droplet.name}: 1 SSH round trip(s)" in res.stdout
    assert f"{droplet.name}: changed" not in res.stdout
    assert re.search(rf"^{droplet.name} +32 +0 +0 ", res.stdout, re.M)  # summary: ok changed failed (one: no health monitor)
    prov = droplet.fab("-H", droplet.name, "provision")
    assert prov.returncode == 0 and f"{droplet.name}: no changes" in prov.stdout, prov.stdout + prov.stderr
    assert droplet.sh(STATE) == before  # same mtimes, same PIDs, same package list


def test_every_task_on_the_command_line_runs(droplet):
    res = droplet.fab("-H", droplet.name, "deploy", "check", "status")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{droplet.name}: no changes, nothing restarted" in res.stdout  # deploy
    assert smoke_checks_passed(res.stdout)  # check: it was skipped, the selection counted as handled
    assert f"{droplet.name}: release " in res.stdout  # status


def test_dry_run_shows_diff_and_touches_nothing(droplet):
    before = droplet.sh(CHECKSUM)
    res = droplet.fab("-H", droplet.name, "deploy", "--dry-run", "-v", env={
        "FABRIC_APP_SERVER_NAME": "example.test", "FABRIC_APP_PROXY": "http://bob:s3cret@10.231.0.1:8888"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "-    server_name _;" in res.stdout and "+    server_name example.test;" in res.stdout
    assert "would   file /etc/nginx/sites-available/hello" in res.stdout
    # the proxy password is a secret: hidden in diffs, commands and summaries
    assert "s3cret" not in res.stdout + res.stderr
    apt = "/etc/apt/apt.conf.d/80provision-proxy"
    assert f"--- {apt}\n+++ {apt}\n(content hidden: sensitive)\n" in res.stdout
    assert "_proxy=http://bob:" not in res.stdout  # no file holding it shows a diff, not even masked
    assert droplet.sh(CHECKSUM) == before


def test_edited_code_is_served_after_deploy(droplet, app_copy):
    (app_copy / "app.py").write_text((app_copy / "app.py").read_text().replace("Hello from provision!", "Edited!"))
    res = droplet.fab("-H", droplet.name, "deploy", "--source", str(app_copy))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed switch hello" in res.stdout
    assert "changed virtualenv" not in res.stdout
    for _ in range(5):  # every worker, not just one, serves the new code
        assert get(droplet.address) == "Edited!\n"
    assert droplet.sh("cat /srv/hello/current/.env") == "GREETING=kept\n"  # survives releases


def test_failed_step_reports_command_and_stderr_and_old_release_keeps_serving(droplet, app_copy):
    (app_copy / "requirements.txt").write_text("flask>=3,<4\nno-such-package-provision-test==0.0.1\n")
    (app_copy / "app.py").write_text((app_copy / "app.py").read_text().replace("Edited!", "Never served"))
    res = droplet.fab("-H", droplet.name, "deploy", "--source", str(app_copy))
    assert res.returncode == 1
    out = res.stdout
    assert f"{droplet.name}: FAILED  virtualenv" in out
    assert "command: " in out and "pip install" in out
    assert "no-such-package-provision-test" in out  # pip's own stderr
    assert "Traceback" not in res.stderr
    assert get(droplet.address) == "Edited!\n"


def test_bad_template_variable_is_one_line_and_changes_nothing(droplet, tmp_path):
    for t in (ROOT / "provision/templates").iterdir():
        shutil.copy(t, tmp_path / t.name)
    (tmp_path / "nginx-site.conf.j2").write_text("server_name {{ domian }};\n")
    before = droplet.sh(CHECKSUM)
    res = droplet.fab("-H", droplet.name, "deploy", env={"FABRIC_APP_TEMPLATES": str(tmp_path)})
    assert res.returncode == 2
    assert res.stdout == ""
    [line] = res.stderr.strip().splitlines()
    assert "'domian' is undefined" in line and "nginx-site.conf.j2" in line
    assert droplet.sh(CHECKSUM) == before


@pytest.mark.parametrize("selection,code,message", [
    ("no-such-alias", 2, "unknown host or group 'no-such-alias'"),
    ("root@10.231.0.250:22", 3, "cannot reach root@10.231.0.250:22"),
])
def test_selection_errors_are_one_line(droplet, selection, code, message):
    res = droplet.fab("-H", selection, "deploy", timeout=60)
    assert res.returncode == code, res.stdout + res.stderr
    [line] = res.stderr.strip().splitlines()
    assert message in line


def test_check_fails_on_a_broken_host_and_deploy_repairs_it(droplet):
    droplet.sh(f"systemctl stop hello@{droplet.live_slot()}")
    check = droplet.fab("-H", droplet.name, "check")
    assert check.returncode != 0
    assert "test_app_service_enabled_running" in check.stdout and "FAILED" in check.stdout
    res = droplet.fab("-H", droplet.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed switch hello" in res.stdout
    assert droplet.fab("-H", droplet.name, "check").returncode == 0
