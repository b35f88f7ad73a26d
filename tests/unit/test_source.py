import io
import os
import subprocess
import tarfile

import pytest

from provision.errors import ProvisionError
from provision.source import PROJECT_FILES, deploy_files, scan


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


def test_dangling_symlink_is_one_clear_error(tmp_path):
    make_app(tmp_path)
    (tmp_path / "pkg" / "data").symlink_to("../gone.txt")
    with pytest.raises(ProvisionError, match=r"/pkg/data' is a symlink to a missing file .*remove it or point it"):
        scan(tmp_path)


def test_link_to_a_file_is_shipped_as_a_link(tmp_path):
    make_app(tmp_path)
    (tmp_path / "main.py").symlink_to("app.py")
    src = scan(tmp_path)
    assert "main.py" in src.files
    assert tarfile.open(fileobj=io.BytesIO(src.tarball())).getmember("main.py").linkname == "app.py"


def test_file_name_not_utf8_is_one_clear_error(tmp_path):
    make_app(tmp_path)
    (tmp_path / os.fsdecode(b"caf\xe9.txt")).write_text("x")
    with pytest.raises(ProvisionError, match=r"caf\\xe9\.txt.*rename it") as e:
        scan(tmp_path)
    assert "\n" not in str(e.value)


def test_the_deploys_own_files_in_the_project_directory_are_never_shipped(tmp_path):
    for rel in ("app.py", "fabfile.py", "fabric.yml", "deploy/prod.ini", "templates/nginx-site.conf.j2",
                "templates/index.html", "checks/test_app.py"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    names = ("nginx-site.conf.j2", "app@.service.j2", "gunicorn.conf.py.j2")
    own = [*(tmp_path / f for f in PROJECT_FILES), tmp_path / "deploy/prod.ini", tmp_path / "elsewhere.ini",
           *(tmp_path / "templates" / n for n in names)]
    leave_out = deploy_files(tmp_path, own)
    assert {"fabfile.py", "fabric.yml", "deploy/prod.ini", "templates/nginx-site.conf.j2"} <= set(leave_out)
    # Flask's templates/ is the app's: only provision's template names stay home
    assert scan(tmp_path, leave_out).files == ("app.py", "checks/test_app.py", "templates/index.html")
    # a fabfile package stays home too
    (tmp_path / "fabfile").mkdir()
    (tmp_path / "fabfile/__init__.py").write_text("x\n")
    assert "fabfile/__init__.py" not in scan(tmp_path, deploy_files(tmp_path, own)).files
    # a source beside the project (the kit's examples/hello) holds none of them
    assert deploy_files(tmp_path / "checks", own) == ()


def test_files_unchanged_since_the_last_scan_are_not_read_again(tmp_path, monkeypatch):
    from provision import source

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(source.HashCache, "RACY", 0)
    app = tmp_path / "app"
    app.mkdir()
    (app / "a.py").write_text("a = 1\n")
    (app / "b.py").write_text("b = 1\n")
    read = []
    real = source._hash_file
    monkeypatch.setattr(source, "_hash_file", lambda p: read.append(p.name) or real(p))
    first = scan(app)
    second = scan(app)
    assert sorted(read) == ["a.py", "b.py"] and first.digest == second.digest  # the second scan read nothing
    (app / "b.py").write_text("b = 2\n")  # the same size, a new stamp
    third = scan(app)
    assert read[2:] == ["b.py"] and third.hashes["b.py"] != first.hashes["b.py"]


def test_a_file_changed_within_the_racy_window_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    app = tmp_path / "app"
    app.mkdir()
    (app / "a.py").write_text("a = 1\n")
    scan(app)
    assert not (tmp_path / "cache").exists()  # written just now: its stamp could survive a second change
