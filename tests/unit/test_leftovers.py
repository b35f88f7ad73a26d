"""The data a live release holds that a new one will not have: the warning, from the fact's answer;
the runner printing a recipe's notes; a change of linked paths making a new release."""

import io
import json
from pathlib import Path

from provision import config as cfg
from provision.facts import Facts
from provision.leftovers import data_fact, data_warning
from provision.release import Release, manifest_path, meta_path
from provision.source import scan

from .test_source_data import LIVE, repo, settings  # noqa: F401 (repo: a fixture)


def data_host(s, paths, more=False) -> Facts:
    return Facts({data_fact(s): {"paths": paths, "more": more}})


def test_data_in_the_live_release_is_one_line_naming_linked_dirs():
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), Path(__file__).parents[2])
    assert data_warning(s, data_host(s, [])) is None
    assert data_warning(s, Facts({data_fact(s): None})) is None  # no manifest: nothing known
    found = ["db.sqlite3", "instance/data.sqlite", "instance/config.py", "pkg/instance/x.db", "state.db"]
    assert data_warning(s, data_host(s, found)) == (
        "the live release holds data a new release will not have: db.sqlite3, instance/, pkg/instance/, state.db "
        "(not shipped; keep them with app.linked_dirs / linked_files)")
    assert data_warning(s, data_host(s, [f"{i}.db" for i in range(9)], more=True)).count(", ") == 5
    linked = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello", linked_dirs=["log", "instance"],
                            linked_files=[".env", "db.sqlite3"]), Path(__file__).parents[2])
    assert data_warning(linked, data_host(linked, ["db.sqlite3", "instance/data.sqlite"])) == (
        "the live release holds data a new release will not have: db.sqlite3, instance/ (app.linked_dirs / "
        "linked_files keep them in /srv/hello/shared/ from this release on: copy them there)")
    fact = json.loads(data_fact(s)[1])
    assert fact == {"dir": LIVE.replace("mono", "hello"), "manifest": ".provision/manifest.json",
                    "skip": [".provision"], "match": ["*.sqlite", "*.sqlite3", "*.db", "instance/*", "*/instance/*"],
                    "max": 50}


def test_the_runner_prints_a_recipes_notes_once_dry_run_or_not():
    from provision.output import Printer
    from provision.runner import run_steps
    from provision.steps import Directory, Steps
    from .test_runner import OS, FakeRemote

    class Noted(Steps):
        def notes(self, facts):
            return [f"note from {len(facts[('file', '/x')] or {})} facts"]

    for dry_run in (True, False):
        out = io.StringIO()
        host = FakeRemote({("os", ""): OS, ("file", "/x"): {"type": "dir", "mode": 0o755, "owner": "root",
                                                           "group": "root"}})
        run_steps(host, Noted([Directory("/x", owner="root", group="root")]), dry_run=dry_run, printer=Printer(out))
        assert out.getvalue().count("web1: note from 4 facts\n") == 1 and host.round_trips == 1


def test_linking_a_path_to_shared_makes_a_new_release(repo):
    """The fix the data warning names must take effect even when nothing else changed."""
    s = settings(repo)
    src = scan(s.source)
    live = Release(s, src, "r0", "venvkey", {})
    fresh = Facts({("file", LIVE): None, ("content", manifest_path(s)): None, ("content", meta_path(s)): None,
                   ("file", f"{LIVE}/.provision"): None})
    meta = json.loads(dict(live.plan(fresh, set()).upload.extra)[".provision/release.json"])
    facts = Facts({("content", meta_path(s)): json.dumps(meta), ("content", manifest_path(s)): "{}",
                   ("file", LIVE): {"type": "link", "target": "releases/r0", "owner": "root"},
                   ("file", f"{LIVE}/.provision"): {"type": "dir", "owner": "root"}})
    assert not Release(s, src, "r1", "venvkey", {}).needed(facts)
    linked = settings(repo, linked_dirs=["log", "uploads", "instance"])
    assert Release(linked, src, "r1", "venvkey", {}).needed(facts)
    older = Facts({**{k: facts[k] for k in [("content", manifest_path(s)), ("file", LIVE), ("file", f"{LIVE}/.provision")]},
                   ("content", meta_path(s)): json.dumps({k: v for k, v in meta.items() if k != "linked"})})
    assert not Release(s, src, "r1", "venvkey", {}).needed(older)  # no redeploy for releases made before
