"""The app's source as a deterministic tarball and a content digest.

In a git checkout the tracked files are shipped (as they are in the working
tree); elsewhere the whole directory minus VCS, caches and virtualenvs.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import ProvisionError

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "env", ".tox", ".mypy_cache",
             ".pytest_cache", "node_modules", ".sandbox"}
SKIP_SUFFIXES = (".pyc", ".pyo")
# The deploy's own files beside the fabfile: Fabric's project config in each of its formats, the
# fabfile (a module or a package) and the default inventory. The inventories in use are added
# where they are.
PROJECT_FILES = ("fabfile.py", "fabfile", "fabric.yaml", "fabric.yml", "fabric.json", "fabric.py", "inventory.ini")


def deploy_files(source: Path, paths: Iterable[Path]) -> tuple[str, ...]:
    """Those of the deploy's own files and folders (``paths``: the fabfile, Fabric's config, which
    may hold ``var_*`` secrets, the inventories, provision's template overrides) that lie inside
    the app's source, relative to it: when the source is the project directory (the default). A
    release never holds them. (A ``templates/`` folder may be the app's too, as Flask's is: pass
    only provision's template files.)"""
    source = source.resolve()
    inside = {str(p.resolve().relative_to(source)) for p in paths if p.resolve().is_relative_to(source)}
    return tuple(sorted(inside - {"."}))


@dataclass(frozen=True)
class Source:
    root: Path
    files: tuple[str, ...]  # relative paths, sorted
    digest: str  # sha256 over paths, modes and contents
    hashes: dict[str, str]  # relative path -> sha256 (hex) of its content
    revision: str  # git short sha, or "" outside git
    dirty: bool

    def release_id(self, now: float | None = None) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
        rev = self.revision or self.digest[:8]
        return f"{stamp}-{rev}" + ("-dirty" if self.dirty else "")

    def tarball(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
            for rel in self.files:
                path = self.root / rel
                info = tar.gettarinfo(str(path), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
        return buf.getvalue()


def _git(root: Path, *args: str, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=text)


def _walk(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS
                             and not (Path(dirpath, d, "pyvenv.cfg")).exists())
        for f in filenames:
            if not f.endswith(SKIP_SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


def _check_shippable(path: Path) -> None:
    """Stop at a file that cannot be shipped, naming it and the fix."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise ProvisionError(f"app source: the file name {ascii(os.fsencode(path))} (shown as bytes) is not "
                             "valid UTF-8; rename it")
    if not path.exists():
        raise ProvisionError(f"app source: {str(path)!r} is a symlink to a missing file "
                             f"({os.readlink(path)!r}); remove it or point it at a file inside the app")


def scan(root: Path, leave_out: Iterable[str] = ()) -> Source:
    """The files of the app in ``root``, but those in ``leave_out`` (relative paths)."""
    root = root.resolve()
    if not root.is_dir():
        raise ProvisionError(f"app source {root} is not a directory; point --source at your app")
    revision, dirty = "", False
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside.returncode == 0 and inside.stdout.strip() == "true":
        listed = _git(root, "ls-files", "-z", "--cached", "--", ".", text=False).stdout.split(b"\0")
        # Named as os.walk names them (bytes that are not UTF-8 as surrogates); deleted files and
        # directories (submodules, links to directories) are left out, dangling links are not.
        files = [os.fsdecode(f) for f in listed if f]
        files = [f for f in files if os.path.lexists(root / f) and not (root / f).is_dir()]
        head = _git(root, "rev-parse", "--short", "HEAD")
        revision = head.stdout.strip() if head.returncode == 0 else ""
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no", "--", ".").stdout.strip())
        if not files:  # untracked app inside some repository: ship the directory
            files = _walk(root)
    else:
        files = _walk(root)
    files = sorted(f for f in files if not any(part in SKIP_DIRS for part in Path(f).parts)
                   and not any(f == x or f.startswith(x + "/") for x in leave_out))
    h, hashes = hashlib.sha256(), {}
    for rel in files:
        path = root / rel
        _check_shippable(path)
        content = hashlib.sha256(path.read_bytes())
        hashes[rel] = content.hexdigest()
        h.update(rel.encode() + b"\0" + (b"x" if os.access(path, os.X_OK) else b"-") + b"\0")
        h.update(content.digest())
    return Source(root=root, files=tuple(files), digest=h.hexdigest(), hashes=hashes, revision=revision, dirty=dirty)
