"""Releases never drop a request: blue/green switch, health gate, rollback, deploy lock, SIGKILL.

Load loops are bounded: 10 clients, only against the droplet's own address, only while one
deploy runs (at most a minute).
"""

import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from .conftest import FAB, ROOT

pytestmark = pytest.mark.integration


def get(address: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}/", timeout=10) as r:
        assert r.status == 200
        return r.read().decode().strip()


class Load:
    """10 clients hitting the site until stopped; counts failed requests."""

    def __init__(self, address: str, clients: int = 10, limit: float = 90):
        self.address, self.clients, self.limit = address, clients, limit
        self.ok = 0
        self.failed: list[str] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        end = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                with opener.open(f"http://{self.address}/", timeout=10) as r:
                    body = r.read().decode().strip()
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


def app_with(tmp_path, text: str, extra_requirements: str = "", body: str = "") -> str:
    d = tmp_path / re.sub(r"\W", "_", text)
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(ROOT / "examples/hello", d)
    # the project's own check (checks/test_hello.py) wants a greeting
    (d / "app.py").write_text(body or (d / "app.py").read_text().replace("Hello from provision!", f"Hello {text}"))
    if extra_requirements:
        (d / "requirements.txt").write_text((d / "requirements.txt").read_text() + extra_requirements + "\n")
    return str(d)


def live_release(droplet) -> str:
    return droplet.sh("readlink /srv/hello/current").strip().rsplit("/", 1)[-1]


def test_deploy_under_load_changes_code_and_requirements_without_failed_requests(droplet, tmp_path):
    first = droplet.fab("-H", droplet.name, "deploy", "--source", app_with(tmp_path, "v1"))
    assert first.returncode == 0, first.stdout + first.stderr
    with Load(droplet.address) as load:
        res = droplet.fab("-H", droplet.name, "deploy", "--source", app_with(tmp_path, "v2", "six"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed virtualenv" in res.stdout and "changed switch hello" in res.stdout
    print(f"requests during deploy: {load.ok} ok, {len(load.failed)} failed")
    assert load.failed == [] and load.ok > 50
    assert load.seen <= {"Hello v1", "Hello v2"}
    assert {get(droplet.address) for _ in range(20)} == {"Hello v2"}  # afterwards only the new release answers
    assert droplet.sh("/srv/hello/current/.venv/bin/python -c 'import six; print(six.__name__)'").strip() == "six"


def test_broken_release_is_refused_and_the_old_one_keeps_answering(droplet, tmp_path):
    before = live_release(droplet)
    broken = app_with(tmp_path, "broken", body="import no_such_module_provision\n")
    with Load(droplet.address) as load:
        res = droplet.fab("-H", droplet.name, "deploy", "--source", broken)
    assert res.returncode == 1
    assert "health check of release" in res.stdout and "traffic stays on the previous release" in res.stdout
    assert "ModuleNotFoundError" in res.stdout  # the tail of the new release's log
    print(f"requests during broken deploy: {load.ok} ok, {len(load.failed)} failed")
    assert load.failed == [] and load.seen == {"Hello v2"}
    assert live_release(droplet) == before
    check = droplet.fab("-H", droplet.name, "check")
    assert check.returncode == 0, check.stdout


def test_rollback_and_roll_forward(droplet, tmp_path):
    rels = droplet.fab("-H", droplet.name, "releases")
    assert rels.returncode == 0
    live = live_release(droplet)
    assert re.search(rf"^\s+\* {live} +deployed .* by ", rels.stdout, re.M), rels.stdout
    with Load(droplet.address) as load:
        t0 = time.monotonic()
        back = droplet.fab("-H", droplet.name, "rollback")
        rollback_seconds = time.monotonic() - t0
    assert back.returncode == 0, back.stdout + back.stderr
    print(f"rollback took {rollback_seconds:.2f}s; requests: {load.ok} ok, {len(load.failed)} failed")
    assert load.failed == []
    assert {get(droplet.address) for _ in range(10)} == {"Hello v1"}
    forward = droplet.fab("-H", droplet.name, "rollback", "--to", live)
    assert forward.returncode == 0, forward.stdout + forward.stderr
    assert {get(droplet.address) for _ in range(10)} == {"Hello v2"}
    assert live_release(droplet) == live
    log = droplet.sh("tail -n 3 /srv/hello/releases.log")  # the refused release, then both rollbacks
    assert [json.loads(l)["action"] for l in log.splitlines()] == ["refused", "rollback", "rollback"]
    bad = droplet.fab("-H", droplet.name, "rollback", "--to", "nope")
    assert bad.returncode == 2 and "no release 'nope'" in bad.stderr


def test_two_deploys_at_once_one_proceeds_the_other_names_the_holder(droplet, tmp_path):
    procs = [subprocess.Popen([FAB, "-H", droplet.name, "deploy", "--source", app_with(tmp_path, f"race{i}", "idna")],
                              cwd=ROOT, env=droplet.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 1)[0]
    assert "another deploy holds the lock:" in loser and " on " in loser and "since" in loser, loser
    assert "--break-lock" in loser
    assert get(droplet.address) in {"Hello race0", "Hello race1"}


@pytest.mark.parametrize("after", [0.5, 2.0, 4.0])
def test_sigkill_of_fab_mid_deploy_leaves_a_complete_release_and_the_next_deploy_works(droplet, tmp_path, after):
    before = get(droplet.address)
    # new requirements too, so the kill can land in the virtualenv build
    source = app_with(tmp_path, f"killed-{after}", {0.5: "packaging==24.0", 2.0: "packaging==24.1"}.get(after, ""))
    proc = subprocess.Popen([FAB, "-H", droplet.name, "deploy", "--source", source], cwd=ROOT, env=droplet.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert get(droplet.address) in {before, f"Hello killed-{after}"}  # a complete release answers
    res = droplet.fab("-H", droplet.name, "deploy", "--source", source)
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address) == f"Hello killed-{after}"
    assert droplet.fab("-H", droplet.name, "check").returncode == 0


def test_old_releases_and_their_virtualenvs_are_pruned(droplet):
    releases = droplet.sh("ls /srv/hello/releases").split()
    # keep_releases (5) newest, plus at most the live and the previous one
    assert 2 <= len(releases) <= 7, releases
    assert live_release(droplet) in releases
    used = set(droplet.sh("for l in /srv/hello/releases/*/.venv; do readlink $l; done").split())
    venvs = {f"../../venvs/{v}" for v in droplet.sh("ls /srv/hello/venvs").split()}
    assert venvs == used
