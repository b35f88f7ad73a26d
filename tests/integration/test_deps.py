"""Dependencies, deployed for real, three apps on one droplet (so their nginx sites sit side by
side): hash-pinned requirements with an include; a pyproject.toml-only app in a src/ layout; a
FastAPI app (asgi: true) whose WebSocket answers through nginx and keeps answering across a
redeploy. Order matters: one droplet."""

import base64
import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration

# Real sha256 of the wheels on PyPI (gunicorn 27.0.1 needs no other package; six is pure Python)
HASHED = {
    "requirements.txt": "# hash-pinned: pip's --require-hashes mode\n-r requirements/base.txt\n"
                        "gunicorn==27.0.1 \\\n"
                        "    --hash=sha256:378b26b9a38adcf4592f28828233c1716acc55e833ea06bf48719782efaa0d10\n",
    "requirements/base.txt": "six==1.17.0 \\\n"
                             "    --hash=sha256:4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274\n",
    "app.py": "import six\n\n\ndef app(environ, start_response):\n"
              "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
              "    return [f'hashed with six {six.__version__}\\n'.encode()]\n",
}
SRC_LAYOUT = {
    "pyproject.toml": '[project]\nname = "shop"\nversion = "1.0"\nrequires-python = ">=3.9"\n'
                      'dependencies = ["six>=1.16"]\n\n[build-system]\nrequires = ["setuptools>=61"]\n'
                      'build-backend = "setuptools.build_meta"\n',
    "src/shop/__init__.py": "import six\n\n\ndef create_app():\n    def app(environ, start_response):\n"
                            "        start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                            "        return [f'shop from {__file__} with six {six.__version__}\\n'.encode()]\n"
                            "    return app\n",
}
ASGI_APP = '''import os

from fastapi import FastAPI, WebSocket

VERSION = "v1"
app = FastAPI()


@app.get("/")
def index():
    return {"version": VERSION, "pid": os.getpid()}


@app.websocket("/ws")
async def echo(ws: WebSocket):
    await ws.accept()
    async for text in ws.iter_text():
        await ws.send_text(f"{VERSION}: {text}")
'''
WORKER = """import time

import app

while True:  # which release this worker runs, where the test can read it (log/ is a linked dir)
    with open("log/worker", "w") as fh:
        fh.write(app.VERSION)
    time.sleep(0.5)
"""
APPS = {  # name: (files, settings)
    "hashed": (HASHED, {"SERVER_NAME": "hashed.test"}),
    "shop": (SRC_LAYOUT, {"SERVER_NAME": "shop.test", "WSGI": "shop:create_app()"}),
    "ws": ({"requirements.txt": "fastapi>=0.100\n", "app.py": ASGI_APP, "worker.py": WORKER,
            "Procfile": "worker: python worker.py\n"},
           {"SERVER_NAME": "ws.test", "ASGI": "true", "GRACEFUL_TIMEOUT": "5"}),
}
DISTRIBUTIONS = ("python3 -c \"import importlib.metadata as m; "
                 "print(' '.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))\"")


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    for name, (files, _) in APPS.items():
        for rel, text in files.items():
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / name / rel).write_text(text)
    return root


def deploy(droplet, apps, name, *args):
    env = {f"FABRIC_APP_{k}": v for k, v in APPS[name][1].items()}
    return droplet.fab("-H", droplet.name, "deploy", "--source", str(apps / name), *args,
                       env={"FABRIC_APP_NAME": name, **env})


def get(address: str, host: str, path: str = "/") -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(f"http://{address}{path}", headers={"Host": host}), timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


class WebSocket:
    """A minimal RFC 6455 client over a plain socket: handshake, masked text frames out, text frames in."""

    def __init__(self, address: str, host: str, path: str = "/ws"):
        self.sock = socket.create_connection((address, 80), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, f"connection closed during the handshake: {head!r}"
            head += chunk
        status, *lines = head.decode().split("\r\n")
        assert status.startswith("HTTP/1.1 101"), head
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert headers["sec-websocket-accept"] == accept.decode(), headers

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def send(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        assert len(payload) < 126
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the server (unmasked, short) but pings."""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(self._read(2), "big")
            opcode, payload = first & 0x0F, self._read(length)
            if opcode != 9:
                return opcode, payload

    def echo(self, text: str) -> str:
        self.send(text)
        opcode, payload = self.receive()
        assert opcode == 1, (opcode, payload)
        return payload.decode()

    def close(self) -> None:
        self.sock.close()


def test_hash_pinned_requirements_with_an_include_deploy_with_nothing_added(droplet, apps):
    t0 = time.monotonic()
    res = deploy(droplet, apps, "hashed")
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"fresh deploy of the hash-pinned app: {time.monotonic() - t0:.1f} s")
    assert get(droplet.address, "hashed.test") == "hashed with six 1.17.0\n"
    # exactly what the files pin: provision added nothing
    assert droplet.sh(f"/srv/hashed/current/.venv/bin/{DISTRIBUTIONS}").split() == ["gunicorn", "six"]
    key = droplet.sh("readlink /srv/hashed/current/.venv").strip().rsplit("/", 1)[-1]
    # the included file went along, at its path, in a folder only root can read
    *files, mode = droplet.sh(f"cd /srv/hashed/venvs/{key}/requirements && find . -type f; stat -c %a .").split()
    assert sorted(files) == ["./requirements.txt", "./requirements/base.txt"] and mode == "700"


def test_a_change_in_an_included_file_builds_a_new_virtualenv(droplet, apps):
    venv = droplet.sh("readlink /srv/hashed/current/.venv")
    base = apps / "hashed/requirements/base.txt"
    base.write_text("# six, for the app's greeting\n" + base.read_text())
    res = deploy(droplet, apps, "hashed")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed virtualenv" in res.stdout, res.stdout
    assert droplet.sh("readlink /srv/hashed/current/.venv") != venv
    assert get(droplet.address, "hashed.test") == "hashed with six 1.17.0\n"
    again = deploy(droplet, apps, "hashed")
    assert again.returncode == 0 and f"{droplet.name}: no changes, nothing restarted" in again.stdout, again.stdout


def test_a_wrong_hash_is_refused_by_pip_and_the_live_release_keeps_serving(droplet, apps):
    req = apps / "hashed/requirements.txt"
    good = req.read_text()
    req.write_text(good.replace("378b26b9", "0000aaaa"))
    try:
        res = deploy(droplet, apps, "hashed")
        out = res.stdout + res.stderr
        assert res.returncode == 1 and re.search(rf"{droplet.name}: FAILED +virtualenv", out), out
        assert "DO NOT MATCH THE HASHES" in out or "Expected sha256 0000aaaa" in out, out
    finally:
        req.write_text(good)
    assert get(droplet.address, "hashed.test") == "hashed with six 1.17.0\n"


def test_pyproject_only_src_layout_app_is_importable_without_being_installed(droplet, apps):
    res = deploy(droplet, apps, "shop")
    assert res.returncode == 0, res.stdout + res.stderr
    body = get(droplet.address, "shop.test")
    assert body.startswith("shop from /srv/shop/") and body.endswith("/src/shop/__init__.py with six 1.17.0\n")
    installed = droplet.sh(f"/srv/shop/current/.venv/bin/{DISTRIBUTIONS}").split()
    assert "six" in installed and "gunicorn" in installed and "shop" not in installed
    assert "pythonpath = 'src'" in droplet.sh("cat /srv/shop/current/.provision/gunicorn.conf.py")
    # fab run (and the release command, processes) import it too: PYTHONPATH=src in the release's env
    env = {f"FABRIC_APP_{k}": v for k, v in APPS["shop"][1].items()}
    ran = droplet.fab("-H", droplet.name, "run", "--", "python", "-c", "import shop; print(shop.__file__)",
                      env={"FABRIC_APP_NAME": "shop", "FABRIC_APP_SOURCE": str(apps / "shop"), **env})
    assert ran.returncode == 0 and ran.stdout.strip().endswith("/src/shop/__init__.py"), ran.stdout + ran.stderr


def worker_runs(droplet, version: str) -> bool:
    """The ws app's worker process writes the version of the release it runs, within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if droplet.run("cat /srv/ws/shared/log/worker")[1] == version:
            return True
        time.sleep(0.2)
    return False


def test_asgi_app_answers_http_and_websockets_through_nginx(droplet, apps):
    t0 = time.monotonic()
    res = deploy(droplet, apps, "ws")
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"fresh deploy of the FastAPI app: {time.monotonic() - t0:.1f} s")
    assert json.loads(get(droplet.address, "ws.test"))["version"] == "v1"
    assert worker_runs(droplet, "v1")  # the Procfile's worker, beside the ASGI app
    ws = WebSocket(droplet.address, "ws.test")
    try:
        assert ws.echo("hello") == "v1: hello"
        assert ws.echo("again") == "v1: again"
    finally:
        ws.close()
    # every app's site passes upgrades on, each with its own map variable (nginx -t passed with all three)
    sites = droplet.sh("grep -h 'map $http_upgrade' /etc/nginx/sites-enabled/*").split("\n")
    assert sorted(s.split()[2] for s in sites if s) == [
        "$provision_connection_hashed", "$provision_connection_shop", "$provision_connection_ws"]
    # the other apps still answer
    assert get(droplet.address, "hashed.test") == "hashed with six 1.17.0\n"


def test_websockets_keep_answering_across_a_redeploy(droplet, apps):
    errors, rounds, done = [], [0], threading.Event()

    def load():
        while not done.is_set() and rounds[0] < 3000:  # bounded
            try:
                json.loads(get(droplet.address, "ws.test"))
                ws = WebSocket(droplet.address, "ws.test")
                try:
                    assert ws.echo("ping").endswith(": ping")
                finally:
                    ws.close()
            except Exception as e:  # noqa: BLE001: every failure counts
                errors.append(repr(e))
            rounds[0] += 1
            time.sleep(0.02)

    open_ws = WebSocket(droplet.address, "ws.test")
    assert open_ws.echo("before") == "v1: before"
    (apps / "ws/app.py").write_text(ASGI_APP.replace('"v1"', '"v2"'))
    worker = threading.Thread(target=load)
    worker.start()
    t0 = time.monotonic()
    try:
        res = deploy(droplet, apps, "ws")
    finally:
        done.set()
        worker.join(60)
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"code-change deploy of the FastAPI app: {time.monotonic() - t0:.1f} s, {rounds[0]} HTTP+WebSocket rounds")
    assert rounds[0] > 10 and errors == [], errors[:5]
    # the old instance, stopping, closed the open connection: 1012, service restart (the client reconnects)
    t1 = time.monotonic()
    try:
        opcode, payload = open_ws.receive()
    finally:
        open_ws.close()
    print(f"the open WebSocket was closed {time.monotonic() - t1:.1f} s after the deploy: {opcode}, {payload!r}")
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1012, (opcode, payload)
    ws = WebSocket(droplet.address, "ws.test")
    try:
        assert ws.echo("after") == "v2: after"
    finally:
        ws.close()
    assert worker_runs(droplet, "v2")  # the worker runs the new release after the deploy
    again = deploy(droplet, apps, "ws")
    assert again.returncode == 0 and f"{droplet.name}: no changes, nothing restarted" in again.stdout, again.stdout
    # for comparison: the same code change with no WebSocket open while it deploys
    (apps / "ws/app.py").write_text(ASGI_APP.replace('"v1"', '"v3"'))
    t0 = time.monotonic()
    res = deploy(droplet, apps, "ws")
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"code-change deploy of the FastAPI app, no WebSocket open: {time.monotonic() - t0:.1f} s")
    assert json.loads(get(droplet.address, "ws.test"))["version"] == "v3"
