"""A fleet release as one transaction, on three droplets: one host refusing the new release
switches none; one failing after switching takes every host back; a fixed release then goes out
everywhere; --no-atomic keeps each host on its own; an interrupted transaction re-run uses what it
prepared. The tests run in order: each starts from the fleet the one before left."""

import json
import re
import shutil
import signal
import subprocess
import time

import pytest

from .conftest import FAB, PREFIX, ROOT, Host
from .test_releases import get

pytestmark = pytest.mark.integration
T = "tx-" if PREFIX == "it-" else f"{PREFIX}tx-"
NAMES = [f"{T}1", f"{T}2", f"{T}3"]
# Behind a proxy that says the request came over plain http, the app (on a host with
# FORCE_HTTPS=1) redirects to https: it answers its health path on its own socket, not through nginx.
STRICT = '''
import os
from flask import Flask, redirect, request

app = Flask(__name__)


@app.get("/")
def index():
    if os.environ.get("FORCE_HTTPS") and request.headers.get("X-Forwarded-Proto") == "http":
        return redirect(request.url.replace("http://", "https://", 1), 301)
    return "Hello VERSION\\n"
'''

# Answers HEALTHY_FOR requests (counted in its data dir), then 503: on a host with HEALTHY_FOR=3, the
# prepare's health gate, the commit's, and the proof through nginx pass; the final check fails.
WEARS_OUT = '''
import os
from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    with open("log/requests", "a+") as f:
        f.seek(0)
        served = len(f.read())
        f.write(".")
    limit = os.environ.get("HEALTHY_FOR")
    return ("Hello VERSION\\n", 200) if not limit or served < int(limit) else ("worn out\\n", 503)
'''


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atomic")
    droplets = [sandbox.up(n) for n in NAMES]
    inv = tmp / "inventory.ini"
    inv.write_text(sandbox.inventory() + "\n[web]\n" + "\n".join(NAMES) + "\n")
    try:
        yield [Host(d, sandbox, inv) for d in droplets]
    finally:
        for n in NAMES:
            sandbox.down(n)


def app(tmp_path, version: str, body: str = "") -> str:
    d = tmp_path / version
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(ROOT / "examples/hello", d)
    (d / "app.py").write_text(body.replace("VERSION", version) if body else
                              (d / "app.py").read_text().replace("Hello from provision!", f"Hello {version}"))
    return str(d)


def deploy(fleet, tmp_path, version: str, *args: str, host_vars: dict | None = None, body: str = ""):
    inv = tmp_path / "inv.ini"
    text = fleet[0].inventory.read_text()
    for i, extra in (host_vars or {}).items():
        text = text.replace(f"{NAMES[i]} host={fleet[i].address}", f"{NAMES[i]} host={fleet[i].address} {extra}")
    inv.write_text(text)
    return fleet[0].fab("-H", "web", "deploy", "--source", app(tmp_path, version, body), *args,
                        env={"FABRIC_INVENTORY": str(inv)})


def live(h: Host) -> str:
    return h.sh("readlink /srv/hello/current").strip().rsplit("/", 1)[-1]


def running(h: Host) -> list[str]:
    """The slots whose instance runs."""
    return [s for s in "ab" if h.run(f"systemctl is-active --quiet hello@{s}.service")[0] == 0]


def serves(fleet, version: str) -> None:
    """Every host answers with ``version`` over HTTP, from one instance only, its release live."""
    for h in fleet:
        assert get(h.address) == f"Hello {version}", h.name
        assert len(running(h)) == 1, (h.name, running(h))
        assert h.sh("cat /srv/hello/current/.provision/release.json").count('"digest"') == 1


def test_a_fleet_deploys_as_one_transaction(fleet, tmp_path):
    res = deploy(fleet, tmp_path, "v1")
    assert res.returncode == 0, res.stdout + res.stderr
    for n in NAMES:
        assert re.search(rf"^{n}: switched to \S+$", res.stdout, re.M), res.stdout
    serves(fleet, "v1")
    again = deploy(fleet, tmp_path, "v1", "--verbose")  # nothing to do: one round trip per host, no commit
    assert again.returncode == 0, again.stdout + again.stderr
    for n in NAMES:
        assert f"{n}: 1 SSH round trip(s)" in again.stdout and f"{n}: no changes, nothing restarted" in again.stdout


def test_one_host_refusing_the_release_switches_none(fleet, tmp_path):
    before = [live(h) for h in fleet]
    res = deploy(fleet, tmp_path, "v2", host_vars={1: "health_path=/missing health_timeout=2"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(rf"^{NAMES[1]}: refused: step `prepare hello` failed", res.stdout, re.M), res.stdout
    for i in (0, 2):
        assert f"{NAMES[i]}: prepared, aborted: traffic stays on {before[i]}" in res.stdout, res.stdout
    assert "the transaction was called off, no host keeps the new release" in res.stdout
    serves(fleet, "v1")
    assert [live(h) for h in fleet] == before


def test_one_host_failing_after_switching_takes_every_host_back(fleet, tmp_path):
    before = [live(h) for h in fleet]
    # in waves of one: the first two switch, the third fails, and the first two go back
    res = deploy(fleet, tmp_path, "v3", "--serial", "1", host_vars={2: "env=FORCE_HTTPS=1 health_timeout=8"},
                 body=STRICT)
    assert res.returncode == 1, res.stdout + res.stderr
    for i in (0, 1):
        assert f"{NAMES[i]}: reverted: back on {before[i]}" in res.stdout, res.stdout
        last = json.loads(fleet[i].sh("tail -n 1 /srv/hello/releases.log"))
        assert (last["action"], last["release"]) == ("rollback", before[i])
    assert re.search(rf"^{NAMES[2]}: not switched: step `switch hello` failed .*; traffic stays on {before[2]}$",
                     res.stdout, re.M), res.stdout
    assert "answers on its socket, but not through nginx (HTTP 301" in res.stdout
    serves(fleet, "v1")
    assert [live(h) for h in fleet] == before


def test_one_host_failing_its_final_check_after_switching_takes_every_host_back(fleet, tmp_path):
    before = [live(h) for h in fleet]
    res = deploy(fleet, tmp_path, "v3b", host_vars={2: "env=HEALTHY_FOR=3 health_timeout=8"}, body=WEARS_OUT)
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(rf"^{NAMES[2]}: reverted: back on {before[2]} \(failed after switching: step `health "
                     r"http://127.0.0.1/` failed", res.stdout, re.M), res.stdout
    for i in (0, 1):
        assert f"{NAMES[i]}: reverted: back on {before[i]} (the fleet failed)" in res.stdout, res.stdout
    for i in range(3):
        last = json.loads(fleet[i].sh("tail -n 1 /srv/hello/releases.log"))
        assert (last["action"], last["release"]) == ("rollback", before[i])
    serves(fleet, "v1")


def test_a_fixed_release_goes_out_everywhere(fleet, tmp_path):
    res = deploy(fleet, tmp_path, "v4", host_vars={2: "env=FORCE_HTTPS=1"}, body=STRICT.replace(
        '== "http"', '== "https-please"'))
    assert res.returncode == 0, res.stdout + res.stderr
    serves(fleet, "v4")


def test_no_atomic_keeps_each_host_on_its_own(fleet, tmp_path):
    res = deploy(fleet, tmp_path, "v5", "--no-atomic", host_vars={1: "health_path=/missing health_timeout=2"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert [get(h.address) for h in fleet] == ["Hello v5", "Hello v4", "Hello v5"]


def test_an_interrupted_transaction_run_again_uses_what_it_prepared(fleet, tmp_path):
    source = app(tmp_path, "v6")
    inv = fleet[0].inventory
    proc = subprocess.Popen([FAB, "-H", "web", "deploy", "--source", source], cwd=ROOT, text=True,
                            env=fleet[0].env(FABRIC_INVENTORY=str(inv)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    prepared, seen = set(), []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # killed once every host has prepared, before any switches
        seen.append(line)
        m = re.match(rf"({T}\d): changed prepare hello", line)
        if m:
            prepared.add(m.group(1))
        if prepared == set(NAMES) or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert prepared == set(NAMES), "".join(seen)
    for h in fleet:
        assert get(h.address) == "Hello v5" or h.name == NAMES[1]  # traffic untouched
        assert len(running(h)) == 2, h.name  # the old instance and the prepared one
    releases = {h.name: h.sh("ls /srv/hello/releases").split() for h in fleet}
    t0 = time.monotonic()
    res = fleet[0].fab("-H", "web", "deploy", "--source", source, env={"FABRIC_INVENTORY": str(inv)})
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"re-run after an interruption: {time.monotonic() - t0:.1f}s")
    assert "changed release" not in res.stdout and "changed virtualenv" not in res.stdout, res.stdout
    assert "took over the deploy lock" in res.stdout or "another deploy" not in res.stdout
    serves(fleet, "v6")
    for h in fleet:  # no second upload: the release it prepared is the one that went live
        assert live(h) in releases[h.name]
