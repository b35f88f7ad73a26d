"""A dry run of a new version of the app lists its files changed, added and removed against the live
release, with diffs, and touches nothing. Order matters: one droplet."""

import json
import re
import shutil

import pytest

from .conftest import ROOT
from .test_deploy import CHECKSUM

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The app as deployed: examples/hello and a file its next version drops."""
    d = tmp_path_factory.mktemp("live") / "hello"
    shutil.copytree(ROOT / "examples/hello", d)
    (d / "NOTES.txt").write_text("to be removed\n")
    return d


def dry_run(droplet, source, tmp_path) -> tuple[str, dict]:
    """The dry run's output, and its summary (--json)."""
    before = droplet.sh(CHECKSUM)
    res = droplet.fab("-H", droplet.name, "deploy", "--dry-run", "--source", str(source),
                      "--json", str(tmp_path / "summary.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert droplet.sh(CHECKSUM) == before  # nothing under /etc or /srv touched
    [summary] = json.loads((tmp_path / "summary.json").read_text())
    return res.stdout, summary


def test_deploy(droplet, live):
    res = droplet.fab("-H", droplet.name, "deploy", "--source", str(live))
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_lists_the_files_that_change_with_diffs(droplet, live, tmp_path):
    new = tmp_path / "hello"
    shutil.copytree(live, new)
    app = new / "app.py"
    app.write_text(app.read_text().replace("Hello from provision!", "Hello, reviewer!"))
    (new / "NOTES.txt").unlink()
    (new / "static").mkdir()
    (new / "static/robots.txt").write_text("User-agent: *\n")
    (new / "static/favicon.ico").write_bytes(b"\0\0\1\0" + bytes(60))
    (new / ".env.example").write_text("SECRET_KEY=change-me\n")
    out, summary = dry_run(droplet, new, tmp_path)
    assert re.search(rf"^{droplet.name}: would   release /srv/hello/releases \(\S+ \(6 files\), "
                     r"1 changed, 3 added, 1 removed; sent 4 files \(\S+ kB\), 2 kept from \S+\)$", out, re.M), out
    listed = out.split(" removed; sent ", 1)[1].split("\n", 1)[1].split(f"\n{droplet.name}: ", 1)[0]
    assert listed.splitlines() == [
        "changed app.py",
        "--- app.py (host)",
        "+++ app.py (new)",
        "@@ -10,7 +10,7 @@",
        " ",
        ' @app.get("/")',
        " def index():",
        '-    return "Hello from provision!\\n"',
        '+    return "Hello, reviewer!\\n"',
        " ",
        " ",
        ' @app.get("/whoami")',
        "added   .env.example (content hidden: sensitive)",
        "added   static/favicon.ico (binary, 64 bytes)",
        "added   static/robots.txt",
        "--- /dev/null",
        "+++ static/robots.txt (new)",
        "@@ -0,0 +1 @@",
        "+User-agent: *",
        "removed NOTES.txt",
    ]
    assert "change-me" not in out
    assert summary["round_trips"] == 2  # the facts, then the live copy of app.py


def test_dry_run_of_the_live_version_says_nothing_would_change(droplet, live, tmp_path):
    out, summary = dry_run(droplet, live, tmp_path)
    assert f"{droplet.name}: dry run: nothing would change" in out
    assert f"{droplet.name}: would" not in out and summary["round_trips"] == 1
