"""Uploads that scale with the change: a new release starts from the live one's files on the host
(hard links), only changed files cross the wire, and a live file changed by hand is never reused."""

import os
import shutil

import pytest

from .test_releases import get

pytestmark = pytest.mark.integration
RELEASES = "/srv/hello/releases"


def deploy(droplet, app):
    res = droplet.fab("-H", droplet.name, "deploy", "--source", str(app))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def greet(app, text):
    path = app / "app.py"
    path.write_text(path.read_text().replace("Hello from provision!", text).replace("Hello again!", text))


def live(droplet) -> str:
    return droplet.sh("readlink -f /srv/hello/current").strip()


def test_a_change_sends_only_the_changed_files_and_the_rest_are_the_live_files(droplet, tmp_path):
    app = tmp_path / "hello"
    shutil.copytree("examples/hello", app)
    (app / "static").mkdir()
    (app / "static/big.bin").write_bytes(os.urandom(3_000_000))
    (app / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    first = deploy(droplet, app)
    assert "0 changed, 5 added, 0 removed; sent 5 files (3.0 MB)" in first, first
    old = live(droplet)

    greet(app, "Hello again!")
    (app / "tool.sh").chmod(0o755)  # a mode change alone is a change too
    out = deploy(droplet, app)
    assert "2 changed, 0 added, 0 removed; sent 2 files" in out and "kept from " + old.rsplit("/", 1)[1] in out, out
    new = live(droplet)
    assert new != old and get(droplet.address) == "Hello again!"
    inodes = droplet.sh(f"stat -c %i {old}/static/big.bin {new}/static/big.bin {old}/app.py {new}/app.py").split()
    assert inodes[0] == inodes[1] and inodes[2] != inodes[3]  # the big file is the live one's: not sent again
    assert droplet.sh(f"stat -c %a {new}/tool.sh {old}/tool.sh").split() == ["755", "644"]
    assert droplet.sh("ls -A /var/tmp | grep -c '^provision\\.' || true").strip() == "0"  # the spool is gone


def test_a_live_file_changed_by_hand_is_not_reused_and_the_release_is_sent_whole(droplet, tmp_path):
    app = tmp_path / "hello"
    shutil.copytree("examples/hello", app)
    deploy(droplet, app)
    current = live(droplet)
    # root edits the live release by hand (the same size and content would not matter: it is not trusted)
    droplet.sh(f"sed -i 's/import os/import os  # patched/' {current}/app.py && touch {current}/requirements.txt")
    greet(app, "Hello, third time!")
    out = deploy(droplet, app)
    assert "files of the live release were changed on the host since provision wrote them; sending the whole " \
           "release" in out, out
    new = live(droplet)
    assert get(droplet.address) == "Hello, third time!"
    assert "patched" not in droplet.sh(f"cat {new}/app.py")
    old_inode, new_inode = droplet.sh(f"stat -c %i {current}/requirements.txt {new}/requirements.txt").split()
    assert old_inode != new_inode and droplet.sh(f"stat -c %Y {new}/requirements.txt").strip() == "0"
