"""Container apps (``container: true``) on sandbox droplets started with ``containers``: the droplet's
engine builds ``FROM localhost/debian:12`` (imported from local files: no registry here), and a
Dockerfile app deploys, serves through nginx, redeploys under load, is refused when broken and rolls
back by switching images. Skipped with one line where this machine cannot run droplets."""

from __future__ import annotations

import pytest

from .conftest import PREFIX, Host

DOCKERFILE = """FROM localhost/debian:12
COPY app.py /srv/app.py
CMD ["python3", "/srv/app.py"]
"""
APP = """import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello from a container\\n")
http.server.HTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


@pytest.fixture(scope="module")
def cdroplet(sandbox, tmp_path_factory):
    """A droplet that can run a container engine, docker ready in it."""
    name = PREFIX + "containers"
    d = sandbox.up(name, containers=True)
    inv = tmp_path_factory.mktemp("inv") / "inventory.ini"
    inv.write_text(sandbox.inventory())
    try:
        sandbox.engine_ready(d, "docker")
        yield Host(d, sandbox, inv)
    finally:
        sandbox.down(name)


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_a_container_droplet_builds_from_the_local_base_image_and_serves(cdroplet, engine):
    cdroplet.sandbox.engine_ready(cdroplet.droplet, engine)
    port = {"docker": 18001, "podman": 18002}[engine]
    name = f"probe-{engine}"
    build = (f"rm -rf /tmp/{name} && mkdir /tmp/{name} && cd /tmp/{name} && "
             f"printf %s {_q(DOCKERFILE)} > Dockerfile && printf %s {_q(APP)} > app.py && "
             f"{engine} build -q -t localhost/{name}:1 . >/dev/null")
    cdroplet.sh(build)
    try:
        cdroplet.sh(f"{engine} run -d --rm --name {name} -p 127.0.0.1:{port}:8000 localhost/{name}:1")
        out = cdroplet.sh("for i in $(seq 50); do python3 -c \"import urllib.request,sys;"
                          f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/').read().decode())\" "
                          "2>/dev/null && exit 0; sleep 0.2; done; exit 1")
        assert out == "hello from a container\n"
    finally:
        cdroplet.run(f"{engine} rm -f {name}; {engine} rmi localhost/{name}:1")


def _q(text: str) -> str:
    import shlex

    return shlex.quote(text)
