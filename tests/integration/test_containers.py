"""Container apps (``container: true``) on sandbox droplets started with ``containers``: the droplet's
engine builds ``FROM localhost/debian:12`` (imported from local files: no registry here), and a
Dockerfile app deploys, serves through nginx, redeploys under load, is refused when broken and rolls
back by switching images. Skipped with one line where this machine cannot run droplets."""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
import urllib.request

import pytest

from .conftest import PREFIX, Host, booted, wait_for

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


def container_host(sandbox, tmp_path_factory, name: str, engine: str | None):
    """A droplet that can run a container engine (``engine`` ready in it; None: none installed), torn down after."""
    name = PREFIX + name
    d = sandbox.up(name, containers=True)
    inv = tmp_path_factory.mktemp("inv") / "inventory.ini"
    inv.write_text(sandbox.inventory())
    try:
        if engine:
            sandbox.engine_ready(d, engine)
        yield Host(d, sandbox, inv)
    finally:
        sandbox.down(name)


@pytest.fixture(scope="module")
def cdroplet(sandbox, tmp_path_factory):
    """A droplet that can run a container engine, docker ready in it."""
    yield from container_host(sandbox, tmp_path_factory, "containers", "docker")


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
    return shlex.quote(text)


# -- a Dockerfile app deployed with `container: true` --------------------------------------------------

SERVER = """import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s\\n" % (os.environ.get("GREETING", ""), sys.argv[1])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("serving", sys.argv[1], flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""
BROKEN = """import sys
print("boom: DATABASE_URL is not set", flush=True)
sys.exit(3)
"""


def container_app(tmp_path, version: str, program: str = SERVER) -> str:
    d = tmp_path / version
    d.mkdir(exist_ok=True)
    (d / "Dockerfile").write_text(f'FROM localhost/debian:12\nCOPY app.py /srv/app.py\nCMD ["python3", "/srv/app.py", "{version}"]\n')
    (d / "app.py").write_text(program)
    return str(d)


APP_ENV = {"FABRIC_APP_NAME": "capp", "FABRIC_APP_CONTAINER": "true"}


def deploy(host: Host, source: str, *args: str, env: dict | None = None):
    t0 = time.monotonic()
    res = host.fab("-H", host.name, "deploy", "--source", source, *args, env={**APP_ENV, **(env or {})})
    return res, time.monotonic() - t0


def get(address: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}/", timeout=10) as r:
        assert r.status == 200
        return r.read().decode().strip()


class Load:
    """``clients`` clients hitting the droplet's site until stopped, at most ``count`` requests in all
    and ``limit`` seconds; every failed request is kept."""

    def __init__(self, address: str, clients: int = 4, count: int = 20000, limit: float = 90):
        self.address, self.count, self.limit = address, count, limit
        self.ok, self.failed, self.seen = 0, [], set()
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self):
        end = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            with self._lock:
                if self.ok + len(self.failed) >= self.count:
                    return
            try:
                body = get(self.address)
                with self._lock:
                    self.ok += 1
                    self.seen.add(body)
            except Exception as e:  # noqa: BLE001 - every failure counts
                with self._lock:
                    self.failed.append(repr(e))

    def __enter__(self):
        for t in self._threads:
            t.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


def test_a_dockerfile_app_deploys_serves_through_nginx_and_a_no_op_is_one_round_trip(cdroplet, tmp_path_factory):
    apps = tmp_path_factory.mktemp("capps")
    res, took = deploy(cdroplet, container_app(apps, "v1"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed image localhost/capp:" in res.stdout
    print(f"container deploy, fresh host (engine there): {took:.1f}s")
    assert get(cdroplet.address) == "v1"
    # docker's daemon pulls through the proxy (the sandbox inventory's), read from a root-only file
    assert f"https_proxy={cdroplet.sandbox.proxy_url}" in cdroplet.sh("tr '\\0' '\\n' < /proc/$(pidof dockerd)/environ")
    assert cdroplet.sh("stat -c %a /etc/systemd/system/docker.service.d/provision-proxy.env").strip() == "600"
    # the live slot's container publishes on 127.0.0.1 only
    ports = cdroplet.sh("docker ps --filter name=capp-a --format '{{.Ports}}'").strip()
    assert ports.startswith("127.0.0.1:") and "->8000/tcp" in ports, ports
    assert cdroplet.live_slot("capp") == "a"
    res, took = deploy(cdroplet, container_app(apps, "v1"), "-v")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 SSH round trip(s)" in res.stdout and "nothing restarted" in res.stdout, res.stdout
    print(f"container deploy, no-op: {took:.2f}s")
    # a dry run of a change says what it would build and switch, and changes nothing
    res, _ = deploy(cdroplet, container_app(apps, "v2"), "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "would   image localhost/capp:" in res.stdout and "would   switch capp" in res.stdout, res.stdout
    assert get(cdroplet.address) == "v1" and len(cdroplet.sh("docker images -q localhost/capp").split()) == 1
    # the kit's smoke checks know a container app's slots (ports, no sockets, no virtualenv)
    check = cdroplet.fab("-H", cdroplet.name, "check", env={**APP_ENV, "FABRIC_APP_SOURCE": container_app(apps, "v1")})
    assert check.returncode == 0, check.stdout + check.stderr
    assert "is a container app" in check.stdout or "SKIPPED" in check.stdout, check.stdout


def test_a_redeploy_under_load_drops_no_request(cdroplet, tmp_path_factory):
    apps = tmp_path_factory.mktemp("capps")
    with Load(cdroplet.address) as load:
        res, took = deploy(cdroplet, container_app(apps, "v2"))
        time.sleep(0.5)  # and a little after the switch
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"container deploy, code change: {took:.1f}s; {load.ok} requests under load, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    assert {"v1", "v2"} <= load.seen and load.ok > 20
    assert get(cdroplet.address) == "v2" and cdroplet.live_slot("capp") == "b"
    # the old slot's container is gone, its image kept for a rollback
    assert cdroplet.sh("docker ps --format '{{.Names}}'").split() == ["capp-b"]
    assert len(cdroplet.sh("docker images -q localhost/capp").split()) == 2


def test_a_broken_image_is_refused_with_its_log_and_traffic_stays(cdroplet, tmp_path_factory):
    apps = tmp_path_factory.mktemp("capps")
    res, _ = deploy(cdroplet, container_app(apps, "v3", BROKEN))
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "traffic stays on the previous release" in out and "boom: DATABASE_URL is not set" in out, out
    assert get(cdroplet.address) == "v2" and cdroplet.live_slot("capp") == "b"
    assert '"refused"' in cdroplet.sh("tail -n 1 /srv/capp/releases.log")


def test_rollback_switches_images_in_about_a_second_without_a_rebuild(cdroplet, tmp_path_factory):
    images = cdroplet.sh("docker images -q localhost/capp | sort")
    project = {**APP_ENV, "FABRIC_APP_SOURCE": container_app(tmp_path_factory.mktemp("capps"), "v2")}
    t0 = time.monotonic()
    res = cdroplet.fab("-H", cdroplet.name, "rollback", env=project)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"container rollback: {took:.1f}s (fab's own start included)")
    assert get(cdroplet.address) == "v1" and cdroplet.live_slot("capp") == "a"
    assert cdroplet.sh("docker images -q localhost/capp | sort") == images  # nothing built
    assert "image" not in res.stdout
    assert took < 20  # about a second here; a loaded machine gets room


def test_secrets_reach_the_container_and_the_release_command_runs_in_a_one_off_container(cdroplet, tmp_path_factory):
    apps = tmp_path_factory.mktemp("capps")
    project = {**APP_ENV, "FABRIC_APP_SOURCE": container_app(apps, "v1")}
    res = cdroplet.fab("-H", cdroplet.name, "env.set", "GREETING=howdy-s3cr3t", env=project)
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(cdroplet.address) == "howdy-s3cr3t v1"
    env = {"FABRIC_APP_RELEASE_COMMAND": "echo migrating with $GREETING in $(cat /etc/hostname | wc -c)-char host as "
                                         "$(id -u):$(id -g) home $HOME"}
    res, _ = deploy(cdroplet, container_app(apps, "v4"), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    # every container of the app runs as the app's user of the host, never root (the image says nothing)
    app_user = cdroplet.sh("echo $(id -u capp):$(id -g capp)").strip()
    assert not app_user.startswith("0:")
    assert "migrating with **** in" in res.stdout and "s3cr3t" not in res.stdout, res.stdout
    assert f"as {app_user} home /tmp" in res.stdout, res.stdout
    assert get(cdroplet.address) == "howdy-s3cr3t v4"
    # the environment reached the engine in a file only root reads, never on a command line
    assert cdroplet.sh("stat -c '%U %a' /run/provision/capp/a.env /run/provision/capp/b.env").split() == [
        "root", "600", "root", "600"]
    assert "s3cr3t" not in cdroplet.sh("ps -eo args")
    run = cdroplet.fab("-H", cdroplet.name, "run", "--", "sh", "-c", "echo $GREETING from $(id -u):$(id -g)", env=project)
    assert run.returncode == 0 and f"howdy-s3cr3t from {app_user}" in run.stdout, run.stdout + run.stderr
    slot = cdroplet.live_slot("capp")
    pid = cdroplet.sh(f"docker inspect -f '{{{{.State.Pid}}}}' capp-{slot}").strip()
    assert cdroplet.sh(f"stat -c %u:%g /proc/{pid}").strip() == app_user


def test_a_program_holding_the_idle_slots_port_is_named_and_never_taken_for_the_release(cdroplet, tmp_path_factory):
    """Something else answering on the port the new container publishes on would pass the health gate
    in its stead: the switch refuses the release, naming the port."""
    from provision.layout import Layout

    live = cdroplet.live_slot("capp")
    idle = "b" if live == "a" else "a"
    port = Layout("capp", container=True).slot_port(idle)
    cdroplet.sh(f"systemd-run --unit=cont-squatter python3 -m http.server -b 127.0.0.1 {port}; "
                f"for i in $(seq 50); do ss -ltn | grep -q 127.0.0.1:{port} && exit 0; sleep 0.1; done; exit 1")
    try:
        before = get(cdroplet.address)
        res, _ = deploy(cdroplet, container_app(tmp_path_factory.mktemp("capps"), "v9"))
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"port 127.0.0.1:{port} of slot {idle} is taken by another program" in res.stdout, res.stdout
        assert get(cdroplet.address) == before and cdroplet.live_slot("capp") == live
    finally:
        cdroplet.run("systemctl stop cont-squatter")


def test_a_process_runs_in_a_container_of_its_own_and_stopping_its_unit_stops_it(cdroplet, tmp_path_factory):
    """A process named like a slot (a) gets a container of its own (capp.p.a), never the slot's (capp-a),
    run as the app's user; stopping its unit stops its container (no engine client left waiting)."""
    env = {"FABRIC_APP_PROCESSES": json.dumps({"a": "exec sleep 100000"})}
    res, _ = deploy(cdroplet, container_app(tmp_path_factory.mktemp("capps"), "v6"), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    slot = cdroplet.live_slot("capp")
    assert get(cdroplet.address).endswith(" v6")
    assert sorted(cdroplet.sh("docker ps --format '{{.Names}}'").split()) == sorted([f"capp-{slot}", "capp.p.a"])
    app_user = cdroplet.sh("echo $(id -u capp):$(id -g capp)").strip()
    pid = cdroplet.sh("docker inspect -f '{{.State.Pid}}' capp.p.a").strip()
    assert cdroplet.sh(f"stat -c %u:%g /proc/{pid}").strip() == app_user
    t0 = time.monotonic()
    cdroplet.sh("systemctl stop capp.a.service")
    took = time.monotonic() - t0
    assert cdroplet.sh("docker ps -a --format '{{.Names}}'").split() == [f"capp-{slot}"]
    assert cdroplet.run("pgrep -f '[c]ontainer-run.py once'")[0] == 1  # no client left either
    assert get(cdroplet.address).endswith(" v6") and took < 20, took


@pytest.fixture(scope="module")
def fresh_docker(sandbox, tmp_path_factory):
    """A container droplet with no engine yet: the deploy installs docker (through the inventory's proxy)."""
    yield from container_host(sandbox, tmp_path_factory, "fresh-docker", None)


DOCKERD_ENV = "tr '\\0' '\\n' < /proc/$(pidof dockerd)/environ"
DROPIN = "/etc/systemd/system/docker.service.d/provision-proxy.conf"


def test_the_first_deploy_installs_docker_which_starts_with_the_proxy(fresh_docker, tmp_path_factory):
    """B8: the drop-in is written before docker is installed; restarting a docker.service that does
    not exist yet failed the first deploy (exit 5)."""
    host, apps = fresh_docker, tmp_path_factory.mktemp("fapps")
    assert host.run("command -v docker")[0] != 0
    res, _ = deploy(host, container_app(apps, "f1"))
    out = res.stdout + res.stderr
    assert "FAILED  docker proxy" not in out and "(install nginx docker.io)" in out, out
    # docker came up with the proxy; the build then needs FROM localhost/debian:12, which no registry
    # here has (a real host pulls it): refused at its build, nothing live
    assert res.returncode == 1 and "FAILED  image localhost/capp:" in res.stdout, out
    assert f"https_proxy={host.sandbox.proxy_url}" in host.sh(DOCKERD_ENV)
    host.sandbox.engine_ready(host.droplet, "docker")  # finds docker there, imports localhost/debian:12
    res, _ = deploy(host, container_app(apps, "f1"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(host.address) == "f1"


def test_the_docker_proxy_drop_in_goes_with_the_last_app_that_wants_it(fresh_docker, tmp_path_factory):
    """B7: app.proxy unset, the drop-in stayed and docker kept pulling through the old proxy."""
    host, apps = fresh_docker, tmp_path_factory.mktemp("fapps")
    assert host.run(f"test -e {DROPIN}")[0] == 0
    other = {"FABRIC_APP_NAME": "other", "FABRIC_APP_SERVER_NAME": "other.test"}
    res, _ = deploy(host, container_app(apps, "o1"), env=other)  # another docker app with the proxy
    assert res.returncode == 0, res.stdout + res.stderr
    # it still wants the drop-in: it stays
    res, _ = deploy(host, container_app(apps, "f1"), env={"FABRIC_APP_PROXY": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "drop the claim" in res.stdout and host.run(f"test -e {DROPIN}")[0] == 0, res.stdout
    assert f"https_proxy={host.sandbox.proxy_url}" in host.sh(DOCKERD_ENV)
    # the last one gone: so is the drop-in, and docker runs without the proxy
    res, _ = deploy(host, container_app(apps, "o1"), env={**other, "FABRIC_APP_PROXY": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "remove the drop-in" in res.stdout and host.run(f"ls {DROPIN}*")[0] != 0, res.stdout
    assert "https_proxy" not in host.sh(DOCKERD_ENV)
    res, _ = deploy(host, container_app(apps, "f2"), env={"FABRIC_APP_PROXY": ""})
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(host.address) == "f2"
    res, _ = deploy(host, container_app(apps, "f2"), "-v", env={"FABRIC_APP_PROXY": ""})
    assert "1 SSH round trip(s)" in res.stdout and "nothing restarted" in res.stdout, res.stdout
    # the proxy back: so is the drop-in
    res, _ = deploy(host, container_app(apps, "f2"))
    assert res.returncode == 0 and f"https_proxy={host.sandbox.proxy_url}" in host.sh(DOCKERD_ENV), res.stdout


def test_an_app_switched_from_container_to_virtualenv_and_back_leaves_nothing_of_the_other_kind(fresh_docker,
                                                                                                 tmp_path_factory):
    """B13: the switch of kind left the virtualenv app's socket units running, the container app's
    images, and a rollback across it failed saying the release was pruned."""
    host, apps = fresh_docker, tmp_path_factory.mktemp("fapps")
    project = {"FABRIC_APP_SOURCE": "examples/hello"}
    venv = {"FABRIC_APP_CONTAINER": "false", **project}
    assert host.sh("docker images -q localhost/capp").split()
    res, _ = deploy(host, "examples/hello", env=venv)
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(host.address) == "Hello from provision!"
    # the container app's images and containers gone (docker stays: other apps may use it), its claim too
    assert host.sh("docker images -q localhost/capp") == "" and host.sh("docker ps -aq --filter name=capp") == ""
    assert host.run("test -e /var/lib/provision/docker-proxy/capp")[0] != 0
    res = host.fab("-H", host.name, "rollback", env={**APP_ENV, **venv})
    assert res.returncode == 1 and "is a container app's (docker) and the app is a virtualenv app's now" in res.stdout \
        and "deploy the app instead" in res.stdout, res.stdout + res.stderr
    assert get(host.address) == "Hello from provision!"
    # and back: the virtualenv app's socket units stop and go, its gunicorn with them
    res, _ = deploy(host, container_app(apps, "f3"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(host.address) == "f3"
    assert host.run("systemctl is-active capp@a.socket capp@b.socket")[1].split() == ["inactive", "inactive"]
    assert host.run("ls /etc/systemd/system/capp@.socket /etc/systemd/system/sockets.target.wants/capp@*")[0] != 0
    wait_for("the old gunicorn gone", lambda: host.run("pgrep -f gunicorn")[0] == 1)
    res = host.fab("-H", host.name, "rollback", env={**APP_ENV, "FABRIC_APP_SOURCE": container_app(apps, "f3")})
    assert res.returncode == 1 and "is a virtualenv app's and the app is a container app's (docker) now" in res.stdout, \
        res.stdout + res.stderr
    assert get(host.address) == "f3"


def test_docker_reads_the_proxy_as_written_whatever_its_password_holds(fresh_docker, tmp_path_factory):
    """Nit: the proxy's values went raw into docker's EnvironmentFile, which systemd reads with its own
    quoting rules: a password with a quote, a backslash or a dollar reached dockerd changed."""
    host, apps = fresh_docker, tmp_path_factory.mktemp("fapps")
    proxy = host.sandbox.proxy_url.replace("://", "://bob:p\"a\\s's`$HOME@", 1)
    try:
        res, _ = deploy(host, container_app(apps, "f3"), env={"FABRIC_APP_PROXY": proxy})
        assert res.returncode == 0, res.stdout + res.stderr
        assert "p\"a" not in res.stdout + res.stderr
        env = dict(line.split("=", 1) for line in host.sh(DOCKERD_ENV).splitlines() if "=" in line)
        assert env["https_proxy"] == env["HTTP_PROXY"] == proxy
    finally:  # apt's proxy file cannot hold that password (not docker's business): the sandbox's back
        res, _ = deploy(host, container_app(apps, "f3"))
        assert res.returncode == 0, res.stdout + res.stderr


def test_a_dockerfile_that_declares_the_proxy_arguments_is_refused_before_its_password_lands_in_the_history(
        fresh_docker, tmp_path_factory):
    """Nit: docker keeps a build argument the Dockerfile declares (ARG http_proxy) in the image's history,
    the proxy's password with it."""
    host, apps = fresh_docker, tmp_path_factory.mktemp("fapps")
    source = container_app(apps, "f4")
    dockerfile = os.path.join(source, "Dockerfile")
    with open(dockerfile) as fh:
        lines = fh.read().splitlines()
    with open(dockerfile, "w") as fh:
        fh.write("\n".join(lines[:1] + ["ARG http_proxy", "RUN true"] + lines[1:]) + "\n")
    proxy = host.sandbox.proxy_url.replace("://", "://bob:Hq7s3cr3t@", 1)
    images, live = host.sh("docker images -q localhost/capp"), get(host.address)
    try:
        res, _ = deploy(host, source, env={"FABRIC_APP_PROXY": proxy})
        assert res.returncode != 0 and "declares ARG http_proxy: the image's history" in res.stdout + res.stderr, \
            res.stdout + res.stderr
        assert "Hq7s3cr3t" not in res.stdout + res.stderr and host.sh("docker images -q localhost/capp") == images
        assert get(host.address) == live
        # without the ARG line the RUN step still gets the proxy, and the history keeps none of it
        with open(dockerfile, "w") as fh:
            fh.write("\n".join(lines[:1] + ['RUN sh -c \'case "$http_proxy" in *//bob:*@*) exit 0;; esac; exit 1\'']
                               + lines[1:]) + "\n")
        res, _ = deploy(host, source, env={"FABRIC_APP_PROXY": proxy})
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Hq7s3cr3t" not in host.sh("for i in $(docker images -q localhost/capp); do docker history --no-trunc $i; "
                                          "docker inspect $i; done")
    finally:
        res, _ = deploy(host, container_app(apps, "f3"))
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def pdroplet(sandbox):
    """A container droplet with no engine yet: the deploy installs podman."""
    name = PREFIX + "podman"
    d = sandbox.up(name, containers=True)
    try:
        yield d
    finally:
        sandbox.down(name)


def test_podman_installed_by_the_deploy_serves_and_rolls_back(pdroplet, sandbox, tmp_path_factory):
    inv = tmp_path_factory.mktemp("inv") / "inventory.ini"
    inv.write_text(sandbox.inventory())
    host = Host(pdroplet, sandbox, inv)
    apps = tmp_path_factory.mktemp("papps")
    env = {"FABRIC_APP_ENGINE": "podman"}
    # no engine on the droplet: the deploy installs it; the build then needs the base image, which
    # no registry here has: the release is refused at its build, nothing goes live
    res, _ = deploy(host, container_app(apps, "p1"), env=env)
    assert res.returncode == 1 and "FAILED  image localhost/capp:" in res.stdout, res.stdout + res.stderr
    assert host.run("test -e /srv/capp/current")[0] != 0
    sandbox.engine_ready(pdroplet, "podman")  # finds podman there, imports localhost/debian:12
    # the release command runs with the deploy's proxy environment: none of it reaches its container
    # (podman's run would copy it in), nor the proxy's password
    command = "echo proxy variables: $(env | grep -ci _proxy=)"
    for version in ("p1", "p2"):
        res, took = deploy(host, container_app(apps, version), env={**env, "FABRIC_APP_RELEASE_COMMAND": command})
        assert res.returncode == 0, res.stdout + res.stderr
        assert get(host.address) == version
        assert "proxy variables: 0" in res.stdout, res.stdout
    print(f"podman: code change {took:.1f}s")
    t0 = time.monotonic()
    res = host.fab("-H", host.name, "rollback", env={**APP_ENV, **env, "FABRIC_APP_SOURCE": container_app(apps, "p2")})
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"podman rollback: {took:.1f}s")
    assert get(host.address) == "p1"
    assert took < 20
    # the old container stops within seconds (its init passes the signal on: no 30 s wait for a kill)
    assert host.sh("for i in $(seq 50); do [ \"$(podman ps --format '{{.Names}}')\" = capp-a ] && exit 0; sleep 0.2; "
                   "done; podman ps --format '{{.Names}}'") == ""


# -- each container app on a network of its own (provision/containernet.py) ------------------------------

CONNECTS = ("python3 -c 'import socket, sys\nfor i in range(2):\n    try:\n        socket.create_connection((sys.argv[1], "
            "int(sys.argv[2])), 2).close(); sys.exit(0)\n    except OSError: pass\nsys.exit(1)' ")


def connects(host: Host, where: str, address: str, port: int) -> bool:
    """Whether a TCP connection from ``where`` (a container, or "" for the droplet itself) to address:port
    opens: two attempts of 2 s at most."""
    return host.run(f"{where} {CONNECTS} {address} {port}")[0] == 0


def app_container(host: Host, engine: str, app: str) -> tuple[str, str]:
    """The id and network address of the app's running (live slot's) container."""
    cid = host.sh(f"{engine} ps -q --filter label=provision.app={app}").split()[0]
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    return cid, host.sh(f"{engine} inspect -f '{fmt}' {cid}").split()[0]


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_one_container_apps_container_cannot_reach_anothers(cdroplet, tmp_path_factory, engine):
    cdroplet.sandbox.engine_ready(cdroplet.droplet, engine)
    apps = tmp_path_factory.mktemp("netapps")
    # dashed names: their slices (--cgroup-parent, '-' escaped as \x2d) are ones the engines take
    names = [f"net-{engine[0]}a", f"net-{engine[0]}b"]
    for name in names:
        env = {"FABRIC_APP_NAME": name, "FABRIC_APP_ENGINE": engine, "FABRIC_APP_SERVER_NAME": f"{name}.test"}
        res, _ = deploy(cdroplet, container_app(apps, "n1"), env=env)
        assert res.returncode == 0, res.stdout + res.stderr
    (a, a_ip), (b, b_ip) = (app_container(cdroplet, engine, n) for n in names)
    assert a_ip != b_ip
    # the droplet itself reaches both on their addresses (nginx does, through the published ports)
    assert connects(cdroplet, "", b_ip, 8000) and connects(cdroplet, "", a_ip, 8000)
    # neither app's container reaches the other's, on its address or its port (unpublished there)
    assert not connects(cdroplet, f"{engine} exec {a}", b_ip, 8000)
    assert not connects(cdroplet, f"{engine} exec {b}", a_ip, 8000)
    # on docker's network (icc off) not even another container of the same app reaches it; podman's lets it
    image = cdroplet.sh(f"{engine} inspect -f '{{{{.Config.Image}}}}' {a}").strip()
    same = f"{engine} run --rm --network provision-{names[0]} {image}"
    assert connects(cdroplet, same, a_ip, 8000) == (engine == "podman")
    # each runs on its own network
    nets = {n: cdroplet.sh(f"{engine} inspect -f '{{{{range $k, $v := .NetworkSettings.Networks}}}}{{{{$k}}}}{{{{end}}}}' "
                           f"{c}").strip() for n, c in zip(names, (a, b))}
    assert nets == {n: f"provision-{n}" for n in names}


# A host on the droplet's network sends a TCP SYN to DST:PORT in an Ethernet frame addressed to MAC (the
# droplet's): the route any neighbour can take to the droplet's 127.0.0.1. Prints "answered" when a
# SYN-ACK comes back (three tries, 3 s in all). Needs CAP_NET_RAW (a droplet's root has it).
SYN_PROBE = r'''
import os, random, socket, struct, sys, time
mac, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = os.popen("ip -4 -o addr show dev eth0").read().split()[3].split("/")[0]
own = open("/sys/class/net/eth0/address").read().strip()
def csum(data):
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
sport = random.randint(40000, 60000)
tcp = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64, 6, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(mac.replace(":", "") + own.replace(":", "")) + b"\x08\x00" + ip + tcp
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("eth0", 0))
s.settimeout(0.2)
for attempt in range(3):
    s.send(frame)
    until = time.monotonic() + 1
    while time.monotonic() < until:
        try:
            pkt = s.recv(2048)
        except socket.timeout:
            continue
        hl = (pkt[14] & 15) * 4
        if pkt[23] == 6 and struct.unpack("!HH", pkt[14 + hl:18 + hl]) == (port, sport) and pkt[14 + hl + 13] & 0x12 == 0x12:
            print("answered by", socket.inet_ntoa(pkt[26:30]))
            sys.exit(0)
print("no answer")
'''


@pytest.fixture(scope="module")
def neighbour(sandbox, tmp_path_factory):
    """A plain droplet on the same network as the container droplet: a neighbour on its LAN."""
    with booted(sandbox, PREFIX + "neighbour", tmp_path_factory) as host:
        yield host


def syn_answered(neighbour: Host, mac: str, dst: str, port: int) -> bool:
    out = neighbour.sh(f"python3 - {mac} {dst} {port} <<'__PROBE__'\n{SYN_PROBE}\n__PROBE__")
    return out.startswith("answered")


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_a_neighbour_reaches_neither_the_published_port_on_127_0_0_1_nor_the_container(request, sandbox, neighbour,
                                                                                        tmp_path_factory, engine):
    """Docker < 28 and podman's CNI portmap DNAT packets to 127.0.0.1:<port> whatever interface they
    came in on (moby#45610), and forward packets routed to a container's address from anywhere: the
    host's rules (table inet provision-containers) drop both before any NAT. podman's case on a droplet
    without docker (whose FORWARD policy, drop, would hide it)."""
    from provision.layout import Layout

    if engine == "docker":
        cdroplet = request.getfixturevalue("cdroplet")
    else:
        droplet = request.getfixturevalue("pdroplet")
        inv = tmp_path_factory.mktemp("inv") / "inventory.ini"
        inv.write_text(sandbox.inventory())
        cdroplet = Host(droplet, sandbox, inv)
        sandbox.engine_ready(cdroplet.droplet, "podman")
        assert cdroplet.run("command -v dockerd")[0] != 0
    env = {"FABRIC_APP_NAME": "netlan", "FABRIC_APP_SERVER_NAME": "netlan.test", "FABRIC_APP_ENGINE": engine}
    res, _ = deploy(cdroplet, container_app(tmp_path_factory.mktemp("netapps"), "n1"), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    port = Layout("netlan", container=True).slot_port(cdroplet.live_slot("netlan"))
    _, address = app_container(cdroplet, engine, "netlan")
    assert connects(cdroplet, "", "127.0.0.1", port)  # served on the droplet itself
    mac = cdroplet.sh("cat /sys/class/net/eth0/address").strip()
    assert connects(neighbour, "", cdroplet.address, 22)  # and each knows the other's MAC address now
    # the probe works: the droplet's sshd answers it on its address
    assert syn_answered(neighbour, mac, cdroplet.address, 22)
    assert not syn_answered(neighbour, mac, "127.0.0.1", port)
    # a neighbour routing the container's address through the droplet
    neighbour.sh(f"ip route replace {address}/32 via {cdroplet.address}")
    try:
        assert not connects(neighbour, "", address, 8000)
    finally:
        neighbour.run(f"ip route del {address}/32")
    assert "127.0.0.0/8" in cdroplet.sh("nft list table inet provision-containers")
    assert cdroplet.sh("systemctl is-enabled provision-containers").strip() == "enabled"  # loaded at boot too
