"""A monorepo's app from its own git repository: a sibling package shipped with app.include and
imported by the app, a tracked symlink shipped as a link, the untracked-files line, and the data a
live release holds reported at the next deploy until app.linked_dirs keeps it. Order matters: one
droplet."""

import json
import re
import subprocess
import urllib.request

import pytest

from .test_deploy import CHECKSUM

pytestmark = pytest.mark.integration

APP = '''"""A monorepo's web app: a greeting from its sibling package, a file through a tracked link,
a counter in SQLite under instance/ (Flask's place for an app's data)."""
import os
import sqlite3

from common import GREETING

HERE = os.path.dirname(os.path.abspath(__file__))
DB = os.path.join(HERE, "instance", "data.sqlite")


def init_db():
    os.makedirs(os.path.dirname(DB), exist_ok=True)
    with sqlite3.connect(DB) as db:
        db.execute("create table if not exists hits (n integer)")


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/logo":
        with open(os.path.join(HERE, "static", "logo.txt")) as fh:
            body = fh.read()
    elif path == "/hit":
        init_db()
        with sqlite3.connect(DB) as db:
            db.execute("insert into hits values (1)")
            body = "%d hits\\n" % db.execute("select count(*) from hits").fetchone()[0]
    else:
        body = GREETING + "\\n"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
'''
ENV = {"FABRIC_APP_NAME": "mono", "FABRIC_APP_INCLUDE": "../../libs/common"}
DATA_LINE = ("the live release holds data a new release will not have: instance/ "
             "(not shipped; keep them with app.linked_dirs / linked_files)")


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """apps/web (the app, with static -> assets) and libs/common (the package it imports), committed;
    one file not added yet."""
    root = tmp_path_factory.mktemp("monorepo")
    files = {"apps/web/app.py": APP, "apps/web/requirements.txt": "", "apps/web/assets/logo.txt": "logo v1\n",
             "apps/web/.gitignore": "*.log\n", "libs/common/__init__.py": "GREETING = 'v1'\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "apps/web/static").symlink_to("assets")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "init")
    (root / "apps/web/TODO.txt").write_text("not added yet\n")
    (root / "apps/web/debug.log").write_text("ignored\n")
    return root


def get(address: str, path: str = "/") -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}{path}", timeout=10) as r:
        return r.read().decode()


def deploy(droplet, repo, *args, **env):
    res = droplet.fab("-H", droplet.name, "deploy", "--source", str(repo / "apps/web"), *args, env={**ENV, **env})
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_the_app_imports_its_sibling_package_and_serves_a_file_through_a_tracked_link(droplet, repo):
    out = deploy(droplet, repo)
    untracked = f"{droplet.name}: 1 untracked file not shipped: TODO.txt (git add it to ship it)"
    assert out.count(untracked) == 1 and out.startswith(untracked + "\n"), out  # before any host line
    assert get(droplet.address) == "v1\n"
    assert get(droplet.address, "/logo") == "logo v1\n"
    release = "/srv/mono/current"
    assert droplet.sh(f"readlink {release}/static; cat {release}/common/__init__.py") == "assets\nGREETING = 'v1'\n"
    manifest = json.loads(droplet.sh(f"cat {release}/.provision/manifest.json"))
    assert {"common/__init__.py", "static", "assets/logo.txt", "app.py"} <= set(manifest)
    assert "TODO.txt" not in manifest and "debug.log" not in manifest


def test_a_change_in_the_sibling_package_shows_in_the_dry_run_and_deploys(droplet, repo, tmp_path):
    (repo / "libs/common/__init__.py").write_text("GREETING = 'v2'\n")
    git(repo, "commit", "-qam", "v2")
    before = droplet.sh(CHECKSUM)
    dry = droplet.fab("-H", droplet.name, "deploy", "--dry-run", "--source", str(repo / "apps/web"), env=ENV)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert droplet.sh(CHECKSUM) == before
    assert re.search(r"would   release /srv/mono/releases \(\S+ \(6 files\), 1 changed, 0 added, 0 removed; "
                     r"sent 1 file \(\S+ kB\), 5 kept from \S+\)", dry.stdout), dry.stdout
    assert "changed common/__init__.py\n--- common/__init__.py (host)\n+++ common/__init__.py (new)\n" in dry.stdout
    assert "-GREETING = 'v1'\n+GREETING = 'v2'\n" in dry.stdout
    deploy(droplet, repo)
    assert get(droplet.address) == "v2\n"


def test_a_link_out_of_the_app_is_one_line_before_any_host_is_touched(droplet, repo):
    (repo / "apps/web/greeting.py").symlink_to("../../libs/common/__init__.py")
    git(repo, "add", "apps/web/greeting.py")
    try:
        before = droplet.sh(CHECKSUM)
        res = droplet.fab("-H", droplet.name, "deploy", "--source", str(repo / "apps/web"), env=ENV)
        assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr
        [line] = res.stderr.strip().splitlines()
        assert re.fullmatch(r"error: app source: '\S+/apps/web/greeting\.py' is a symlink to "
                            r"'\.\./\.\./libs/common/__init__\.py', outside \S+: a release holds links within the app "
                            r"only; point it inside with a relative path, or ship that folder with app\.include", line)
        assert droplet.sh(CHECKSUM) == before
    finally:
        git(repo, "rm", "-qf", "apps/web/greeting.py")


def test_data_written_in_the_live_release_is_reported_at_the_next_deploy(droplet, repo, tmp_path):
    # what an operator running the app's init command as root in the live release leaves there
    droplet.sh("cd /srv/mono/current && .venv/bin/python -c 'import app; app.init_db()'")
    before = droplet.sh(CHECKSUM)
    dry = droplet.fab("-H", droplet.name, "deploy", "--dry-run", "--source", str(repo / "apps/web"), env=ENV)
    assert dry.returncode == 0 and droplet.sh(CHECKSUM) == before, dry.stdout + dry.stderr
    assert dry.stdout.count(f"{droplet.name}: {DATA_LINE}\n") == 1, dry.stdout
    out = deploy(droplet, repo, "-v", "--json", str(tmp_path / "summary.json"))
    assert out.count(f"{droplet.name}: {DATA_LINE}\n") == 1, out
    assert f"{droplet.name}: no changes, nothing restarted" in out  # reported, never acted on
    [summary] = json.loads((tmp_path / "summary.json").read_text())
    assert summary["round_trips"] == 1 and summary["changed"] == 0


def test_with_linked_dirs_the_data_outlives_releases_and_nothing_is_reported(droplet, repo):
    linked = {"FABRIC_APP_LINKED_DIRS": "log,uploads,instance"}
    out = deploy(droplet, repo, **linked)  # a new release: instance -> shared/instance
    assert (f"{droplet.name}: the live release holds data a new release will not have: instance/ (app.linked_dirs / "
            "linked_files keep them in /srv/mono/shared/ from this release on: copy them there)\n") in out, out
    assert re.search(rf"{droplet.name}: changed +release /srv/mono/releases", out), out
    assert droplet.sh("readlink /srv/mono/current/instance") == "/srv/mono/shared/instance\n"
    assert get(droplet.address, "/hit") == "1 hits\n"  # the app writes its data where releases link to
    (repo / "apps/web/assets/logo.txt").write_text("logo v2\n")
    git(repo, "commit", "-qam", "logo v2")
    out = deploy(droplet, repo, **linked)
    assert "holds data" not in out and re.search(rf"{droplet.name}: changed +release ", out), out
    assert get(droplet.address, "/logo") == "logo v2\n"
    assert get(droplet.address, "/hit") == "2 hits\n"
