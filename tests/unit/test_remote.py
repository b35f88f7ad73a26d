"""The programs that run on a host, run here by a real local python or bash as the helper ships them,
with what they talk to faked: a real HTTP server on 127.0.0.1, a fake ``systemctl`` on PATH."""

import http.server
import json
import os
import shlex
import subprocess
import threading
import time

import pytest

from provision import remote
from provision.app import health_check
from provision.layout import Layout
from provision.steps import HttpCheck, Service, Facts

HELLO = tuple(Layout("hello").address(slot) for slot in "ab")  # a WSGI app's slots, as nginx names them


def run(command, **env):
    """A command from the payload helper, as the apply script's bash runs it (with ``env``)."""
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **env))


def test_a_python_program_ships_with_its_libraries_and_its_arguments_as_json():
    command = remote.python("facts.py", [["os", ""]])
    src, args = shlex.split(command)[2:]
    assert src.startswith("# provision: facts.py\n" + remote.text("lib_http.py")) and src.endswith(remote.text("facts.py"))
    assert json.loads(args) == [["os", ""]]
    assert json.loads(run(command).stdout)["facts"][0]["python"]


def test_a_bash_program_gets_its_variables_quoted():
    script = remote.bash("lock.sh", {"__x": "it's $(no) `expansion`"})
    assert script.startswith("__x='it'\"'\"'s $(no) `expansion`'\n")
    with pytest.raises(ValueError):
        remote.bash("lock.sh", {"no-name": 1})


@pytest.fixture
def server():
    """An HTTP server answering /ok 200 and anything else 404, each with the upstream header the
    test sets; ``seen`` records each request's path and Host header."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            srv.seen.append((self.path, self.headers["Host"]))
            self.send_response(200 if self.path == "/ok" else 404)
            self.send_header("X-Provision-Upstream", srv.upstream)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.seen, srv.upstream = [], "unix:/run/provision/hello/a.sock"
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.shutdown()


def check(url, host="", timeout=0.4, expect=None):
    return run(HttpCheck(url, host_header=host, timeout=timeout, expect=expect).command())


def test_the_health_check_passes_on_a_2xx_from_who_it_expects(server):
    res = check(server.url + "/ok", "example.test", expect=("X-Provision-Upstream", HELLO))
    assert res.returncode == 0, res.stderr
    assert server.seen == [("/ok", "example.test")]
    assert check(server.url + "/ok").returncode == 0
    assert server.seen[-1] == ("/ok", server.url.split("//")[1])  # the URL's own host:port


def test_the_health_check_retries_then_says_what_answered(server):
    t0 = time.monotonic()
    res = check(server.url + "/missing")
    assert res.returncode == 1 and time.monotonic() - t0 >= 0.4
    assert len(server.seen) > 1  # retried
    assert res.stderr.strip() == f"health check: {server.url}/missing answered HTTP 404 after 0.4s"
    server.upstream = "unix:/run/provision/other/a.sock"
    res = check(server.url + "/ok", expect=("X-Provision-Upstream", HELLO))
    assert res.stderr.strip() == (f"health check: {server.url}/ok answered HTTP 200, X-Provision-Upstream: "
                                  "'unix:/run/provision/other/a.sock' after 0.4s")


def test_the_final_health_check_wants_one_of_this_apps_own_slots(server, tmp_path):
    """Not any socket nor any local port: another app's container (or any program) on 127.0.0.1 is refused."""
    from .test_containers import app
    s = app(tmp_path)
    mine, other = s.layout, Layout("other", container=True)
    expect = health_check(s, True).expect
    assert expect == ("X-Provision-Upstream", (f"127.0.0.1:{mine.slot_port('a')}", f"127.0.0.1:{mine.slot_port('b')}"))
    for answered, ok in ((mine.address("b"), True), (other.address("a"), False), ("127.0.0.1:8000", False),
                         (mine.address("a") + "0", False), (Layout("hello").address("a"), False)):
        server.upstream = answered
        assert (check(server.url + "/ok", expect=expect).returncode == 0) is ok, answered


def test_the_health_check_of_a_port_nothing_listens_on_names_the_error():
    res = check("http://127.0.0.1:9/", timeout=0.2)
    assert res.returncode == 1 and res.stderr.startswith("health check: http://127.0.0.1:9/ answered ")
    assert "refused" in res.stderr


# -- nginx_reload.py: a fake master with two workers, a fake systemctl that retires them late
SYSTEMCTL = """#!/bin/bash
echo "systemctl $*" >> "$FAKE/calls"
[ "$1" = fail ] && { echo "Job for nginx.service failed."; exit 1; }
# as nginx does on a reload: the old workers finish their requests, then exit
(sleep 0.3; kill $(cat "$FAKE/workers")) > /dev/null 2>&1 &
"""


@pytest.fixture
def master(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text(SYSTEMCTL)
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    proc = subprocess.Popen(["bash", "-c", "sleep 30 & echo $!; sleep 30 & echo $!; wait"], stdout=subprocess.PIPE,
                            text=True)
    pids = [int(proc.stdout.readline()) for _ in range(2)]
    (tmp_path / "workers").write_text(" ".join(map(str, pids)))
    (tmp_path / "nginx.pid").write_text(f"{proc.pid}\n")
    yield tmp_path
    proc.kill()
    proc.wait()
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def reload_command(master):
    """What the Service step runs to reload a running nginx that was notified."""
    step = Service("nginx", reload_on=("nginx",), pidfile=str(master / "nginx.pid"))
    facts = Facts({("service", "nginx"): {"loaded": True, "active": True, "enabled": True, "pid": 1}})
    return step.plan(facts, {"nginx"}).commands[-1]


def workers(master):
    return (master / "workers").read_text().split()


def fake_path(master):
    return {"FAKE": str(master), "PATH": f"{master / 'bin'}:{os.environ['PATH']}"}


def test_a_reload_returns_once_the_old_workers_are_gone(master):
    t0 = time.monotonic()
    res = run(reload_command(master), **fake_path(master))
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.monotonic() - t0 >= 0.3
    assert not any(os.path.exists(f"/proc/{p}") for p in workers(master))
    assert (master / "calls").read_text() == "systemctl reload nginx\n"


def test_a_failed_reload_says_why_and_waits_for_nothing(master):
    args = json.loads(shlex.split(reload_command(master))[-1])
    t0 = time.monotonic()
    res = run(remote.python("nginx_reload.py", dict(args, action="fail")), **fake_path(master))
    assert (res.returncode, res.stdout) == (1, "Job for nginx.service failed.\n")
    # (waiting would last until the workers end: 30 s)
    assert time.monotonic() - t0 < 10 and all(os.path.exists(f"/proc/{p}") for p in workers(master))
