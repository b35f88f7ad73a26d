"""Monorepos (app.include), symlinks shipped as symlinks, untracked files counted: from real files
and git checkouts."""

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from provision import config as cfg
from provision.errors import ProvisionError
from provision.facts import Facts
from provision.release import Release, manifest_path, meta_path
from provision.source import scan, untracked_note

LIVE = "/srv/mono/current"


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def repo(tmp_path):
    """A monorepo: the app in apps/web, a package it imports in libs/common, committed."""
    write(tmp_path, {"apps/web/app.py": "from common import GREETING\n", "apps/web/requirements.txt": "",
                     "apps/web/assets/logo.txt": "logo\n", "libs/common/__init__.py": "GREETING = 'v1'\n",
                     "libs/common/util.py": "X = 1\n", "fabric.yaml": "app: {}\n"})
    (tmp_path / "apps/web/static").symlink_to("assets")
    (tmp_path / "apps/web/logo.txt").symlink_to("assets/logo.txt")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def names(tar_bytes: bytes) -> dict[str, str]:
    """Each member of a tarball: a link's target, or a file's content."""
    tar = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    return {m.name: (f"-> {m.linkname}" if m.issym() else tar.extractfile(m).read().decode()) for m in tar}


def test_included_folders_land_under_their_name_and_count_in_the_digest(repo):
    web = repo / "apps/web"
    src = scan(web, include=[(repo / "libs/common", ())])
    assert src.files == ("app.py", "assets/logo.txt", "common/__init__.py", "common/util.py", "logo.txt",
                         "requirements.txt", "static")
    assert names(src.tarball())["common/__init__.py"] == "GREETING = 'v1'\n"
    assert src.path("common/util.py") == repo / "libs/common/util.py" and not src.dirty
    (repo / "libs/common/__init__.py").write_text("GREETING = 'v2'\n")
    changed = scan(web, include=[(repo / "libs/common", ())])
    assert changed.dirty and changed.digest != src.digest  # a change in the sibling makes a new release
    assert changed.hashes["common/__init__.py"] != src.hashes["common/__init__.py"]
    assert scan(web).digest != src.digest and "common/util.py" not in scan(web).files


def test_an_included_file_lands_beside_the_app(repo):
    src = scan(repo / "apps/web", include=[(repo / "libs/common/util.py", ())])
    assert "util.py" in src.files and names(src.tarball())["util.py"] == "X = 1\n"


def test_a_link_standing_for_an_included_folder_gives_way_to_it(repo):
    web = repo / "apps/web"
    (web / "common").symlink_to("../../libs/common")  # how the app imports it locally
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "link")
    with pytest.raises(ProvisionError, match="outside .*app.include"):
        scan(web)
    src = scan(web, include=[(repo / "libs/common", ())])
    assert "common" not in src.links and "common/__init__.py" in src.files


def test_tracked_symlinks_inside_the_app_are_shipped_as_links_and_their_target_is_in_the_digest(repo):
    web = repo / "apps/web"
    src = scan(web)
    assert src.links == {"logo.txt": "assets/logo.txt", "static": "assets"}  # a link to a folder too
    shipped = names(src.tarball())
    assert shipped["static"] == "-> assets" and shipped["logo.txt"] == "-> assets/logo.txt"
    (web / "logo.txt").unlink()
    (web / "logo.txt").symlink_to("static/logo.txt")  # the same content, another target
    assert scan(web).digest != src.digest and scan(web).hashes["logo.txt"] != src.hashes["logo.txt"]


def test_outside_absolute_and_unshipped_link_targets_are_one_line_each(repo):
    web = repo / "apps/web"
    write(repo, {"apps/web/notes.txt": "untracked\n"})
    cases = {"up": ("../../libs/common/util.py", "outside .* point it inside with a relative path, or ship that "
                    "folder with app.include"),
             "abs": (str(web / "app.py"), "outside"),
             "via": ("static/../../../libs", "outside"),
             "todo": ("notes.txt", "'notes.txt', which is not shipped .*git add it"),
             "conf": ("../../fabric.yaml", "outside")}
    for name, (target, why) in cases.items():
        (web / name).symlink_to(target)
        git(repo, "add", "-f", f"apps/web/{name}")
        with pytest.raises(ProvisionError, match=f"/{name}' is a symlink to .*{why}") as e:
            scan(web)
        assert "\n" not in str(e.value)
        git(repo, "rm", "-q", "--cached", f"apps/web/{name}")
        (web / name).unlink()


def test_links_outside_git_are_shipped_too_never_walked(tmp_path):
    write(tmp_path, {"app.py": "", "data/a.txt": "a\n"})
    (tmp_path / "more").symlink_to("data")
    src = scan(tmp_path)
    assert src.files == ("app.py", "data/a.txt", "more") and src.links == {"more": "data"}


def test_untracked_files_are_counted_in_one_line_ignored_ones_are_not(repo):
    web = repo / "apps/web"
    assert untracked_note(scan(web)) is None
    write(repo, {"apps/web/new.py": "", "apps/web/.gitignore": "*.log\n", "apps/web/debug.log": "",
                 "apps/web/__pycache__/x.pyc": "", "libs/common/extra.py": "", "apps/web/env3/pyvenv.cfg": "",
                 "apps/web/env3/bin/python": ""})
    assert untracked_note(scan(web, ["fabfile.py"])) == (
        "2 untracked files not shipped: .gitignore, new.py (git add them to ship them)")
    both = scan(web, include=[(repo / "libs/common", ())])
    assert both.untracked == (".gitignore", "new.py", "common/extra.py")
    assert untracked_note(both, shown=2) == ("3 untracked files not shipped: .gitignore, new.py, ... "
                                             "(git add them to ship them)")
    (web / ".gitignore").unlink()
    (web / "debug.log").unlink()
    assert untracked_note(scan(web)) == "1 untracked file not shipped: new.py (git add it to ship it)"


def settings(repo: Path, **raw):
    return cfg.build(dict(cfg.DEFAULTS, name="mono", source="apps/web", **raw), repo)


def test_include_is_validated_in_one_line(repo, monkeypatch):
    s = settings(repo, include=["../../libs/common"])
    assert s.include == (repo / "libs/common",)
    assert settings(repo, include="../../libs/common,../../libs/common/util.py").include == (
        repo / "libs/common", repo / "libs/common/util.py")  # from the inventory or the environment
    (repo / "libs/.ssh").mkdir()
    (repo / "apps/web/logo").mkdir()
    (repo / "libs/logo").mkdir()
    (repo / "libs/log").mkdir()
    monkeypatch.setenv("HOME", str(repo / "libs/home"))
    (repo / "libs/home").mkdir()
    bad = {"../../libs/nope": "no such file or folder .*/libs/nope; give paths relative to app.source",
           "assets": "it is inside app.source, which is shipped already",
           "../..": "it holds the app, the fabfile's folder or your home folder",
           "../../libs": "it holds the app, the fabfile's folder or your home folder",  # HOME is in it
           "../../libs/.ssh": "it looks like a folder of keys or secrets",
           "../../libs/logo": "it would land as 'logo' in the release, where app.source has its own 'logo'",
           "../../libs/log": "its name 'log' is taken in the release",
           }
    for item, why in bad.items():
        with pytest.raises(ProvisionError, match=f"^invalid setting app.include={item!r}: {why}") as e:
            settings(repo, include=[item])
        assert "\n" not in str(e.value)
    with pytest.raises(ProvisionError, match="its name 'common' is taken"):
        settings(repo, include=["../../libs/common", "../../apps/../libs/common"])


def test_a_dry_run_shows_a_changed_link_and_an_included_file(repo):
    s = settings(repo, include=["../../libs/common"])
    src = scan(s.source, include=[(p, ()) for p in s.include])
    step = Release(s, src, "r1", "venvkey", {})
    live = dict(src.hashes, static="0", **{"common/__init__.py": "0"})
    facts = Facts({("content", meta_path(s)): json.dumps({"id": "r0"}), ("content", manifest_path(s)): json.dumps(live),
                   ("file", LIVE): {"type": "link", "target": "releases/r0", "owner": "root"},
                   ("file", f"{LIVE}/.provision"): {"type": "dir", "owner": "root"}})
    assert step.diff_facts(facts) == [("content_below", f"{LIVE}\0common/__init__.py")]  # never the link's
    more = Facts({("content_below", f"{LIVE}\0common/__init__.py"): "GREETING = 'v0'\n"})
    assert step.show_diff(facts, more).splitlines() == [
        "changed common/__init__.py", "--- common/__init__.py (host)", "+++ common/__init__.py (new)",
        "@@ -1 +1 @@", "-GREETING = 'v0'", "+GREETING = 'v1'", "changed static (a link to assets)"]
