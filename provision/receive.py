"""A push's deploy, on the host: the program the app's pre-receive hook runs as root
(``layout.PUSH_PROGRAM``; see provision/push.py), the pushed commit's tree as a tar on stdin.

It unpacks the tree into a fresh folder under ``layout.PUSH_TMP`` (root's alone; removed
whatever happens, a stale one by the next push), reads ``app:`` from the tree's fabric.yaml (as
fab does), layers the settings `fab git.setup` recorded for this host over it, refuses any path of
those settings or link of the tree that leads out of the tree (root reads only what the push
carries), and runs the same deploy as `fab deploy` (provision.app.Deploy, the runner, the deploy
lock) against the host itself through provision.local, with git's hook environment dropped and
``/`` as the current folder. Its lines go to stdout as they come (the pusher sees them as
``remote: ...``); it exits non-zero when the deploy fails, which rejects the push.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import config as cfg
from . import secrets
from .app import Deploy, proxy_env
from .errors import ProvisionError
from .layout import (PUSH_LANDING_SECONDS, PUSH_STALE_SECONDS, PUSH_TMP, PUSH_WORK_PREFIX, Layout, push_ca_file,
                     push_landed, push_lock, push_tree)
from .local import Local
from .lock import Lock
from .output import Printer, summary_line
from .push import host_raw
from .render import NAMES as TEMPLATES
from .runner import run_steps
from .source import PROJECT_FILES, scan, source_key

CONFIG_FILES = ("fabric.yaml", "fabric.yml")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the deploy's, whoever pushed


def project_app(tree: Path, short: str) -> dict:
    """``app:`` of the tree's fabric.yaml, read as invoke reads it (yaml.safe_load)."""
    from invoke.util import yaml
    path = next((tree / n for n in CONFIG_FILES if (tree / n).is_file()), None)
    if path is None:
        raise ProvisionError(f"commit {short} has no fabric.yaml at the top of the repository; commit one with "
                             "the app's settings (`python -m provision init` writes it)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path.name} of commit {short}" + (f", line {mark.line + 1}" if mark else "")
        raise ProvisionError(f"{where}: {' '.join(str(getattr(e, 'problem', None) or e).split())}; fix the YAML "
                             "and push again")
    app = data.get("app") if isinstance(data, dict) else None
    if app is None:
        app = {}
    if not hasattr(app, "keys"):
        raise ProvisionError(f"`app` in {path.name} of commit {short} must be a mapping of settings (name: value "
                             f"lines), not a {type(app).__name__}; fix it and push again")
    return dict(app)


def escaping_link(tree: Path, short: str) -> None:
    """Refuse a tree holding a link that leads out of it (fabric.yaml, a templates folder, an
    include...): root would read, on the pusher's say, what another user may write."""
    top = tree.resolve()
    for dirpath, dirnames, filenames in os.walk(top):
        for n in (*dirnames, *filenames):
            path = Path(dirpath, n)
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(top):
                raise ProvisionError(f"commit {short}: {path.relative_to(top)} is a link leading out of the "
                                     f"repository ({os.readlink(path)}); a push deploys only what it carries: "
                                     "commit the file itself, or deploy with fab deploy")


def contained_raw(raw: dict, tree: Path, short: str, ca_from_tree: bool) -> None:
    """:func:`contained` on the raw settings, before building them reads the files they name."""
    top = tree.resolve()
    source = top / str(raw.get("source") or ".")
    paths = [("source", source), ("templates", top / str(raw.get("templates") or "templates"))]
    if ca_from_tree and raw.get("ca_bundle"):
        paths.append(("ca_bundle", top / str(raw["ca_bundle"])))
    if raw.get("checks"):
        paths.append(("checks", source / str(raw["checks"])))
    paths += [("include", source / p) for p in cfg._list("include", raw.get("include") or [])]
    for key, path in paths:
        if not Path(os.path.realpath(path)).is_relative_to(top):
            raise ProvisionError(f"app.{key} of commit {short} leads out of the repository ({raw.get(key)}); on the "
                                 "host a push deploys only what it carries: keep it inside the repository, or deploy "
                                 "with fab deploy")


def contained(s: cfg.Settings, tree: Path, short: str, ca_from_tree: bool) -> None:
    """Refuse settings naming paths outside the pushed tree (``../..`` of the tree is a folder of
    the host, not of the pusher's checkout): source, include, templates, checks, ca_bundle."""
    top = tree.resolve()
    paths = [("source", s.source), *(("include", p) for p in s.include), ("templates", s.templates),
             ("checks", s.checks), *((("ca_bundle", s.ca_bundle),) if ca_from_tree and s.ca_bundle else ())]
    for key, path in paths:
        if not Path(os.path.realpath(path)).is_relative_to(top):
            raise ProvisionError(f"app.{key} of commit {short} leads out of the repository ({path}); on the host a "
                                 "push deploys only what it carries: keep it inside the repository, or deploy with "
                                 "fab deploy")


def deploy(rec: dict, tar, sha: str, branch: str, pusher: str, work: Path, printer: Printer) -> int:
    """Deploy the tree read from ``tar`` (commit ``sha``), unpacked under ``work``."""
    short, label = sha[:7], rec.get("label") or rec["app"]
    tree = Path(push_tree(str(work)))
    tree.mkdir()
    untar = subprocess.run(["tar", "-x", "--no-same-owner", "-f", "-", "-C", str(tree)], stdin=tar,
                           capture_output=True, text=True)
    if untar.returncode != 0:
        raise ProvisionError(f"cannot unpack commit {short}: {untar.stderr.strip()[-300:]}")
    ca_file = None
    if rec.get("ca_bundle"):
        ca_file = Path(push_ca_file(str(work)))
        ca_file.write_text(rec["ca_bundle"])
    escaping_link(tree, short)
    raw = host_raw(project_app(tree, short), rec, str(ca_file) if ca_file else None)
    contained_raw(raw, tree, short, ca_file is None)  # before build reads any file
    s = cfg.build(raw, tree)
    contained(s, tree, short, ca_file is None)
    if s.name != rec["app"]:
        raise ProvisionError(f"fabric.yaml of commit {short} names the app {s.name!r}, but this repository deploys "
                             f"{rec['app']!r}; push {s.name} to its own repository (fab git.setup)")
    own = [*(tree / f for f in PROJECT_FILES), *(s.templates / n for n in TEMPLATES)]
    source = scan(*source_key(s, own))
    source = dataclasses.replace(source, revision=short, dirty=False, untracked=())
    rid = source.release_id()
    host = socket.gethostname()
    origin = {"commit": sha, "via": "push", "branch": branch, "pusher": pusher}
    holder = {"user": pusher, "machine": f"{host} (git push)", "action": "deploy", "release": rid,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    printer.line(f"{label}: deploying commit {short} of {branch} as release {rid}")
    r = run_steps(Local(label), Deploy(s, source, rid, f"{pusher}@{host} (git push)", origin), printer=printer,
                  env=proxy_env(s), lock=Lock(s.layout, holder))
    printer.line(summary_line(r, False))
    if r.failed:
        printer.line(f"{label}: push refused: commit {short} is not deployed, {branch} stays where it was")
        return 1
    return 0


def settings_record(app: str) -> dict:
    """What `fab git.setup` recorded for ``app`` on this host, checked for shape."""
    try:
        rec = json.loads(Path(Layout(app).push_settings).read_text())
    except (OSError, ValueError) as e:
        raise ProvisionError(f"cannot read this host's settings of {app} ({e}); run fab git.setup again")
    if not isinstance(rec, dict) or rec.get("app") != app or not isinstance(rec.get("vars") or {}, dict) \
            or not isinstance(rec.get("ca_bundle") or "", str):
        raise ProvisionError(f"this host's settings of {app} ({Layout(app).push_settings}) are not as "
                             "fab git.setup writes them; run fab git.setup again")
    return rec


def clean_environment() -> None:
    """What the deploy's commands inherit: none of git's hook variables (GIT_DIR, the quarantine's
    object folders, push options...), a fixed PATH, ``/`` as the current folder (not the pusher's
    repository)."""
    for k in [k for k in os.environ if k.startswith("GIT_")]:
        del os.environ[k]
    os.environ["PATH"] = SAFE_PATH
    os.chdir("/")


def work_folder(base: str | None = None) -> Path:
    """A fresh folder for this push under ``base`` (root's alone, made so when missing; refused if
    it is a link or another's), after removing the folders of pushes that died (older than
    ``PUSH_STALE_SECONDS``, their receive gone)."""
    base = base or PUSH_TMP
    os.makedirs(base, mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ProvisionError(f"{base} must be a folder of root's alone (mode 700); remove it and run fab git.setup again")
    now = time.time()
    for entry in os.scandir(base):
        if not entry.name.startswith(PUSH_WORK_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        pid = entry.name[len(PUSH_WORK_PREFIX):].split("-", 1)[0]
        if now - entry.stat(follow_symlinks=False).st_mtime > PUSH_STALE_SECONDS and not alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{PUSH_WORK_PREFIX}{os.getpid()}-", dir=base))  # 0700


def alive(pid: str) -> bool:
    """Whether process ``pid`` runs (a folder's receive, named in it)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def one_push(app: str, branch: str, old: str, base: str | None = None):
    """Hold ``app``'s push lock (one receive at a time, refused when another holds it), then refuse
    a push that began before the previous push's commit landed on ``branch``: the hook compared
    ``old`` with the branch, but git names the new commit only after the previous receive exited,
    so within ``PUSH_LANDING_SECONDS`` of it the commit it deployed must be ``old``. Yields a
    function recording the commit this push deployed."""
    fd = os.open(push_lock(app, base), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProvisionError(f"another push of {app} is deploying on this host; push again when it ends", code=1)
        landed = Path(push_landed(app, base))
        try:
            sha, when = landed.read_text().strip(), landed.lstat().st_mtime
        except OSError:
            sha, when = "", 0.0
        if old and sha and sha != old and time.time() - when < PUSH_LANDING_SECONDS:
            raise ProvisionError(f"{branch} moved on the host (to {sha[:7]}) while you pushed; fetch and push again",
                                 code=1)

        def record(commit: str) -> None:
            tmp = landed.with_name(landed.name + ".new")
            tmp.unlink(missing_ok=True)
            tmp.write_text(commit + "\n")
            os.replace(tmp, landed)
        yield record
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="provision-receive", description=__doc__.splitlines()[0])
    ap.add_argument("--app", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--branch", required=True)
    ap.add_argument("--old", default="")  # the branch's value the push started from (checked by the hook, and here)
    args = ap.parse_args(argv)
    printer = Printer(stream=sys.stdout)
    for sig in (signal.SIGHUP, signal.SIGTERM):  # the push went away: the temporary tree goes too (finally)
        signal.signal(sig, lambda n, _: sys.exit(128 + n))
    if os.geteuid() != 0:
        printer.error("the push's deploy runs as root (the hook runs it through sudo -n); check the hook")
        return 2
    if cfg.name_problem(args.app):
        printer.error(f"bad app name {args.app!r}")
        return 2
    work = None
    pusher = os.environ.get("SUDO_USER") or "root"
    try:
        clean_environment()
        rec = settings_record(args.app)
        secrets.remember(cfg.secret_values(rec.get("vars") or {}))
        work = work_folder()
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # the source's hash cache: nothing kept in root's home
        # the tree is not a checkout: git, asked by the source scan, never looks for one above it
        os.environ["GIT_CEILING_DIRECTORIES"] = str(work)
        with one_push(args.app, args.branch, args.old, PUSH_TMP) as landed:
            rc = deploy(rec, sys.stdin.buffer, args.commit, args.branch, pusher, work, printer)
            if rc == 0:
                landed(args.commit)
            return rc
    except ProvisionError as e:
        printer.error(str(e))
        return e.code
    except KeyboardInterrupt:
        printer.error("interrupted")
        return 130
    except BrokenPipeError:  # the pusher went away: the deploy stopped after its step, as when fab is interrupted
        return 141
    except Exception as e:  # noqa: BLE001 -- a bug or the host's trouble: one line, never a traceback
        printer.error(f"the push's deploy failed unexpectedly: {type(e).__name__}: {' '.join(str(e).split())}")
        return 1
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
