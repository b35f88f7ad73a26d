"""What a dry run shows of a release's files: the live release's manifest and old contents in, text out."""

import hashlib
import json
from pathlib import Path

from provision import config as cfg
from provision import secrets
from provision.release import SHOWN_IN_ALL, SHOWN_LINES, Release, manifest_path, meta_path
from provision.source import scan
from provision.facts import Facts, below

ROOT = Path(__file__).resolve().parents[2]
S = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), ROOT)
LIVE = "/srv/hello/current"
ROOTS = {"type": "dir", "mode": 0o755, "owner": "root", "group": "root"}
LINK = {"type": "link", "target": "releases/r0", "mode": 0o777, "owner": "root", "group": "root"}


def release(tmp_path, files: dict[str, bytes]) -> Release:
    src = tmp_path / "src"
    for path, data in files.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    return Release(S, scan(src), "r1", "venvkey", {"unit": b"[Service]\n"})


def host(live: dict[str, bytes] | None) -> Facts:
    """A host whose live release holds ``live`` (None: a release made before manifests)."""
    manifest = None if live is None else json.dumps({p: hashlib.sha256(d).hexdigest() for p, d in live.items()})
    return Facts({("content", meta_path(S)): json.dumps({"id": "r0", "digest": "old"}),
                  ("content", manifest_path(S)): manifest, ("file", LIVE): LINK, ("file", f"{LIVE}/.provision"): ROOTS})


def dry_run(step: Release, facts: Facts, live: dict[str, bytes]) -> str:
    """The step's line and what it shows below it, with the old contents it asks for (as the fact
    gatherer answers: text, or None when not text)."""
    asked = step.diff_facts(facts)
    old = {f: live[f[1].split("\0")[1]] for f in asked}
    more = Facts({f: data.decode() if b"\0" not in data else None for f, data in old.items()})
    return step.plan(facts, set()).summary + "\n" + step.show_diff(facts, more)


def test_changed_added_and_removed_files_are_listed_with_diffs(tmp_path):
    live = {"app.py": b"a\nb\nc\n", "same.py": b"s\n", "old.txt": b"gone\n"}
    step = release(tmp_path, {"app.py": b"a\nB\nc\n", "same.py": b"s\n", "new.txt": b"hello\n"})
    facts = host(live)
    assert step.diff_facts(facts) == [below(LIVE, "app.py")]  # only what a diff needs
    assert dry_run(step, facts, live) == (
        "r1 (3 files), 1 changed, 1 added, 1 removed; sent 2 files (0.5 kB), 1 kept from r0\n"
        "changed app.py\n--- app.py (host)\n+++ app.py (new)\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n"
        "added   new.txt\n--- /dev/null\n+++ new.txt (new)\n@@ -0,0 +1 @@\n+hello\n"
        "removed old.txt")


def test_the_manifest_a_release_writes_is_what_the_next_dry_run_compares_with(tmp_path):
    step = release(tmp_path, {"app.py": b"print(1)\n", "lib/util.py": b"x = 1\n", ".env": b"A=1\n", "log/keep": b""})
    manifest = json.loads(dict(step.plan(host({}), set()).upload.extra)[".provision/manifest.json"])
    # .env and log/ become links to shared/: not files of the release
    assert manifest == {"app.py": hashlib.sha256(b"print(1)\n").hexdigest(),
                        "lib/util.py": hashlib.sha256(b"x = 1\n").hexdigest()}
    facts = Facts({**{k: host({})[k] for k in step.facts()}, ("content", manifest_path(S)): json.dumps(manifest)})
    assert step.plan(facts, set()).summary == ("r1 (4 files), 0 changed, 0 added, 0 removed; sent 0 files "
                                               "(0.4 kB), 2 kept from r0")
    assert step.show_diff(facts, Facts({})) == ""


def test_a_fresh_host_gets_every_file_added_and_an_older_release_is_not_compared(tmp_path):
    step = release(tmp_path, {"app.py": b"print(1)\n"})
    fresh = Facts({("content", meta_path(S)): None, ("content", manifest_path(S)): None, ("file", LIVE): None,
                   ("file", f"{LIVE}/.provision"): None})
    assert dry_run(step, fresh, {}) == ("r1 (1 files), 0 changed, 1 added, 0 removed; sent 1 file (0.3 kB)\n"
                                        "added   app.py\n--- /dev/null\n+++ app.py (new)\n@@ -0,0 +1 @@\n+print(1)")
    older = host(None)
    assert dry_run(step, older, {}) == ("r1 (1 files), files not compared (the live release has no readable manifest); "
                                         "sent 1 file (0.3 kB)\n")


def test_diffs_are_cut_at_a_bound_per_file_and_in_all(tmp_path):
    lines = b"".join(b"line %d\n" % i for i in range(300))
    step = release(tmp_path, {f"f{i}.txt": lines for i in range(6)})
    text = dry_run(step, host({}), {})
    diff_lines = [l for l in text.splitlines()[1:] if not l.startswith(("added ", "... "))]
    assert len(diff_lines) == SHOWN_IN_ALL == 5 * SHOWN_LINES
    # each diff: 3 header lines and 300 added; five show 200 of their 303, the sixth none
    assert text.count("\n... 103 more lines\n") == 5 and text.endswith("added   f5.txt\n... 303 more lines")


def test_binary_and_sensitive_files_show_no_content(tmp_path):
    secrets.remember(["hunter2-known"])
    live = {"logo.png": b"\x89PNG\0old", "conf.py": b"PASSWORD = 'hunter2-known'\n", "settings.py": b"A = 1\n",
            "blob.txt": b"old\0binary\n"}
    step = release(tmp_path, {
        "logo.png": b"\x89PNG\0new!", "img/new.gif": b"GIF89a\0\0", ".env.example": b"KEY=example-value\n",
        "certs/site.pem": b"-----BEGIN-----\n", "id_ed25519": b"private\n", "config/secrets/db.py": b"pw = 1\n",
        "aws_credentials.ini": b"k=v\n",
        "conf.py": b"PASSWORD = env('PASSWORD')\n",  # the old content holds a known secret
        "settings.py": b"A = 'hunter2-known'\n",  # the new one does
        "blob.txt": b"now text\n",  # the live copy is not text
    })
    facts = host(live)
    assert step.diff_facts(facts) == [below(LIVE, "blob.txt"), below(LIVE, "conf.py")]
    text = dry_run(step, facts, live)
    assert text.splitlines() == [
        "r1 (10 files), 4 changed, 6 added, 0 removed; sent 10 files (1.2 kB)",
        "changed blob.txt (no diff: the live copy is binary, over 1 MiB or unreadable)",
        "changed conf.py (content hidden: sensitive)",
        "changed logo.png (binary, 9 bytes)",
        "changed settings.py (content hidden: sensitive)",
        "added   .env.example (content hidden: sensitive)",
        "added   aws_credentials.ini (content hidden: sensitive)",
        "added   certs/site.pem (content hidden: sensitive)",
        "added   config/secrets/db.py (content hidden: sensitive)",
        "added   id_ed25519 (content hidden: sensitive)",
        "added   img/new.gif (binary, 8 bytes)",
    ]
