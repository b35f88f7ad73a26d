"""fab ship on a real droplet: a Flask app in a git repository of its own, its tests run in a clean
export of the commit, and only a commit whose tests pass goes live, exactly as exported.

The tests run in order on one droplet, each starting where the one before left the app.
"""

import json
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.integration

APP = '''from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "{greeting}\\n"
'''
TESTS = '''from app import app


def test_index_answers():
    assert app.test_client().get("/").status_code == 200


def test_greeting_says_hello():
    assert app.test_client().get("/").data.startswith(b"Hello"), "the greeting must say Hello"
'''
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=ci", "-c", "user.email=ci@example.com", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def commit(repo, message: str, **files: str) -> str:
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship") / "app"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    commit(root, "v1", **{"app.py": APP.format(greeting="Hello v1"), "requirements.txt": "flask>=3,<4\n",
                          "tests/test_app.py": TESTS, ".gitignore": "local/\n"})
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the test virtualenvs (XDG_CACHE_HOME): built once here


def ship(droplet, repo, cache, *args):
    return droplet.fab("-H", droplet.name, "ship", "--source", str(repo), *args, env={"XDG_CACHE_HOME": str(cache)})


def page(droplet) -> str:
    with OPENER.open(f"http://{droplet.address}/", timeout=10) as r:
        return r.read().decode().strip()


def live(droplet) -> str:
    return droplet.sh("readlink /srv/hello/current").strip().rsplit("/", 1)[-1]


def last_log(droplet) -> dict:
    return json.loads(droplet.sh("tail -n 1 /srv/hello/releases.log"))


def logins_between(droplet, t0: float, t1: float) -> int:
    """SSH logins the droplet's sshd accepted between two moments (the droplet shares this clock)."""
    rc, out, _ = droplet.run(f"journalctl -q --no-pager --since @{t0:.3f} --until @{t1:.3f} | grep -c 'Accepted publickey'")
    return int(out.strip() or 0)


def test_a_commit_whose_tests_pass_is_deployed_with_its_commit_and_test_result(droplet, repo, cache, tmp_path):
    sha = git(repo, "rev-parse", "HEAD")
    report = tmp_path / "report.xml"
    res = ship(droplet, repo, cache, "--junit", str(report))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "building the test virtualenv" in res.stdout and "2 passed" in res.stdout
    assert f"ship: testing commit {sha[:7]} in a clean export: python -m pytest --junitxml={report}" in res.stdout
    assert page(droplet) == "Hello v1"
    assert live(droplet).endswith(f"-{sha[:7]}")
    cases = {c.get("name") for c in ET.parse(report).getroot().iter("testcase")}
    assert cases == {"test_index_answers", "test_greeting_says_hello"}
    entry = last_log(droplet)
    assert (entry["action"], entry["commit"], entry["via"]) == ("deploy", sha, "ship")
    assert entry["tests"]["result"] == "passed" and entry["tests"]["count"] == 2 and entry["tests"]["seconds"] > 0
    meta = json.loads(droplet.sh("cat /srv/hello/current/.provision/release.json"))
    assert meta["origin"] == {k: entry[k] for k in ("commit", "tests", "via")} and meta["revision"] == sha[:7]
    releases = droplet.fab("-H", droplet.name, "releases")
    assert releases.returncode == 0, releases.stdout + releases.stderr
    assert f"commit {sha[:12]}, tests passed in {entry['tests']['seconds']:.1f}s (via ship)" in releases.stdout


def test_a_failing_test_deploys_nothing_and_connects_to_no_host(droplet, repo, cache):
    before = (live(droplet), droplet.sh("ls /srv/hello/releases /srv/hello/venvs"), droplet.sh("cat /srv/hello/releases.log"))
    commit(repo, "v2: a greeting the tests refuse", **{"app.py": APP.format(greeting="Bye v2")})
    t0 = time.time()
    res = ship(droplet, repo, cache)
    t1 = time.time()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED tests/test_app.py::test_greeting_says_hello" in res.stdout  # the failure, as pytest shows it
    assert "the greeting must say Hello" in res.stdout
    assert f"(cached, {cache}" in res.stdout  # the second ship builds no virtualenv
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: tests failed (exit 1 after ") and "nothing deployed" in res.stderr
    assert logins_between(droplet, t0, t1) == 0
    after = (live(droplet), droplet.sh("ls /srv/hello/releases /srv/hello/venvs"), droplet.sh("cat /srv/hello/releases.log"))
    assert after == before and page(droplet) == "Hello v1"


def test_a_dirty_tree_is_refused_in_one_line_and_allow_dirty_ships_it_as_it_is(droplet, repo, cache):
    head = git(repo, "rev-parse", "HEAD")
    was = live(droplet)
    (repo / "app.py").write_text(APP.format(greeting="Hello v3 (uncommitted)"))
    res = ship(droplet, repo, cache)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "app.py" in res.stderr and "--allow-dirty" in res.stderr and "not committed" in res.stderr
    assert live(droplet) == was
    res = ship(droplet, repo, cache, "--allow-dirty")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--allow-dirty: shipping the working tree as it is" in res.stdout and "2 passed" in res.stdout
    assert page(droplet) == "Hello v3 (uncommitted)"
    assert live(droplet).endswith(f"-{head[:7]}-dirty")
    entry = last_log(droplet)
    assert entry["commit"] == head and entry["dirty"] is True and entry["tests"]["result"] == "passed"


def test_the_release_is_exactly_the_commit_tested_in_its_clean_export(droplet, repo, cache):
    sha = commit(repo, "v3", **{"app.py": APP.format(greeting="Hello v3")})
    # files git ignores stay out of the export: a failing test the working tree holds is never run
    (repo / "local").mkdir()
    (repo / "local/test_mine.py").write_text("def test_mine():\n    assert False\n")
    res = ship(droplet, repo, cache)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout and "test_mine" not in res.stdout
    assert page(droplet) == "Hello v3" and live(droplet).endswith(f"-{sha[:7]}")
    manifest = json.loads(droplet.sh("cat /srv/hello/current/.provision/manifest.json"))
    assert set(manifest) == set(git(repo, "ls-files").splitlines())
    assert last_log(droplet)["commit"] == sha and "dirty" not in last_log(droplet)


def test_a_mistake_a_deploy_would_find_stops_the_ship_before_its_tests_run(droplet, repo, cache, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "nginx-site.conf.j2").write_text("server { listen 80; {{ no_such_variable }} }\n")
    marker = tmp_path / "tests-ran"
    was = live(droplet)
    res = droplet.fab("-H", droplet.name, "ship", "--source", str(repo),
                      env={"XDG_CACHE_HOME": str(cache), "FABRIC_APP_TEMPLATES": str(templates),
                           "FABRIC_APP_TEST_COMMAND": f"touch {marker}"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no_such_variable" in res.stderr and res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert not marker.exists() and live(droplet) == was


def test_secrets_in_the_test_command_reach_neither_the_release_s_meta_nor_the_log(droplet, repo, cache):
    sha = commit(repo, "v4", **{"app.py": APP.format(greeting="Hello v4")})
    command = "DATABASE_URL=postgres://u:hunter2@db/t API_TOKEN=abcd1234 python -m pytest"
    res = droplet.fab("-H", droplet.name, "ship", "--source", str(repo),
                      env={"XDG_CACHE_HOME": str(cache), "FABRIC_APP_TEST_COMMAND": command})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout and live(droplet).endswith(f"-{sha[:7]}")
    shown = "DATABASE_URL=postgres://u:****@db/t API_TOKEN=**** python -m pytest"
    meta = droplet.sh("cat /srv/hello/current/.provision/release.json")
    log = droplet.sh("cat /srv/hello/releases.log")
    for text in (res.stdout + res.stderr, meta, log):
        assert "hunter2" not in text and "abcd1234" not in text
    assert json.loads(meta)["origin"]["tests"]["command"] == shown == last_log(droplet)["tests"]["command"]
