"""Monitoring on one droplet: `fab status` with health, traffic and its 5xx ratio, memory, CPU and disk;
the health monitor (app.monitor) restarting a frozen app and calling a webhook this test serves; `fab logs
--since/--grep`. Order matters: each test goes on from the state the one before left."""

import json
import re
import shlex
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from provision.layout import Layout
from provision.sandbox import GATEWAY

from .conftest import check_outcomes, wait_for

pytestmark = pytest.mark.integration

APP = '''def app(environ, start_response):
    if environ["PATH_INFO"] == "/fail":
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [b"broken on purpose\\n"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"fine\\n"]
'''
LAY = Layout("hello")
EVERY = 5  # seconds between the monitor's checks
FAILURES = 2
TOKEN = uuid.uuid4().hex  # the webhook's secret path: it must show nowhere


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.calls.append((self.path, json.loads(body), time.monotonic()))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hook():
    """A webhook on the sandbox bridge's address (an ephemeral port), stopped after the module."""
    server = ThreadingHTTPServer((str(GATEWAY), 0), Hook)
    server.calls = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = tmp_path_factory.mktemp("app") / "moni"
    d.mkdir()
    (d / "app.py").write_text(APP)
    (d / "requirements.txt").write_text("")
    return d


def settings(app, hook) -> dict:
    return {"FABRIC_APP_SOURCE": str(app), "FABRIC_APP_MONITOR": str(EVERY),
            "FABRIC_APP_MONITOR_FAILURES": str(FAILURES), "FABRIC_APP_GRACEFUL_TIMEOUT": "3",
            "FABRIC_APP_MONITOR_WEBHOOK": f"http://{GATEWAY}:{hook.server_address[1]}/hook/{TOKEN}"}


OUTPUTS: list[str] = []  # everything fab printed in this module: the webhook must be in none of it


def fab(droplet, *args, env=None, ok=True):
    res = droplet.fab("-H", droplet.name, *args, env=env)
    OUTPUTS.append(res.stdout + res.stderr)
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def get(address: str, path: str = "/") -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_deploy_installs_the_monitor_and_status_reports_traffic(droplet, app, hook):
    fab(droplet, "deploy", env=settings(app, hook))
    assert droplet.sh(f"systemctl is-active {LAY.monitor_unit}.timer").strip() == "active"
    assert droplet.sh(f"stat -c '%a %U' {LAY.monitor_dir} {LAY.monitor_config}").split("\n")[:2] == ["700 root",
                                                                                                    "600 root"]
    assert "no changes, nothing restarted" in fab(droplet, "deploy", env=settings(app, hook)).stdout
    # the kit's checks rate the monitor's sandbox too (systemd-analyze security)
    res = fab(droplet, "check", env=settings(app, hook))
    assert "test_every_unit_of_the_app_is_sandboxed" in check_outcomes(res.stdout)["PASSED"], res.stdout
    assert [get(droplet.address) for _ in range(15)] == [200] * 15
    assert [get(droplet.address, "/fail") for _ in range(5)] == [500] * 5
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        res = fab(droplet, "status", env=settings(app, hook))
        times.append(time.monotonic() - t0)
    print(f"fab status, one host: median of 5 {statistics.median(times):.2f}s ({', '.join(f'{t:.2f}' for t in times)})")
    out = res.stdout
    print(out)
    assert re.search(r"health ok \(200, \d+ ms\)", out), out
    # over the time since the first request (the log began within the window): 5 of the 20 requests, the
    # monitor's and status's own checks not logged
    rate, ratio = re.search(r"(\d+\.\d+) req/s, 5xx (\d+\.\d)% over (\d+ min|\d+s)", out).groups()[:2]
    assert float(rate) > 0 and 0 < float(ratio) <= 25, out
    # the health checks from the host itself (health_path: /) were not logged; the monitor made some by now
    assert droplet.sh(f"grep -c '^127.0.0.1 .*\"GET / HTTP' {LAY.access_log} || true").strip() == "0", out
    memory, unit = re.search(r"memory (\d+\.\d) (KiB|MiB|GiB)", out).groups()
    assert unit in ("MiB", "GiB") or float(memory) > 0, out  # gunicorn's master and workers
    assert re.search(r"cpu \d+\.\d%", out), out
    pct = int(re.search(r"disk \S+ \S+ of \S+ \S+ \((\d+)%\)", out).group(1))
    assert 0 < pct <= 100, out
    assert re.search(r"hello@[ab] running", out) and "; live for " in out


def test_monitor_restarts_a_frozen_app_and_calls_the_webhook(droplet, app, hook):
    slot = droplet.live_slot()
    unit = LAY.unit(slot)
    pid = droplet.sh(f"systemctl show -p MainPID --value {unit}").strip()
    # SIGSTOP to every process of the live slot: systemd sees nothing wrong (the unit stays active, and its
    # socket would start a stopped one again), but the app answers nothing
    t0 = time.monotonic()
    droplet.sh(f"systemctl kill --signal=SIGSTOP {unit}")
    res = fab(droplet, "status", env=settings(app, hook), ok=False)
    assert res.returncode == 1 and "health check / DOWN" in res.stdout + res.stderr, res.stdout + res.stderr
    # checks every 5 s, 2 failures (a check waits 5 s), the restart (graceful_timeout 3 s): within 60 s
    down = wait_for("down webhook", lambda: [c for c in hook.calls if c[1]["event"] == "down"], 60)
    restarted = wait_for("restart", lambda: droplet.sh(f"systemctl show -p MainPID --value {unit}").strip()
                         not in (pid, "0"), 30)
    noticed = down[0][2] - t0
    recovered = wait_for("recovered webhook", lambda: [c for c in hook.calls if c[1]["event"] == "recovered"], 60)
    print(f"monitor: down noticed and restarted after {noticed:.1f}s; recovered after "
          f"{recovered[0][2] - t0:.1f}s")
    assert restarted and get(droplet.address) == 200
    path, body, _ = down[0]
    assert path == f"/hook/{TOKEN}"
    release = droplet.sh(f"readlink {LAY.current}").strip().rsplit("/", 1)[-1]
    assert {k: body[k] for k in ("app", "event", "failures", "release")} == {
        "app": "hello", "event": "down", "failures": FAILURES, "release": release}
    assert body["host"] and "hello" in body["text"]
    assert recovered[0][1]["event"] == "recovered" and recovered[0][1]["release"] == release
    assert [c[1]["event"] for c in hook.calls] == ["down", "recovered"]  # once each
    journal = droplet.sh(f"journalctl -u {LAY.monitor_unit} --no-pager")
    assert f"restarted {unit}" in journal and TOKEN not in journal


def test_a_webhook_urllib_cannot_use_is_not_quoted_in_the_journal(droplet, app, hook):
    """The installed program, on the host's python, with a URL holding user:TOKEN@ (the settings refuse
    it; written here by hand): urllib's error quotes the netloc, the monitor only the error's type. What
    it writes on stderr is what its journal gets."""
    config = json.loads(droplet.sh(f"cat {LAY.monitor_config}"))
    config.update(url="http://127.0.0.1:9/", failures=1, state="/root/monfix-state.json", slots={},  # no restart
                  webhook=f"http://user:{TOKEN}@{GATEWAY}/hook")
    droplet.sh(f"umask 077 && printf '%s' {shlex.quote(json.dumps(config))} > /root/monfix-config.json")
    rc, out, err = droplet.run(f"python3 {LAY.monitor_program} /root/monfix-config.json; "
                               "rm -f /root/monfix-config.json /root/monfix-state.json")
    assert rc == 0 and "webhook: down not sent: InvalidURL" in err and TOKEN not in out + err, out + err


def test_logs_since_and_grep_return_only_matching_lines(droplet, app, hook):
    old, new = f"/old-{uuid.uuid4().hex[:8]}", f"/new-{uuid.uuid4().hex[:8]}"
    get(droplet.address, old)
    time.sleep(2.5)
    since = datetime.now(timezone.utc).replace(microsecond=0)
    time.sleep(1.5)
    get(droplet.address, new)
    lines = fab(droplet, "logs", "--grep", "GET /(old|new)-", "--lines", "50", env=settings(app, hook)).stdout.splitlines()
    assert any(old in l for l in lines) and any(new in l for l in lines), lines
    assert all(re.search(r"GET /(old|new)-", l) for l in lines), lines
    res = fab(droplet, "logs", "--since", since.strftime("%Y-%m-%d %H:%M:%S"), "--lines", "200", env=settings(app, hook))
    assert new in res.stdout and old not in res.stdout, res.stdout
    res = fab(droplet, "logs", "--since", "1m", "--grep", "fail", env=settings(app, hook))
    assert all(" | " in l and "fail" in l.split(" | ", 1)[1] for l in res.stdout.splitlines()), res.stdout
    res = fab(droplet, "logs", "--since", "next tuesday", env=settings(app, hook), ok=False)
    assert res.returncode == 2 and "--since 'next tuesday'" in res.stderr and "Traceback" not in res.stderr
    # a pattern the host's grep refuses: its one line and exit 2 (it was silence and 0)
    res = fab(droplet, "logs", "--grep", "(", env=settings(app, hook), ok=False)
    assert res.returncode == 2 and "--grep '(': grep: Unmatched ( or \\(" in res.stderr, res.stdout + res.stderr
    assert fab(droplet, "logs", "--since", "999999d", "--lines", "3", env=settings(app, hook)).returncode == 0


def test_the_webhook_shows_nowhere(droplet, app, hook):
    other = {**settings(app, hook), "FABRIC_APP_MONITOR_WEBHOOK": f"http://{GATEWAY}:9/hook/{TOKEN}-2"}
    res = fab(droplet, "deploy", "--dry-run", env=other)
    assert "config.json" in res.stdout  # the config would change; its content is not shown
    assert not [o for o in OUTPUTS if TOKEN in o]
    # on the host: only in root's own files
    found = droplet.run(f"grep -rlF {TOKEN} /etc /srv /var/lib /var/log /run /usr /tmp /home 2>/dev/null")[1].split()
    assert found, "the monitor's config holds the webhook"
    for path in found:
        assert droplet.sh(f"stat -c '%a %U' {path}").strip() == "600 root", path
        assert path.startswith(LAY.monitor_dir), path


def test_without_the_setting_the_monitor_goes(droplet, app, hook):
    env = {k: v for k, v in settings(app, hook).items() if not k.startswith("FABRIC_APP_MONITOR")}
    fab(droplet, "deploy", env=env)
    assert droplet.run(f"systemctl is-active {LAY.monitor_unit}.timer")[0] != 0
    assert droplet.run(f"ls {LAY.monitor_dir} {LAY.monitor_timer_file} {LAY.monitor_service_file}")[0] != 0
    assert "no changes, nothing restarted" in fab(droplet, "deploy", env=env).stdout  # and stays gone
