"""The app's source as a deterministic tarball and a content digest.

In a git checkout the tracked files are shipped (as they are in the working
tree); elsewhere the whole directory minus VCS, caches and virtualenvs.
Symlinks are shipped as symlinks, only when they point inside their tree at
something shipped. Folders and files outside the source (``app.include``: a
monorepo's sibling packages) land in the release under their own name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import ProvisionError

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "env", ".tox", ".mypy_cache",
             ".pytest_cache", "node_modules", ".sandbox"}
SKIP_SUFFIXES = (".pyc", ".pyo")
LINK_TAG = b"symlink\0"  # a link's hash is of this and its target: never a text file's
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



def source_key(s, own: Iterable[Path]) -> tuple:
    """What :func:`scan` reads of the app of settings ``s``: its source, its includes, and of each
    what to leave out (the deploy's ``own`` files lying inside)."""
    own = list(own)
    return s.source, deploy_files(s.source, own), tuple((p, deploy_files(p, own)) for p in s.include)

@dataclass(frozen=True)
class Source:
    root: Path
    files: tuple[str, ...]  # relative paths, sorted
    digest: str  # sha256 over paths, modes and contents (a link's: its target)
    hashes: dict[str, str]  # relative path -> sha256 (hex) of its content (a link's: of LINK_TAG + its target)
    revision: str  # git short sha, or "" outside git
    dirty: bool
    links: dict[str, str] = field(default_factory=dict)  # relative path -> target, of the symlinks shipped
    untracked: tuple[str, ...] = ()  # files git does not track (nor ignore), so not shipped
    included: dict[str, Path] = field(default_factory=dict)  # name in the release -> local path (app.include)

    def path(self, rel: str) -> Path:
        """The local file shipped as ``rel``."""
        top, _, rest = rel.partition("/")
        if top in self.included:
            return self.included[top] / rest if rest else self.included[top]
        return self.root / rel

    def release_id(self, now: float | None = None) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
        rev = self.revision or self.digest[:8]
        return f"{stamp}-{rev}" + ("-dirty" if self.dirty else "")

    def size(self, rel: str) -> int:
        return 0 if rel in self.links else self.path(rel).stat().st_size

    def executable(self, rel: str) -> bool:
        return rel not in self.links and os.access(self.path(rel), os.X_OK)

    def write_tar(self, fileobj, paths: Iterable[str] | None = None, extra: dict[str, bytes] | None = None,
                  compresslevel: int = 6) -> None:
        """A gzipped tar stream of ``paths`` (default: every file), then of ``extra`` (name -> bytes),
        written to ``fileobj`` as it goes: a file of any size costs a buffer, not its size."""
        with gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, compresslevel=compresslevel, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w|") as tar:
            for rel in self.files if paths is None else paths:
                info = tarfile.TarInfo(rel)
                info.uname = info.gname = "root"
                if rel in self.links:
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, self.links[rel], 0o777
                    tar.addfile(info)
                    continue
                path = self.path(rel)
                with open(path, "rb") as fh:
                    info.size = os.fstat(fh.fileno()).st_size
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    sent = _Hashing(fh)
                    try:
                        tar.addfile(info, sent)
                    except OSError:  # shorter than it was a moment ago
                        sent.h.update(b"\0")
                if sent.h.hexdigest() != self.hashes.get(rel, sent.h.hexdigest()):  # what the manifest says it is
                    raise ProvisionError(f"app source: {rel} changed while it was being sent; deploy again once "
                                         "it is saved")
            for name, data in (extra or {}).items():
                info = tarfile.TarInfo(name)
                info.uname = info.gname = "root"
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))

    def tarball(self) -> bytes:
        buf = io.BytesIO()
        self.write_tar(buf)
        return buf.getvalue()


class _Hashing:
    """A file being read, hashed as it goes: what is sent is what the manifest says."""

    def __init__(self, fh):
        self.fh, self.h = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.h.update(data)
        return data


def _git(root: Path, *args: str, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=text)


def _walk(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS
                             and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg")))
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]  # shipped, never walked
        at = os.path.relpath(dirpath, root)
        prefix = "" if at == "." else at + "/"
        out += [prefix + f for f in filenames + links if not f.endswith(SKIP_SUFFIXES)]
    return out


def _check_name(path: Path) -> None:
    """Stop at a file name that cannot be shipped, naming it and the fix."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise ProvisionError(f"app source: the file name {ascii(os.fsencode(path))} (shown as bytes) is not "
                             "valid UTF-8; rename it")


def _check_link(root: Path, rel: str, shipped: set[str]) -> str:
    """A symlink's target, when it may be shipped as a link: relative, pointing inside ``root`` at
    something shipped (on the host the release is its tree). Else one line naming the fix."""
    path = root / rel
    target = os.readlink(path)
    where = f"app source: {str(path)!r} is a symlink to {target!r}"
    inside = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    real = Path(os.path.realpath(path))
    if os.path.isabs(target) or inside == ".." or inside.startswith("../") or not real.is_relative_to(root):
        raise ProvisionError(f"{where}, outside {root}: a release holds links within the app only; point it "
                             "inside with a relative path, or ship that folder with app.include")
    if not real.exists():
        raise ProvisionError(f"app source: {str(path)!r} is a symlink to a missing file ({target!r}); remove it "
                             "or point it at a file inside the app")
    at = str(real.relative_to(root))
    if at != "." and at not in shipped and not any(f.startswith(at + "/") for f in shipped):
        raise ProvisionError(f"{where}, which is not shipped (git does not track it, or provision leaves it "
                             "out); git add it, or point the link at a shipped file")
    return target


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:  # in blocks: a 200 MB file costs a block of memory
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """The sha256 of each file, kept between runs by its stamp (size, modification and change
    times in ns, inode): a file unchanged since the last deploy is not read again (git's index
    does the same). A file modified less than RACY seconds before the scan is not remembered: a
    second change within the same clock tick could keep its stamp. Kept per source folder in
    $XDG_CACHE_HOME/provision (~/.cache); where that cannot be written, nothing is kept."""

    RACY = 2.0
    KEEP_DAYS = 30  # other folders' caches unused that long are removed

    def __init__(self, root: Path, keep: bool = True):
        self.keep = keep  # False: nothing saved (a folder never scanned again, as fab ship's export)
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "provision"
        self.path = base / f"hashes-{hashlib.sha256(os.fsencode(root)).hexdigest()[:16]}.json"
        try:
            self.old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.old = {}
        self.new: dict[str, list] = {}
        self.now = time.time_ns()

    def sha256(self, path: Path) -> str:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = os.fsdecode(path)
        hit = self.old.get(key)
        digest = hit[1] if isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp else _hash_file(path)
        if self.now - max(st.st_mtime_ns, st.st_ctime_ns) > self.RACY * 1e9:
            self.new[key] = [stamp, digest]
        return digest

    def save(self) -> None:
        if not self.keep or self.new == self.old:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.new))
            os.replace(tmp, self.path)
            for old in self.path.parent.glob("hashes-*.json"):
                if time.time() - old.stat().st_mtime > self.KEEP_DAYS * 86400:
                    old.unlink()
        except OSError:
            pass


def _entry(path: Path, link: str | None, cache: HashCache) -> tuple[bytes, str]:
    """What the digest records of a shipped file (its kind: link, executable or not) and its hash."""
    if link is not None:
        return b"l", hashlib.sha256(LINK_TAG + os.fsencode(link)).hexdigest()
    return (b"x" if os.access(path, os.X_OK) else b"-"), cache.sha256(path)


def _listing(root: Path, leave_out: Iterable[str]) -> tuple[list[str], list[str], str, bool]:
    """The files of ``root`` to ship, those git does not track (nor ignore), the git revision and
    whether the checkout has uncommitted changes."""
    revision, dirty, untracked = "", False, []
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside.returncode == 0 and inside.stdout.strip() == "true":
        listed = _git(root, "ls-files", "-z", "--cached", "--", ".", text=False).stdout.split(b"\0")
        # Named as os.walk names them (bytes that are not UTF-8 as surrogates); deleted files and
        # directories (submodules) are left out, symlinks (to directories too) are not.
        files = [os.fsdecode(f) for f in listed if f]
        files = [f for f in files if (root / f).is_symlink() or (root / f).is_file()]
        head = _git(root, "rev-parse", "--short", "HEAD")
        revision = head.stdout.strip() if head.returncode == 0 else ""
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no", "--", ".").stdout.strip())
        if files:
            others = _git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", ".", text=False)
            untracked = [os.fsdecode(f) for f in others.stdout.split(b"\0") if f]
            venvs = tuple(f.removesuffix("pyvenv.cfg") for f in untracked if f.endswith("/pyvenv.cfg"))
            untracked = [f for f in untracked if not f.startswith(venvs)]  # a virtualenv is not the app's
        else:  # untracked app inside some repository: ship the directory
            files = _walk(root)
    else:
        files = _walk(root)
    leave_out = tuple(leave_out)

    def shipped(f: str) -> bool:
        return (not any(part in SKIP_DIRS for part in f.split("/")) and not f.endswith(SKIP_SUFFIXES)
                and not any(f == x or f.startswith(x + "/") for x in leave_out))
    return sorted(filter(shipped, files)), sorted(filter(shipped, untracked)), revision, dirty


def scan(root: Path, leave_out: Iterable[str] = (), include: Iterable[tuple[Path, Iterable[str]]] = (),
         remember: bool = True) -> Source:
    """The files of the app in ``root``, but those in ``leave_out`` (relative paths); with those of
    each ``include`` (a folder or file outside it, and what to leave out of it) under its name.
    ``remember``: keep the files' hashes for the next scan of ``root`` (not for a temporary folder)."""
    root = root.resolve()
    if not root.is_dir():
        raise ProvisionError(f"app source {root} is not a directory; point --source at your app")
    include = [(Path(p).resolve(), tuple(out)) for p, out in include]
    # a link of the app's standing for an included folder (a monorepo's `common -> ../libs/common`):
    # the folder itself takes its place
    leave_out = [*leave_out, *(p.name for p, _ in include if (root / p.name).is_symlink())]
    files, untracked, revision, dirty = _listing(root, leave_out)
    trees = [("", root, files, untracked)]
    for path, out in include:
        if path.is_dir():
            inc_files, inc_untracked, _, inc_dirty = _listing(path, out)
            dirty = dirty or inc_dirty
            trees.append((path.name + "/", path, inc_files, inc_untracked))
        else:
            trees.append(("", path.parent, [path.name], []))
    local, links, untracked = {}, {}, []
    for prefix, top, names, others in trees:
        shipped = set(names)
        for rel in names:
            path = local[prefix + rel] = top / rel
            _check_name(path)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                links[prefix + rel] = _check_link(top, rel, shipped)
            elif not stat.S_ISREG(mode):
                raise ProvisionError(f"app source: {str(path)!r} is not a regular file; remove it")
        untracked += [prefix + rel for rel in others]
    h, hashes, cache = hashlib.sha256(), {}, HashCache(root, keep=remember)
    for rel in sorted(local):
        kind, hashes[rel] = _entry(local[rel], links.get(rel), cache)
        h.update(rel.encode() + b"\0" + kind + b"\0")
        h.update(bytes.fromhex(hashes[rel]))
    cache.save()
    return Source(root=root, files=tuple(sorted(local)), digest=h.hexdigest(), hashes=hashes, revision=revision,
                  dirty=dirty, links=links, untracked=tuple(untracked), included={p.name: p for p, _ in include})


def untracked_note(source: Source, shown: int = 3) -> str | None:
    """One line counting the files git does not track (nor ignore), which a release does not hold."""
    n = len(source.untracked)
    if not n:
        return None
    names = ", ".join(source.untracked[:shown]) + (", ..." if n > shown else "")
    them = "them" if n > 1 else "it"
    return f"{n} untracked file{'s' if n > 1 else ''} not shipped: {names} (git add {them} to ship {them})"
