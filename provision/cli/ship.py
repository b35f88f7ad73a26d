"""``fab -H HOST ship``: the commit being shipped, tested in a clean export of it, deployed only
when its tests pass, and exactly the tree they passed on.

1. Everything a deploy validates is validated first (inventory, settings, source, templates), and
   the repository holding the app must be clean (``--allow-dirty``: its tracked files as they are).
2. The commit (``git read-tree`` + ``git checkout-index``) is exported into a temporary folder: the release is made from
   that export (the deploy's file rules, its revision the commit's), and a copy of it runs the tests.
3. The tests (``app.test_command``, default ``python -m pytest`` when the app has tests) run locally
   in a virtualenv of the app's own requirements (cached in ~/.cache/provision/test-venvs), their
   output shown as it comes. A failure ends the run, exit 1, before any connection is opened.
4. The plans made in 1 (hosts, settings, templates: the commit's) are deployed, nothing read again,
   as ``fab deploy`` deploys (one host, or a fleet's transaction), its
   origin (commit, tests, duration) in the release's meta and the release log.
"""

from __future__ import annotations

import contextlib
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from .. import secrets, ship
from ..config import Settings
from ..errors import ProvisionError
from ..hosts import jobs, targets
from ..output import Printer
from ..render import NAMES as TEMPLATES
from ..requirements import FROM_PYPROJECT, read_tree
from ..source import Source, scan, source_key, untracked_note
from . import guarded
from .apply import own_files, plan_hosts, run_apply

VENVS = "test-venvs"  # in ~/.cache/provision: the test virtualenvs, each a link <key> to its folder
KEEP_DAYS = 30  # a test virtualenv no ship used for that long is removed


def git(repository: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repository), *args], capture_output=True)
    except FileNotFoundError:
        raise ProvisionError("fab ship ships a git commit, and git is not installed here; install git, or deploy "
                             "the directory as it is with fab deploy")


def repository(source: Path) -> Path:
    """The git repository holding the app, with its commit (HEAD)."""
    top = git(source, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        said = [line.strip() for line in top.stderr.decode(errors="replace").splitlines() if line.strip()]
        if said and "not a git repository" not in said[0]:  # another refusal (dubious ownership, ...): git's own words
            why = said[0] + (f"; {said[-1]}" if len(said) > 1 else "")
            raise ProvisionError(f"git cannot use the repository holding {source}: {why}")
        raise ProvisionError(f"{source} is not in a git repository: fab ship ships a commit (tested in a clean "
                             "export of it); fab deploy deploys a directory as it is")
    return Path(os.fsdecode(top.stdout.strip())).resolve()


def head(repo: Path) -> str:
    sha = git(repo, "rev-parse", "--verify", "-q", "HEAD^{commit}")
    if sha.returncode != 0:
        raise ProvisionError(f"{repo} has no commit yet: commit the app, then fab ship ships that commit")
    return sha.stdout.decode().strip()


def export(repo: Path, commit: str, tree: Path, index: Path | None = None) -> None:
    """The commit's files into ``tree``, exactly as a checkout of it makes them (its smudge filters
    and line endings apply; not the ``export-ignore`` / ``export-subst`` attributes ``git archive``
    would: those are for archives, and could hide the tests or change what is deployed): its tree
    read into an index of its own (``index``, beside ``tree``), then checked out under ``tree``; each
    submodule at the commit it records, from its checkout here."""
    index = index or tree.parent / "export.index"
    tree.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GIT_INDEX_FILE=str(index))
    for args in (["read-tree", commit], ["checkout-index", "-a", f"--prefix={tree}/"]):
        done = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True)
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip()
            raise ProvisionError(f"cannot export commit {commit[:7]} of {repo}: {why.splitlines()[-1] if why else '?'}")
    index.unlink()
    for rel, sha in submodules(git(repo, "ls-tree", "-r", "-z", commit).stdout):
        export(submodule(repo, rel, sha), sha, tree / rel, index)


def submodules(listing: bytes) -> list[tuple[str, str]]:
    """The submodules (path, commit) among ``git ls-tree -r -z`` or ``git ls-files -s -z``'s entries."""
    out = []
    for entry in listing.split(b"\0"):
        meta, _, name = entry.partition(b"\t")
        fields = meta.split()
        if fields and fields[0] == b"160000":
            out.append((os.fsdecode(name), next(f for f in fields[1:] if len(f) >= 40).decode()))
    return out


def submodule(repo: Path, rel: str, sha: str) -> Path:
    """The checkout of ``repo``'s submodule ``rel``, which must hold its commit ``sha``."""
    path = repo / rel
    top = git(path, "rev-parse", "--show-toplevel") if path.is_dir() else None
    if (top is None or top.returncode != 0 or Path(os.fsdecode(top.stdout.strip())).resolve() != path.resolve()
            or git(path, "cat-file", "-e", f"{sha}^{{commit}}").returncode != 0):
        raise ProvisionError(f"submodule {rel} of {repo} (commit {sha[:7]}) is not checked out here, and fab ship "
                             "ships it at that commit: git submodule update --init --recursive, then ship")
    return path


def copy_tracked(repo: Path, tree: Path) -> None:
    """The repository's tracked files as they are in the working tree (``--allow-dirty``), into ``tree``;
    its submodules' too, as they are in theirs."""
    tree.mkdir(parents=True, exist_ok=True)
    listing = git(repo, "ls-files", "-z", "--cached", "-s").stdout
    links, seen = dict(submodules(listing)), set()
    for entry in listing.split(b"\0"):
        rel = os.fsdecode(entry.partition(b"\t")[2])
        src, dest = repo / rel, tree / rel
        if rel in seen:  # a conflict's stages: the working tree's file once
            continue
        seen.add(rel)
        if rel in links:
            submodule(repo, rel, git(src, "rev-parse", "HEAD").stdout.decode().strip() or links[rel])
            copy_tracked(src, dest)
            continue
        if not rel or not (src.is_symlink() or src.is_file()):  # deleted
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dest)
        else:
            shutil.copy2(src, dest)


def remove(path: Path) -> None:
    """A temporary folder, whatever the tests left in it (read-only folders included)."""
    for top, dirs, _ in os.walk(path):
        for d in dirs:
            if not os.path.islink(os.path.join(top, d)):
                os.chmod(os.path.join(top, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def the_app(work: list) -> Settings:
    """The one app the selection ships: its tests run once, for every host."""
    first = work[0].settings
    for job in work[1:]:
        s = job.settings
        for key in ("source", "include", "requirements", "test_command"):
            if getattr(s, key) != getattr(first, key):
                raise ProvisionError(f"fab ship tests one app for all its hosts, and {work[0].target.alias} and "
                                     f"{job.target.alias} differ in app.{key}; ship them separately")
    return first


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "provision" / VENVS


def pip_problem(output: bytes) -> str:
    lines = [l.strip() for l in output.decode(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def test_venv(s: Settings, pytest: bool, printer: Printer, app: Path, scratch: Path) -> Path:
    """The test virtualenv: the app's requirements (its own files: those of the export), those of a
    requirements-dev.txt / requirements-test.txt beside them, and pytest when the command runs
    it (``pytest``: the default, say) and none of them names it. Built once per key with the python
    running fab, in a folder of its own that a link named after the key publishes when complete.
    pip reads them in ``app``, the app's folder in the tests' copy (never the release's tree, which
    it would write into); requirements from local paths, editable or VCS ones get a virtualenv of
    this run alone, in ``scratch``: a cached one would test what they were at its first ship."""
    deps = s.dependencies
    files = dict(deps.files)
    dev = []
    for name in ship.DEV_REQUIREMENTS:
        path = deps.origin.parent / name
        if path.is_file():
            dev.append(str(path.relative_to(s.source)))
            files.update(read_tree(s.source, dev[-1])[0])
    added = ("pytest",) if pytest and "pytest" not in ship.requirement_names(files.items()) else ()
    python = f"{platform.python_implementation()} {platform.python_version()} {os.path.realpath(sys.executable)}"
    key = ship.venv_key(sorted(files.items()), python, added)
    local = ship.uncached(sorted(files.items()))
    if local:
        link = scratch / "venv"
        printer.line(f"ship: the requirements install from a path, in editable mode or from VCS ({local}): "
                     "a test virtualenv for this run alone, not cached")
    else:
        link = cache_dir() / key
    if (link / "bin" / "python").exists():
        printer.line(f"ship: test virtualenv {key} (cached, {link})")
        os.utime(link.resolve())  # in use: kept by prune()
        return link.resolve()
    if link.is_symlink():  # its folder removed by hand: built again
        link.unlink()
    what = ", ".join([deps.main, *dev, *added])
    printer.line(f"ship: building the test virtualenv {key} (python {platform.python_version()}: {what}) ...")
    t0 = time.monotonic()
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=link.parent))
    except OSError as e:
        cache = os.environ.get("XDG_CACHE_HOME")
        raise ProvisionError(f"cannot make the test virtualenv's folder in {link.parent}: {e.strerror}; "
                             f"{'XDG_CACHE_HOME is ' + repr(cache) if cache else 'XDG_CACHE_HOME is not set (~/.cache)'}: "
                             "point XDG_CACHE_HOME at a folder you can write") from None
    try:
        made = subprocess.run([sys.executable, "-m", "venv", str(build)], capture_output=True)
        if made.returncode != 0:
            raise ProvisionError(f"the test virtualenv could not be made ({sys.executable} -m venv): "
                                 f"{pip_problem(made.stdout + made.stderr)}; nothing deployed", code=1)
        main = app / deps.main
        if deps.main == FROM_PYPROJECT:  # pyproject.toml's dependencies, as a requirements file
            main = build / FROM_PYPROJECT
            main.write_bytes(files[FROM_PYPROJECT])
        for args, named in (([ "-r", str(main)], deps.main),
                            ([a for d in dev for a in ("-r", d)] + list(added), ", ".join([*dev, *added]))):
            if not args:
                continue
            pip = subprocess.run([str(build / "bin" / "python"), "-m", "pip", "install", "-q",
                                  "--disable-pip-version-check", *args], cwd=app, capture_output=True)
            if pip.returncode != 0:
                raise ProvisionError(f"the test virtualenv could not be built: pip install {named} failed: "
                                     f"{pip_problem(pip.stdout + pip.stderr)}; fix the app's requirements "
                                     "(nothing deployed)", code=1)
        try:
            os.symlink(build.name, link)  # complete: published at once, or another ship's was first
        except FileExistsError:
            remove(build)
    except BaseException:
        remove(build)
        raise
    printer.line(f"ship: test virtualenv built in {time.monotonic() - t0:.1f}s")
    if not local:
        prune(link.parent)
    return link.resolve()


def prune(base: Path, now: float | None = None) -> None:
    """Test virtualenvs no ship used for KEEP_DAYS go, with their links; so do folders no link
    publishes a day after they were begun (a build killed half-way)."""
    now = time.time() if now is None else now
    published = {os.readlink(p) for p in base.iterdir() if p.is_symlink()}
    for p in base.iterdir():
        if p.is_symlink():
            target = base / os.readlink(p)
            if not target.is_dir() or now - target.stat().st_mtime > KEEP_DAYS * 86400:
                p.unlink()
                remove(target)
        elif p.is_dir() and p.name not in published and now - p.stat().st_mtime > 86400:
            remove(p)


def run_tests(command: str, cwd: Path, venv: Path) -> tuple[int, float, str]:
    """The tests' exit status, duration and output's end; their output shown as it comes. They run
    in a process group of their own, which goes with them: whatever they left running when they
    exit, and all of it when fab is interrupted (Ctrl-C, or a SIGTERM or SIGHUP: see :func:`interrupting`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "__PYVENV_LAUNCHER__")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}")
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    t0 = time.monotonic()
    tail, proc = b"", None
    # interrupted at any point once it started (a signal may come at once: the tests' own kill, a
    # cancel), its group goes with it
    with interrupting():
        try:
            with held():  # a signal while it starts is for once it has started: its group then goes too
                proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            os.set_blocking(proc.stdout.fileno(), False)
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    if not sel.select(timeout=0.2):
                        if proc.poll() is not None:  # it ended; something it started may hold its output open
                            break
                        continue
                    try:
                        chunk = os.read(proc.stdout.fileno(), 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:  # the end of its output
                        break
                    if out is not None:
                        out.write(chunk)
                        out.flush()
                    else:
                        sys.stdout.write(chunk.decode(errors="replace"))
                    tail = (tail + chunk)[-65536:]
            code = proc.wait()
        finally:
            if proc is not None:
                stop_group(proc)
                proc.stdout.close()
    return code, time.monotonic() - t0, tail.decode(errors="replace")


_HELD: list = []  # while :func:`held`: [the signal that came, or None]


def _interrupt(signum, frame):
    if _HELD:
        _HELD[-1] = signum
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def held():
    """An interruption (:func:`interrupting`) that comes inside waits for its end: a process is
    started inside, and once the handle exists that stops it."""
    _HELD.append(None)
    try:
        yield
    finally:
        if _HELD.pop() is not None:
            raise KeyboardInterrupt


@contextlib.contextmanager
def interrupting():
    """SIGTERM (a CI's cancel) and SIGHUP (a closed terminal or SSH session) end what runs inside
    as Ctrl-C (SIGINT) does: a KeyboardInterrupt, so the tests' process group is stopped, the temporary
    folder removed, and fab exits 130. Python's default would end fab at once, leaving both.
    Signal handlers are the main thread's: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """What is left of the test command's process group: TERM, then KILL after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        proc.poll()  # the shell reaped: a zombie would keep the group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


EMPTY_JUNIT = ('<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="ship" tests="0" errors="0" '
               'failures="0" skipped="0" time="0"/></testsuites>\n')


def release_tree(c, s: Settings, flags: dict, selected: list, repo: Path, commit: str, dirty: list[str], tree: Path,
                 printer: Printer) -> tuple[list, Settings, Source]:
    """The tree to ship, made in ``tree`` (the commit's export; with ``dirty``, the tracked files as
    they are); every host's job with settings read from it (``selected``: the hosts, the inventory
    read once), the app's templates too when they lie in the repository; and its files by a deploy's
    rules (the deploy's own files left out wherever they lie in it), named after the commit."""
    if dirty:
        copy_tracked(repo, tree)
        printer.line(f"ship: --allow-dirty: shipping the working tree as it is, uncommitted changes included "
                     f"({', '.join(dirty[:ship.SHOWN])}{', ...' if len(dirty) > ship.SHOWN else ''}), on "
                     f"{commit[:7]}; recorded as dirty")
        note = untracked_note(scan(*source_key(s, own_files(c, s))))
        if note:
            printer.line(f"ship: {note}")
    else:
        export(repo, commit, tree)
    flags = dict(flags, source=str(ship.in_tree(s.source, repo, tree)))
    templates = ship.in_tree(s.templates, repo, tree)
    if templates is not None:  # the templates of the commit, as they were checked: not the working tree's
        for name in TEMPLATES:
            if (s.templates / name).is_file() and not (templates / name).is_file():
                raise ProvisionError(f"template {s.templates / name} is not in commit {commit[:7]} (git does not track "
                                     "it), and fab ship deploys the commit's: commit it, or deploy with fab deploy")
        flags["templates"] = str(templates)
    try:
        work = jobs(c, flags, selected)  # the settings again, read from the export (requirements, include, ...)
        es = the_app(work)
    except ProvisionError as e:
        raise ProvisionError(f"in the export of commit {commit[:7]}: {e}", e.code) from None
    own = [p for p in (ship.in_tree(f, repo, tree) for f in own_files(c, s)) if p is not None]
    return work, es, replace(scan(*source_key(es, own), remember=False), revision=commit[:7], dirty=bool(dirty))


def test_command(s: Settings, source: Source, tree: Path) -> str:
    """``app.test_command``; else the default when the app has tests (its smoke checks aside):
    ``python manage.py test`` for an app with ``manage.py`` and no pytest configuration, else
    pytest; else "". Tests outside the app's folder (beside it or above, in ``tree``, the export)
    are refused: the default would not run them."""
    if s.test_command:
        return s.test_command
    checks = str(s.checks.relative_to(s.source)) if s.checks.is_relative_to(s.source) else None
    files = [f for f in source.files if f.split("/")[0] not in source.included]
    read = lambda f: (s.source / f).read_text(errors="replace")  # noqa: E731
    found = ship.has_tests(files, read, checks)
    if not found:
        folders = [("" if d == tree else str(d.relative_to(tree)), sorted(
                       f"{p.name}/" if p.is_dir() else p.name for p in d.iterdir() if p != s.source))
                   for d in s.source.parents if d.is_relative_to(tree)]
        above = ship.tests_above(folders, lambda f: (tree / f).read_text(errors="replace"))
        if above:
            raise ProvisionError(f"tests found at {above}, outside the app's folder "
                                 f"{s.source.relative_to(tree)}, and fab ship would not run them: set "
                                 "app.test_command to the command that does (it runs in the app's folder of the "
                                 "commit's export, e.g. cd .. && python -m pytest)")
        return ""
    checks = checks if checks and any(f.startswith(checks + "/") for f in files) else None
    return ship.default_command(checks, django="manage.py" in files and not ship.pytest_config(files, read))


def tested(s: Settings, command: str, report: Path | None, tree: Path, tmp: Path, commit: str, dirty: bool,
           printer: Printer) -> tuple[str, float, int | None]:
    """The tests run on a copy of ``tree``: (result, seconds, count); a failure is the run's end (exit 1).
    The command is shown with its secrets masked (``ship.masked_command``), which every later line masks too."""
    rev = f"commit {commit[:7]}" + (" with uncommitted changes" if dirty else "")
    secrets.remember(ship.remembered_secrets(command))
    if not command:
        printer.line(f"ship: {rev}: no tests found (no tests/ folder, test_*.py or tests.py file or pytest configuration) "
                     "and no app.test_command: deploying it untested")
        if report is not None:
            report.write_text(EMPTY_JUNIT)
        return "none", 0.0, None
    line = ship.command_line(command, str(report) if report else None)
    copy = tmp / "test"
    shutil.copytree(tree, copy, symlinks=True)
    app = copy / s.source.relative_to(tree)
    venv = test_venv(s, ship.is_pytest(command), printer, app, tmp)
    printer.line(f"ship: testing {rev} in {'a copy' if dirty else 'a clean export'}: {ship.masked_command(line)}")
    code, seconds, tail = run_tests(line, app, venv)
    count = ship.pytest_count(tail) if ship.is_pytest(command) else None
    counted = f", {count} test{'s' if count != 1 else ''}" if count is not None else ""
    if code != 0:
        what = "pytest collected no tests" if code == ship.PYTEST_NO_TESTS and ship.is_pytest(command) else "tests failed"
        raise ProvisionError(f"{what} (exit {code} after {seconds:.1f}s{counted}: {ship.masked_command(command)}): "
                             "nothing deployed, "
                             "no host touched", code=1)
    printer.line(f"ship: tests passed in {seconds:.1f}s{counted}; deploying {rev}")
    return "passed", seconds, count


@guarded
def run_ship(c, flags: dict, *, allow_dirty: bool = False, junit: str | None = None, verbose: bool = False,
             json_file: str | None = None, break_lock: bool = False, fleet: dict | None = None,
             atomic: bool = True) -> None:
    with interrupting():  # from its first step to its last (a hangup, a CI's cancel: exit 130, nothing left)
        ship_it(c, flags, allow_dirty=allow_dirty, junit=junit, verbose=verbose, json_file=json_file,
                break_lock=break_lock, fleet=fleet, atomic=atomic)


def ship_it(c, flags: dict, *, allow_dirty: bool, junit: str | None, verbose: bool, json_file: str | None,
            break_lock: bool, fleet: dict | None, atomic: bool) -> None:
    printer = Printer(verbose=verbose)
    selected = targets(c)  # the inventory, read once: the deploy goes to the hosts checked before the tests
    s = the_app(jobs(c, flags, selected))  # inventory and settings, as a deploy reads them
    repo = repository(s.source)
    commit = head(repo)
    dirty = ship.dirty_paths(git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=normal").stdout)
    report = Path(junit).resolve() if junit else None
    if report is not None and report.is_relative_to(repo):  # the last ship's report: not a change of the app
        dirty = [p for p in dirty if p != str(report.relative_to(repo))]
    if dirty and not allow_dirty:
        raise ProvisionError(ship.dirty_refusal(dirty, repo))
    for p in s.include:
        if ship.in_tree(p, repo, repo) is None:
            raise ProvisionError(f"app.include {p} lies outside the git repository {repo}, and fab ship ships one "
                                 "commit of it: move it into the repository, or deploy with fab deploy")
    if report is not None and not report.parent.is_dir():
        raise ProvisionError(f"--junit {junit}: no folder {report.parent}; create it or name another file")
    tmp = Path(tempfile.mkdtemp(prefix="provision-ship-")).resolve()
    try:
        tree = tmp / "release"
        work, es, source = release_tree(c, s, flags, selected, repo, commit, dirty, tree, printer)
        # every host's plan made now, once: a bad template or setting stops before the tests run, and
        # what is deployed after them is exactly what was checked (nothing is read again from disk);
        # the origin gets the tests' result once they pass (the meta and the log are written from it)
        origin = {"commit": commit, "via": "ship"}
        plans, _ = plan_hosts(c, flags, source=source, origin=origin, work=work)
        command = test_command(es, source, tree)
        result, seconds, count = tested(es, command, report, tree, tmp, commit, bool(dirty), printer)
        origin.update(ship.ship_origin(commit, result, seconds, ship.masked_command(command), count, bool(dirty)))
        run_apply(c, flags, verbose=verbose, json_file=json_file, break_lock=break_lock, fleet=fleet, atomic=atomic,
                  plans=plans)
    finally:
        remove(tmp)
