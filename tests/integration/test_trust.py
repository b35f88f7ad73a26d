"""Releases you can trust: exit 0 means the new release answers through nginx; a broken one is
refused fast, saying why; rollback goes where users expect. Order matters: one droplet.

Request bursts are bounded: 30 requests at once, only to the droplet's own address.
"""

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import ROOT
from .test_releases import app_with, get

pytestmark = pytest.mark.integration


def burst(address: str, n: int = 30) -> list[str]:
    """n requests at once, right after the command returned: what each one got."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def one(_):
        try:
            with opener.open(f"http://{address}/", timeout=10) as r:
                return r.read().decode().strip()
        except Exception as e:  # noqa: BLE001 - every failure counts
            return repr(e)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_fresh_deploy_exits_only_once_every_request_gets_the_app(droplet):
    res = droplet.fab("-H", droplet.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(burst(droplet.address)) == {"Hello from provision!"}


def test_after_a_code_change_every_request_gets_the_new_release_and_the_next_deploy_does_nothing(droplet, tmp_path):
    source = app_with(tmp_path, "v2")
    res = droplet.fab("-H", droplet.name, "deploy", "--source", source)
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(burst(droplet.address)) == {"Hello v2"}
    again = droplet.fab("-H", droplet.name, "deploy", "--source", source)
    assert again.returncode == 0 and "no changes, nothing restarted" in again.stdout, again.stdout  # no "repair"


def test_a_release_that_exits_at_import_is_refused_at_once_with_its_exception_first(droplet, tmp_path):
    body = ("import os\nSECRET_KEY = os.environ['DJANGO_SECRET_KEY']\n" +
            "\n".join(f"# padding line {i}" for i in range(60)) + "\n")
    source = app_with(tmp_path, "never", body=body + (ROOT / "examples/hello/app.py").read_text())
    t0 = time.monotonic()
    res = droplet.fab("-H", droplet.name, "deploy", "--source", source)
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert "exited" in out and elapsed < 10, (elapsed, out)  # health_timeout is 30 s
    lines = out.splitlines()
    first = next(i for i, l in enumerate(lines) if "exception:" in l)
    assert "KeyError: 'DJANGO_SECRET_KEY'" in lines[first]
    assert "Traceback" in out  # then the log, from its traceback
    assert get(droplet.address) == "Hello v2"


def test_rollback_goes_to_the_release_live_before_and_releases_marks_the_refused(droplet, tmp_path):
    res = droplet.fab("-H", droplet.name, "deploy", "--source", app_with(tmp_path, "v3"))
    assert res.returncode == 0, res.stdout + res.stderr
    listing = droplet.fab("-H", droplet.name, "releases")
    assert listing.returncode == 0 and "REFUSED" in listing.stdout, listing.stdout
    res = droplet.fab("-H", droplet.name, "rollback")  # not the refused release sorted before v3
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(burst(droplet.address)) == {"Hello v2"}
    res = droplet.fab("-H", droplet.name, "rollback")  # the one live before v2 now: v3
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address) == "Hello v3"


def test_status_fails_when_nginx_is_down(droplet):
    assert droplet.fab("-H", droplet.name, "status").returncode == 0
    droplet.sh("systemctl stop nginx")
    try:
        res = droplet.fab("-H", droplet.name, "status")
        assert res.returncode == 1 and "nginx not running" in res.stderr, res.stdout + res.stderr
    finally:
        droplet.sh("systemctl start nginx")
