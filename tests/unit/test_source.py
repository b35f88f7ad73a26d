import io
import subprocess
import tarfile

from provision.source import scan


def make_app(d):
    (d / "app.py").write_text("app = None\n")
    (d / "requirements.txt").write_text("flask\n")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"x")
    (d / ".venv").mkdir()
    (d / ".venv" / "pyvenv.cfg").write_text("")
    (d / "myenv").mkdir()
    (d / "myenv" / "pyvenv.cfg").write_text("")
    (d / "pkg").mkdir()
    (d / "pkg" / "mod.py").write_text("x = 1\n")
    return d


def test_plain_directory_skips_caches_and_virtualenvs(tmp_path):
    src = scan(make_app(tmp_path))
    assert src.files == ("app.py", "pkg/mod.py", "requirements.txt")
    assert src.revision == "" and not src.dirty
    names = tarfile.open(fileobj=io.BytesIO(src.tarball())).getnames()
    assert names == list(src.files)


def test_digest_and_tarball_are_deterministic_and_content_sensitive(tmp_path):
    a = scan(make_app(tmp_path))
    b = scan(tmp_path)
    assert a.digest == b.digest and a.tarball() == b.tarball()
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")
    assert scan(tmp_path).digest != a.digest


def test_git_checkout_ships_tracked_files_and_marks_dirty(tmp_path):
    make_app(tmp_path)
    (tmp_path / "notes.tmp").write_text("untracked")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "app.py", "requirements.txt", "pkg"], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)
    src = scan(tmp_path)
    assert src.files == ("app.py", "pkg/mod.py", "requirements.txt")
    assert len(src.revision) >= 7 and not src.dirty
    assert src.release_id(0) == f"19700101T000000Z-{src.revision}"
    (tmp_path / "app.py").write_text("app = 1\n")
    dirty = scan(tmp_path)
    assert dirty.dirty and dirty.release_id(0).endswith("-dirty") and dirty.digest != src.digest
