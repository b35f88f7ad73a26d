"""The switch as it runs on a host, by a real local python against a tree of the test's (every path
from a Layout pointing into it): ``systemctl``, ``journalctl`` and ``nginx`` faked on PATH (each
records its calls in ``calls``), a unix-socket HTTP server standing in for the new slot's gunicorn
and a TCP one on 127.0.0.1 for nginx (answering with the socket the upstream file names, in the
header the site proves who answered with)."""

import http.server
import json
import os
import socket
import socketserver
import subprocess
import shlex
import tempfile
import threading

import pytest

from provision.layout import UPSTREAM_HEADER, Layout
from provision import remote
from provision.remote import switch_command

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the switch refuses a release that is not root's")

SYSTEMCTL = """#!/bin/bash
echo "systemctl $*" >> "$FAKE/calls"
[ "$1" = show ] && cat "$FAKE/state"
[ "$1" = is-active ] && { [ ! -e "$FAKE/down" ]; exit; }
exit 0
"""
JOURNALCTL = """#!/bin/bash
echo "journalctl $*" >> "$FAKE/calls"
cat "$FAKE/journal" 2>/dev/null
"""
NGINX = """#!/bin/bash
echo "nginx $*" >> "$FAKE/calls"
[ -e "$FAKE/nginx-refuses" ] && { echo 'nginx: [emerg] host not found in upstream'; exit 1; }
exit 0
"""
STARTING, RUNNING = "ActiveState=activating\nSubState=start\nNRestarts=0\n", "ActiveState=active\nSubState=running\n"
CRASHED = "ActiveState=failed\nSubState=failed\nNRestarts=0\n"
TRACEBACK = "Booting worker\nTraceback (most recent call last):\n  File \"app.py\", line 3\nRuntimeError: boom\n"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header(UPSTREAM_HEADER, self.server.says())
        self.end_headers()

    def log_message(self, *a):
        pass


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(server, says):
    server.says = says
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


class Host:
    """A host's tree with release r1 live in slot a and release r2 uploaded, with the fakes."""

    def __init__(self, base):
        self.base = base
        self.layout = Layout("hello", nginx_dir=f"{base}/nginx", nginx_pid=f"{base}/nginx.pid",
                             run_dir=f"{base}/run", srv_dir=f"{base}/srv", systemd_dir=f"{base}/systemd")
        lay = self.layout
        for d in (f"{base}/bin", lay.socket_dir, lay.slots, lay.venv("k") + "/bin", lay.wants, lay.sockets_wants,
                  lay.sites_enabled, os.path.dirname(lay.upstream_file)):
            os.makedirs(d)
        for name, text in (("systemctl", SYSTEMCTL), ("journalctl", JOURNALCTL), ("nginx", NGINX)):
            self.write(f"{base}/bin/{name}", text, 0o755)
        self.write(lay.venv("k") + "/bin/gunicorn", "", 0o755)
        for release in ("r1", "r2"):
            own = f"{lay.release(release)}/.provision"
            os.makedirs(own)
            self.write(f"{own}/unit", f"[Service]\n# {release}\n")
            self.write(f"{own}/gunicorn.conf.py", "workers = 2\n")
            os.symlink("../../venvs/k", lay.release_venv(release))
        os.symlink("../releases/r1", lay.slot_link("a"))
        os.symlink("releases/r1", lay.current)
        self.write(lay.upstream_file, lay.upstream("a"))
        self.write(lay.site_enabled, "server {}\n")
        os.symlink(lay.unit_file("a"), f"{lay.wants}/hello@a.service")
        os.symlink(lay.socket_unit_file, f"{lay.sockets_wants}/hello@a.socket")
        self.write(f"{base}/state", RUNNING)
        self.nginx = serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler), self.upstream_socket)
        self.servers = [self.nginx]

    @staticmethod
    def write(path, text, mode=0o644):
        with open(path, "w") as fh:
            fh.write(text)
        os.chmod(path, mode)

    def upstream_socket(self):
        """What nginx's site says answered: the socket of the upstream file."""
        with open(self.layout.upstream_file) as fh:
            return "unix:" + fh.read().split()[1].split(":", 1)[1]

    def gunicorn(self, answers=True):
        """The new slot's socket: a server answering 200, or one that never answers."""
        if answers:
            self.servers.append(serve(UnixHTTPServer(self.layout.socket("b"), Handler), lambda: "app"))
        else:
            self.silent = socket.socket(socket.AF_UNIX)
            self.silent.bind(self.layout.socket("b"))
            self.silent.listen(8)

    def switch(self, prove=True, timeout=0.5, stage="all", log=None):
        health = {"path": "/health", "host": "", "timeout": timeout, "header": UPSTREAM_HEADER if prove else None}
        command = switch_command(self.layout, "r2", "b", "a", "deploy", "me@laptop", health, False,
                                 nginx=f"127.0.0.1:{self.nginx.server_address[1]}", stage=stage, log=log)
        return subprocess.run(["bash", "-c", command], text=True, capture_output=True, timeout=30,
                              env=dict(os.environ, FAKE=self.base, PATH=f"{self.base}/bin:{os.environ['PATH']}"))

    def calls(self):
        try:
            with open(f"{self.base}/calls") as fh:
                return fh.read().splitlines()
        except FileNotFoundError:
            return []

    def log(self):
        try:
            with open(self.layout.release_log) as fh:
                return [json.loads(line) for line in fh]
        except FileNotFoundError:
            return []

    def snapshot(self):
        """Every path under the tree: a link's target, a file's text."""
        out = {}
        for d, dirs, files in os.walk(self.base):
            for name in dirs + files:
                p = os.path.join(d, name)
                if os.path.islink(p):
                    out[p] = "-> " + os.readlink(p)
                elif os.path.isfile(p):
                    with open(p) as fh:
                        out[p] = fh.read()
        return {p: v for p, v in out.items() if not p.endswith(("/calls", "/state"))}


@pytest.fixture
def host():
    # short: a unix socket's path has room for 107 bytes
    base = tempfile.mkdtemp(prefix="sw", dir="/tmp")
    h = Host(base)
    yield h
    for s in h.servers:
        s.shutdown()
        s.server_close()
    subprocess.run(["rm", "-rf", base], check=True)


def test_a_healthy_release_goes_live_and_the_old_slot_is_retired(host):
    host.gunicorn()
    res = host.switch()
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == "hello@b now serves r2\n"
    lay = host.layout
    assert os.readlink(lay.slot_link("b")) == "../releases/r2"
    assert open(lay.unit_file("b")).read() == "[Service]\n# r2\n"  # the release's own unit
    assert open(lay.upstream_file).read() == lay.upstream("b")
    assert os.readlink(lay.current) == "releases/r2"
    assert [(e["release"], e["action"], e["by"], e["slot"]) for e in host.log()] == [("r2", "deploy", "me@laptop", "b")]
    assert sorted(os.listdir(lay.wants)) == ["hello@b.service"]
    assert os.readlink(f"{lay.wants}/hello@b.service") == lay.unit_file("b")
    assert os.readlink(f"{lay.sockets_wants}/hello@b.socket") == lay.socket_unit_file
    calls = host.calls()
    assert calls.index("systemctl start --no-block hello@b.service") < calls.index("nginx -t -q") \
        < calls.index("systemctl reload-or-restart nginx")
    assert "systemctl daemon-reload" in calls  # the unit file changed
    assert calls[-1] == "systemctl stop --no-block hello@a.service hello@a.socket"
    assert not [p for p in host.snapshot() if p.endswith(".provision-tmp")]


def refused(host, res):
    """The new instance was stopped and the release logged as refused."""
    assert res.returncode == 1
    assert "systemctl stop hello@b.service hello@b.socket" in host.calls()
    assert [e["action"] for e in host.log()] == ["refused"]
    assert open(host.layout.upstream_file).read() == host.layout.upstream("a")
    assert os.readlink(host.layout.current) == "releases/r1"
    assert "systemctl stop --no-block hello@a.service hello@a.socket" not in host.calls()


def test_an_app_that_exits_is_refused_with_its_exception_first(host):
    host.write(f"{host.base}/state", CRASHED)
    host.write(f"{host.base}/journal", TRACEBACK)
    host.gunicorn(answers=False)
    res = host.switch(timeout=5)
    refused(host, res)
    message, _, excerpt = res.stderr.partition("--- hello@b's log ---\n")
    assert message.startswith("health check of release r2 failed: hello@b exited (it is failed); traffic stays")
    assert excerpt.splitlines()[0] == "exception: RuntimeError: boom"
    assert excerpt.splitlines()[1] == "  Traceback (most recent call last):"
    assert "nginx -t -q" not in host.calls()


ORIGIN = {"commit": "0b40e48c" * 5, "tests": {"result": "passed", "seconds": 2.5}, "via": "ship"}


def test_the_release_log_says_where_a_release_came_from_when_it_goes_live_or_is_refused(host):
    host.gunicorn()
    assert host.switch(log=ORIGIN).returncode == 0
    entry = host.log()[-1]
    assert {k: entry[k] for k in ORIGIN} == ORIGIN and (entry["action"], entry["slot"]) == ("deploy", "b")


def test_a_refused_release_logs_its_origin_too(host):
    host.write(f"{host.base}/state", STARTING)
    host.gunicorn(answers=False)
    host.switch(timeout=0.3, log=ORIGIN)
    assert [(e["action"], e["commit"]) for e in host.log()] == [("refused", ORIGIN["commit"])]


def test_an_app_that_never_answers_is_refused_after_the_timeout(host):
    host.write(f"{host.base}/state", STARTING)
    host.gunicorn(answers=False)
    res = host.switch(timeout=0.5)
    refused(host, res)
    assert "failed: no healthy answer within 0.5s" in res.stderr


def test_a_config_nginx_refuses_puts_the_upstream_back(host):
    host.gunicorn()
    host.write(f"{host.base}/nginx-refuses", "")
    res = host.switch()
    refused(host, res)
    assert "nginx -t failed, traffic not moved: nginx: [emerg] host not found in upstream" in res.stderr
    assert "systemctl reload-or-restart nginx" not in host.calls()


def test_when_nginx_does_not_answer_from_the_new_socket_the_upstream_goes_back(host):
    host.gunicorn()
    host.nginx.says = lambda: "unix:/somewhere/else.sock"  # another app's site, say
    res = host.switch(timeout=0.3)
    refused(host, res)
    assert "answers on its socket, but not through nginx (HTTP 200 from unix:/somewhere/else.sock)" in res.stderr
    assert host.calls().count("systemctl reload-or-restart nginx") == 2  # moved, then back


def test_without_a_proving_site_nginx_is_not_asked(host):
    host.gunicorn()
    host.nginx.says = lambda: ""
    assert host.switch(prove=False).returncode == 0


@pytest.mark.parametrize("tamper", ["chown 65534 {own}", "chmod g+w {own}/unit", "chmod o+w {release}",
                                    "chown 65534 {venvs}/k"])
def test_a_release_that_is_not_roots_alone_is_refused_and_nothing_changes(host, tamper):
    host.gunicorn()
    release = host.layout.release("r2")
    subprocess.run(tamper.format(own=f"{release}/.provision", release=release, venvs=host.layout.venvs),
                   shell=True, check=True)
    before = host.snapshot()
    res = host.switch()
    assert res.returncode == 1 and "release r2 is not root's alone" in res.stderr
    assert host.snapshot() == before and host.calls() == []


def test_the_switch_never_starts_a_release_in_the_live_slot(host):
    health = {"path": "/health", "host": "", "timeout": 0.5, "header": None}
    with pytest.raises(ValueError, match="idle slot"):
        switch_command(host.layout, "r2", "a", "a", "deploy", "me", health, False)
    args = json.loads(shlex.split(switch_command(host.layout, "r2", "b", "a", "deploy", "me", health, False))[-1])
    args["old"]["slot"] = "b"  # as a caller's mistake would give it
    before = host.snapshot()
    res = subprocess.run(["bash", "-c", remote.python("switch.py", args)], text=True, capture_output=True, timeout=30,
                         env=dict(os.environ, FAKE=host.base, PATH=f"{host.base}/bin:{os.environ['PATH']}"))
    assert res.returncode == 1 and "the new slot b is the live one" in res.stderr
    assert host.snapshot() == before and host.calls() == []


def test_a_prepare_starts_the_release_in_the_idle_slot_and_moves_nothing_else(host):
    host.gunicorn()
    lay = host.layout
    res = host.switch(stage="prepare")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello@b prepared r2 on its own socket; traffic stays where it was\n"
    assert os.readlink(lay.slot_link("b")) == "../releases/r2"
    assert "systemctl start --no-block hello@b.service" in host.calls()
    # traffic, `current`, the release log and what starts at boot: as they were
    assert open(lay.upstream_file).read() == lay.upstream("a") and os.readlink(lay.current) == "releases/r1"
    assert host.log() == [] and os.listdir(lay.wants) == ["hello@a.service"]
    assert not [c for c in host.calls() if c.startswith(("nginx", "systemctl stop --no-block hello@a"))]


def prepared(host):
    """r2 prepared in slot b: its link, its own unit installed, its instance up."""
    host.gunicorn()
    os.symlink("../releases/r2", host.layout.slot_link("b"))
    host.write(host.layout.unit_file("b"), "[Service]\n# r2\n")


def test_a_commit_moves_traffic_to_the_prepared_instance_without_restarting_it_and_keeps_the_old(host):
    prepared(host)
    lay = host.layout
    res = host.switch(stage="commit")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello@b already runs r2 (prepared): not restarted\nhello@b now serves r2\n"
    assert not [c for c in host.calls() if "hello@b" in c and c.startswith(("systemctl start", "systemctl stop",
                                                                             "systemctl restart"))]
    assert open(lay.upstream_file).read() == lay.upstream("b") and os.readlink(lay.current) == "releases/r2"
    assert [(e["release"], e["action"]) for e in host.log()] == [("r2", "deploy")]
    assert sorted(os.listdir(lay.wants)) == ["hello@b.service"]  # b starts at boot; a still runs
    assert not [c for c in host.calls() if c.startswith("systemctl stop")]


def test_a_revert_goes_back_to_the_instance_still_running_and_stops_the_other(host):
    prepared(host)
    res = host.switch(stage="revert")
    assert res.returncode == 0, res.stderr
    assert "not restarted" in res.stdout
    assert host.calls()[-1] == "systemctl stop --no-block hello@a.service hello@a.socket"


@pytest.mark.parametrize("change", ["unit", "down", "all"])
def test_an_idle_instance_is_restarted_unless_it_runs_the_release_as_prepared(host, change):
    prepared(host)
    if change == "unit":  # its unit is not the release's own (changed since)
        host.write(host.layout.unit_file("b"), "[Service]\n# older\n")
    elif change == "down":
        host.write(f"{host.base}/down", "")  # stopped (it answers once restarted)
    res = host.switch(stage="commit" if change != "all" else "all")
    assert res.returncode == 0, res.stderr
    assert "not restarted" not in res.stdout and "systemctl start --no-block hello@b.service" in host.calls()
