"""An app with a worker process (from its Procfile), a timer, static files and maintenance mode, on one
droplet. Order matters: each test goes on from the state the one before left."""

import json
import re
import time
import urllib.error
import urllib.request

import pytest

from .conftest import wait_for

pytestmark = pytest.mark.integration

APP = '''import os


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%s release %s\\n" % (GREETING, os.path.basename(os.getcwd()))).encode()]


GREETING = "v1"
'''
# Writes where it runs into the app's log dir (shared/log, through the release's link), and says so in
# its journal; on TERM it says it stopped.
WORKER = '''import os, signal, sys, time

release = os.path.basename(os.getcwd())


def note(what):
    with open("log/worker.txt", "a") as fh:
        fh.write("%s %s %d\\n" % (what, release, os.getpid()))


def stop(*_):
    note("stopped")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
note("started")
print("worker started in", release)
while True:
    time.sleep(0.5)
'''
PROCFILE = "web: gunicorn app:app\nworker: python worker.py\n"
# $, %, quotes and a redirection: the shell gets the command as written
TIMERS = {"tick": {"schedule": "*:*:0/5", "command": 'echo "tick $(date +%s) $VIRTUAL_ENV" >> log/timer.txt'}}
ENV = {"FABRIC_APP_STATIC": json.dumps({"/static/": "staticfiles"}), "FABRIC_APP_TIMERS": json.dumps(TIMERS)}
HASHED = "app.0123abcd.css"


def get(address: str, path: str = "/") -> tuple[int, dict, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}{path}", timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = tmp_path_factory.mktemp("app") / "worky"
    (d / "staticfiles").mkdir(parents=True)
    (d / "app.py").write_text(APP)
    (d / "worker.py").write_text(WORKER)
    (d / "Procfile").write_text(PROCFILE)
    (d / "requirements.txt").write_text("")
    (d / "staticfiles" / HASHED).write_text("body { color: teal }\n")
    (d / "staticfiles" / "readme.txt").write_text("plain\n")
    (d / "staticfiles" / "leak.txt").symlink_to("../app.py")  # shipped as a link: nginx never follows it
    return d


def settings(app, **more: str) -> dict:
    """The app's settings, as environment variables: every task knows its processes from its Procfile."""
    return {**ENV, "FABRIC_APP_SOURCE": str(app), **more}


def deploy(droplet, app, *more: str, **env: str):
    res = droplet.fab("-H", droplet.name, "deploy", *more, env=settings(app, **env))
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def live(droplet) -> str:
    return droplet.sh("readlink /srv/hello/current").strip().rsplit("/", 1)[-1]


def worker_log(droplet) -> str:
    return droplet.run("cat /srv/hello/shared/log/worker.txt")[1]


def main_pid(droplet, unit: str) -> str:
    return droplet.sh(f"systemctl show -p MainPID --value {unit}").strip()


def test_fresh_deploy_runs_the_worker_and_the_timer_and_serves_static_files(droplet, app):
    t0 = time.monotonic()
    deploy(droplet, app)
    print(f"fresh deploy: {time.monotonic() - t0:.1f}s")
    release = live(droplet)
    status, _, body = get(droplet.address)
    assert (status, body) == (200, f"v1 release {release}\n")
    status, headers, body = get(droplet.address, f"/static/{HASHED}")
    assert (status, body) == (200, "body { color: teal }\n")
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    status, headers, body = get(droplet.address, "/static/readme.txt")
    assert (status, body, headers["Cache-Control"]) == (200, "plain\n", "public, max-age=300")
    assert get(droplet.address, "/static/")[0] == 403  # no listing
    assert droplet.sh("readlink /srv/hello/current/staticfiles/leak.txt") == "../app.py\n"
    status, _, body = get(droplet.address, "/static/leak.txt")
    assert status == 403 and "import" not in body  # the app's code is not a static file
    wait_for("worker start", lambda: f"started {release} " in worker_log(droplet))
    pid = main_pid(droplet, "hello.worker")
    assert droplet.sh(f"ps -o user= -p {pid}").strip() == "hello"
    assert droplet.sh("systemctl show -p NoNewPrivileges,PrivateTmp --value hello.worker").split() == ["yes", "yes"]
    tick = wait_for("timer run", lambda: re.search(
        rf"^tick \d+ /srv/hello/releases/{release}/\.venv$", droplet.run("cat /srv/hello/shared/log/timer.txt")[1],
        re.M), seconds=15)
    assert tick
    res = droplet.fab("-H", droplet.name, "status", env=settings(app))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hello.worker.service running" in res.stdout and "hello.tick.timer waiting" in res.stdout
    res = droplet.fab("-H", droplet.name, "logs", "--process", "worker", env=settings(app))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"worker started in {release}" in res.stdout
    assert "nginx" not in res.stdout and "gunicorn" not in res.stdout  # that process's log only


def test_a_second_deploy_is_one_round_trip_and_restarts_nothing(droplet, app):
    pid = main_pid(droplet, "hello.worker")
    res = deploy(droplet, app, "-v")
    assert f"{droplet.name}: no changes, nothing restarted" in res.stdout
    assert f"{droplet.name}: 1 SSH round trip(s)" in res.stdout
    assert main_pid(droplet, "hello.worker") == pid


def test_a_new_release_restarts_the_worker_in_it_after_the_switch(droplet, app):
    old, pid = live(droplet), main_pid(droplet, "hello.worker")
    (app / "app.py").write_text(APP.replace('"v1"', '"v2"'))
    t0 = time.monotonic()
    res = deploy(droplet, app)
    print(f"code change deploy: {time.monotonic() - t0:.1f}s")
    new = live(droplet)
    assert new != old and get(droplet.address)[2] == f"v2 release {new}\n"
    out = res.stdout
    assert out.index("changed switch hello") < out.index("changed processes and timers of hello (restart "
                                                          "hello.worker.service)")
    log = worker_log(droplet)
    assert log.index(f"stopped {old} ") < log.index(f"started {new} ")  # stopped gracefully, then the new one
    assert main_pid(droplet, "hello.worker") != pid
    wait_for("timer run in the new release", lambda: f"/srv/hello/releases/{new}/.venv" in droplet.run(
        "cat /srv/hello/shared/log/timer.txt")[1], seconds=15)


def test_maintenance_answers_visitors_503_while_deploys_go_on(droplet, app):
    res = droplet.fab("-H", droplet.name, "maintenance.on", "--message", "<b>Back</b> at 5 & soon", env=settings(app))
    assert res.returncode == 0, res.stdout + res.stderr
    status, headers, body = get(droplet.address)
    assert status == 503 and "&lt;b&gt;Back&lt;/b&gt; at 5 &amp; soon" in body and "<b>" not in body
    assert headers["Cache-Control"] == "no-store"
    assert get(droplet.address, f"/static/{HASHED}")[0] == 503
    # the host itself still reaches the app
    local = droplet.sh("python3 -c \"import urllib.request as u; "
                       "print(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1/').read().decode())\"")
    assert local.startswith("v2 release ")
    (app / "maintenance.html").write_text("<p>our own page</p>\n")
    (app / "app.py").write_text(APP.replace('"v1"', '"v3"'))
    deploy(droplet, app)  # its health check reaches the new release through nginx
    status, _, body = get(droplet.address)
    assert (status, body) == (503, "<p>our own page</p>\n")
    res = droplet.fab("-H", droplet.name, "maintenance.off", env=settings(app))
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address)[2] == f"v3 release {live(droplet)}\n"


def test_a_rollback_moves_the_worker_back(droplet, app):
    old = live(droplet)
    res = droplet.fab("-H", droplet.name, "rollback", env=settings(app))
    assert res.returncode == 0, res.stdout + res.stderr
    back = live(droplet)
    assert back != old and "restart hello.worker.service" in res.stdout
    log = worker_log(droplet)
    assert log.rindex(f"stopped {old} ") < log.rindex(f"started {back} ")
    assert droplet.sh("systemctl show -p WorkingDirectory --value hello.tick.service").strip() == \
        f"/srv/hello/releases/{back}"


def test_dropped_processes_and_timers_are_stopped_and_removed(droplet, app):
    (app / "Procfile").write_text("web: gunicorn app:app\n")
    res = deploy(droplet, app, FABRIC_APP_TIMERS="{}")
    assert "remove hello.tick.service hello.tick.timer hello.worker.service" in res.stdout
    assert droplet.run("systemctl is-active hello.worker.service hello.tick.timer")[0] != 0
    assert droplet.sh("ls /etc/systemd/system /etc/systemd/system/*.wants | grep -c '^hello\\.' || true").strip() == "0"
    res = droplet.fab("-H", droplet.name, "logs", "--process", "worker", env=settings(app, FABRIC_APP_TIMERS="{}"))
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: app hello has no process or timer 'worker'; it has none (app.processes, "
                                  "app.timers, a Procfile)")
