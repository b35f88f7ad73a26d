"""Uploads beside the apply script: the stream (shared or made as it is sent), the loader that
spools it on the host, and release_tree.py, which completes a release from the live one's files.
The loader and the host program run here for real (bash, python3), on temporary folders."""

import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from provision import remote, upload as up
from provision.script import build_script, loader, parse_report
from provision.source import LINK_TAG, scan
from provision.steps import Change, Planned, Step
from provision.upload import Upload, compression_level


def app(tmp_path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


def members(stream) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(stream.read()), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_an_upload_made_as_it_is_sent_carries_what_a_shared_one_does(tmp_path, monkeypatch):
    rng = random.Random(1)
    src = scan(app(tmp_path, {"app.py": b"print(1)\n", "model.bin": rng.randbytes(300_000), "same.py": b"x\n"}))
    u = Upload(src, ("app.py", "model.bin"), ((".provision/manifest.json", b"{}\n"),))
    shared, size = u.open()
    assert size == len(shared.getvalue())
    expected = {"app.py": b"print(1)\n", "model.bin": src.path("model.bin").read_bytes(),
                ".provision/manifest.json": b"{}\n"}
    assert members(shared) == expected
    again, _ = u.open()  # a second host: the same bytes, its own reader
    assert members(again) == expected
    monkeypatch.setattr(up, "IN_MEMORY", 1000)  # larger than that: made for each host, through a pipe
    streamed, size = u.open()
    assert size is None and members(streamed) == expected


def test_incompressible_uploads_are_not_compressed(tmp_path):
    rng = random.Random(2)
    src = scan(app(tmp_path, {"model.bin": rng.randbytes(200_000), "views.py": b"def view(request):\n" * 5000}))
    assert compression_level(src, ("model.bin",)) == 0
    assert compression_level(src, ("views.py",)) == 1


class StepWithUpload(Step):
    name = "unpack"

    def __init__(self, upload):
        self.upload = upload

    def plan(self, facts, notified):
        return Change(['echo "@@show $(tar -xzf "$__upload" -O app.py)"', 'echo "@@show spool: $__spool"'], upload=self.upload)


def run_loaded(script: str, stream, size) -> subprocess.CompletedProcess:
    """What the runner sends: the loader as the command, the script then the upload on its input."""
    data = script.encode()
    return subprocess.run(["bash", "-c", loader(len(data), size)], input=data + stream.read(), capture_output=True,
                          timeout=30)


@pytest.mark.parametrize("known_size", [True, False])
def test_the_loader_spools_the_upload_for_the_script_and_removes_it(tmp_path, known_size):
    src = scan(app(tmp_path, {"app.py": b"print('new')\n"}))
    u = Upload(src, ("app.py",))
    step = StepWithUpload(u)
    script = build_script([Planned(step, step.plan(None, set()))])
    stream, size = u.open()
    res = run_loaded(script, stream, size if known_size else None)
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr
    assert "print('new')" in out and parse_report(out).done == {0}
    spool = out.split("spool: ")[1].split()[0]
    assert spool.startswith("/var/tmp/provision.") and not os.path.exists(spool)  # removed when the script ends


def test_an_upload_cut_short_runs_nothing(tmp_path):
    src = scan(app(tmp_path, {"app.py": b"print('new')\n"}))
    step = StepWithUpload(Upload(src, ("app.py",)))
    script = build_script([Planned(step, step.plan(None, set()))])
    stream, size = Upload(src, ("app.py",)).open()
    res = run_loaded(script, io.BytesIO(stream.read()[:-10]), size)
    assert res.returncode == 141 and b"upload cut short" in res.stderr and b"@@ok" not in res.stdout


# -- release_tree.py: a new release completed from the live one's files ---------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def link_hash(target: str) -> str:
    return sha(LINK_TAG + target.encode())


@pytest.fixture
def releases(tmp_path):
    """A live release as provision leaves it (root's files, modification time 0, its manifest), and a
    new release's folder holding what the upload brought: its manifest and one changed file."""
    base = tmp_path / "r0"
    files = {"app.py": b"old\n", "lib/util.py": b"u\n", "bin/run": b"#!/bin/sh\n", "same.txt": b"s\n"}
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    (base / "bin/run").chmod(0o755)
    (base / "main.py").symlink_to("app.py")
    manifest = {rel: sha(d) for rel, d in files.items()}
    manifest["bin/run"] += "+x"
    manifest["main.py"] = link_hash("app.py")
    (base / ".provision").mkdir()
    (base / ".provision/manifest.json").write_text(json.dumps(manifest))
    for p in base.rglob("*"):
        if not p.is_symlink():
            os.utime(p, (0, 0))
    new = tmp_path / "r1.tmp"
    (new / ".provision").mkdir(parents=True)
    (new / "app.py").write_bytes(b"new\n")
    wanted = dict(manifest, **{"app.py": sha(b"new\n")})
    (new / ".provision/manifest.json").write_text(json.dumps(wanted))
    return base, new, wanted


def complete(base, new) -> subprocess.CompletedProcess:
    args = {"tmp": str(new), "manifest": str(new / ".provision/manifest.json"), "link_tag": LINK_TAG.hex(),
            "base": str(base) if base else None,
            "base_manifest": str(base / ".provision/manifest.json") if base else None}
    return subprocess.run(["bash", "-c", remote.python("release_tree.py", args)], capture_output=True, text=True,
                          timeout=30)


def test_a_new_release_takes_the_files_it_shares_with_the_live_one_as_hard_links(releases):
    base, new, wanted = releases
    res = complete(base, new)
    assert res.returncode == 0, res.stdout + res.stderr
    for rel in ("lib/util.py", "same.txt", "bin/run"):
        assert (new / rel).stat().st_ino == (base / rel).stat().st_ino  # the same file: nothing copied
    assert (new / "app.py").read_bytes() == b"new\n" and (new / "app.py").stat().st_ino != (base / "app.py").stat().st_ino
    assert os.readlink(new / "main.py") == "app.py"
    assert os.access(new / "bin/run", os.X_OK)


@pytest.mark.parametrize("tamper", ["edited", "chmod", "owner", "missing", "no base", "linked dir"])
def test_a_live_file_that_is_not_as_provision_left_it_is_never_reused(releases, tamper):
    base, new, _ = releases
    if tamper == "edited":  # by hand, as root: its modification time tells
        (base / "same.txt").write_bytes(b"s\n")
    elif tamper == "chmod":
        (base / "same.txt").chmod(0o666)
    elif tamper == "owner":
        os.chown(base / "same.txt", 1000, 1000)
    elif tamper == "missing":
        (base / "same.txt").unlink()
    elif tamper == "linked dir":  # lib/ replaced by a link to a folder that looks the same
        (base / "lib").rename(base.parent / "elsewhere")
        (base / "lib").symlink_to(base.parent / "elsewhere")
    res = complete(None if tamper == "no base" else base, new)
    assert res.returncode == 75 and parse_report("@@out " + res.stdout).resend, res.stdout + res.stderr
    if tamper != "no base":
        culprit = "lib/util.py" if tamper == "linked dir" else "same.txt"
        assert culprit in res.stdout


def test_an_upload_shows_its_progress_once_it_takes_over_a_second(monkeypatch):
    from provision import runner
    from provision.output import Printer

    clock = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    sent = runner.upload_progress(Printer(out), "web1", "1 file (200.0 MB)")
    for t, n in ((0.5, 10_000_000), (1.1, 22_000_000), (2.0, 40_000_000), (3.2, 64_000_000)):
        clock[0] = 100.0 + t
        sent(n)
    assert out.getvalue().splitlines() == [
        "web1 | uploading 1 file (200.0 MB): 22.0 MB sent (20.0 MB/s)",
        "web1 | uploading 1 file (200.0 MB): 64.0 MB sent (20.0 MB/s)"]
