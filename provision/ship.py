"""``fab ship``'s decisions, pure: is the working tree clean, where a path lies in the commit's
export, does the app have tests (in its folder, or above it), the test command line (with
``--junit``) and its secrets masked, the test virtualenv's key and whether it may be cached, and
what a test run says. :mod:`provision.cli.ship` does the git, the virtualenv, the test
run and the deploy.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from .errors import ProvisionError
from .secrets import MASK
from .requirements import logical_lines, requirement_name

DEFAULT_TEST_COMMAND = "python -m pytest"
DJANGO_TEST_COMMAND = "python manage.py test"  # an app with manage.py and no pytest configuration
DEV_REQUIREMENTS = ("requirements-dev.txt", "requirements-test.txt")  # read beside app.requirements
JUNIT = "{junit}"  # where a test_command that is not pytest's takes the --junit file
SHOWN = 3  # dirty paths named in the refusal
TEST_DIRS = {"tests", "test"}
TEST_FILE_RE = re.compile(r"test_.*\.py|.*_test\.py|tests\.py")  # tests.py: Django's
# pytest's own configuration: the file, and the section that makes a shared file one
PYTEST_CONFIG = {"pytest.ini": None, "pyproject.toml": "[tool.pytest.ini_options]", "setup.cfg": "[tool:pytest]",
                 "tox.ini": "[pytest]"}
SHELL_RE = re.compile(r"[;&|<>`$()\n]")  # a command line that is more than one simple command
PYTEST_NO_TESTS = 5  # pytest's exit status when it collected no test
PYTEST_SUMMARY_RE = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")


def dirty_paths(porcelain: bytes) -> list[str]:
    """The paths ``git status --porcelain -z`` names (changed, staged, untracked), in its order; a
    rename's new name only."""
    out, entries = [], porcelain.split(b"\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        out.append(entry[3:].decode("utf-8", "replace"))
        if entry[:1] in (b"R", b"C") or entry[1:2] in (b"R", b"C"):
            i += 1  # the rename's source follows as its own entry
    return out


def dirty_refusal(paths: list[str], repository: Path) -> str:
    """The one line refusing a dirty working tree, naming up to :data:`SHOWN` paths."""
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return (f"{repository} has changes not committed: {', '.join(paths[:SHOWN])}{more}; fab ship ships a "
            "commit: commit or stash them (or .gitignore them), or ship the working tree as it is with --allow-dirty")


def in_tree(path: Path, repository: Path, tree: Path) -> Path | None:
    """Where ``path`` (of the working tree) lies in ``tree``, the export of ``repository``'s commit;
    None when it lies outside the repository."""
    path, repository = Path(path).resolve(), Path(repository).resolve()
    return tree / path.relative_to(repository) if path.is_relative_to(repository) else None


def has_tests(files: Iterable[str], read: Callable[[str], str], leave_out: str | None = None) -> str | None:
    """What shows the app has tests, among its ``files`` (paths relative to the app): a ``tests/``
    or ``test/`` folder, a ``test_*.py``, ``*_test.py`` or ``tests.py`` file, or pytest's
    configuration (``read`` gives a file's text); files under ``leave_out`` (the smoke checks'
    folder) do not count. None when it has none."""
    files = [f for f in files if not (leave_out and (f == leave_out or f.startswith(leave_out + "/")))]
    for f in files:
        parts = PurePosixPath(f).parts
        folder = next((p for p in parts[:-1] if p in TEST_DIRS), None)
        if folder:
            return f"{'/'.join(parts[:parts.index(folder) + 1])}/"
        if TEST_FILE_RE.fullmatch(parts[-1]):
            return f
    return pytest_config(files, read)


def pytest_config(files: Iterable[str], read: Callable[[str], str]) -> str | None:
    """The file among ``files`` that configures pytest, None without one."""
    files = set(files)
    for name, section in PYTEST_CONFIG.items():
        if name in files and (section is None or any(line.strip() == section for line in read(name).splitlines())):
            return name
    return None


def tests_above(folders: Iterable[tuple[str, list[str]]], read: Callable[[str], str]) -> str | None:
    """Tests beside the app's folder or above it, up to the repository's root: ``folders`` are
    those (path relative to the root, ``""`` the root; the names in each, a folder's ending in
    ``/``); ``read`` gives a file's text by its path from the root. What shows them, else None."""
    for folder, names in folders:
        prefix = f"{folder}/" if folder else ""
        found = has_tests([n + "_" if n.endswith("/") else n for n in names], lambda n: read(prefix + n))
        if found:
            return prefix + found
    return None


def default_command(checks: str | None, django: bool = False) -> str:
    """``python -m pytest``, leaving out the app's smoke checks' folder (``checks``, relative to the
    app, when it has one): those are `fab check`'s, run against a host. ``django``: ``python
    manage.py test`` (an app with ``manage.py`` that does not configure pytest)."""
    if django:
        return DJANGO_TEST_COMMAND
    return DEFAULT_TEST_COMMAND + (f" --ignore={shlex.quote(checks)}" if checks else "")


def is_pytest(command: str) -> bool:
    """Whether ``command`` runs pytest (``pytest``, ``py.test``, ``python -m pytest``, ``coverage run
    -m pytest``), so that pytest's options may be added at its end."""
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    names = [PurePosixPath(w).name for w in words]
    return any(n in ("pytest", "py.test") for n in names) or any(
        a == "-m" and b == "pytest" for a, b in zip(words, words[1:]))


def command_line(command: str, junit: str | None) -> str:
    """The command run for the tests: ``command`` with the JUnit report's path (absolute) in place of
    ``{junit}``, or, for a lone pytest command, ``--junitxml=PATH`` added; else one line saying how."""
    if JUNIT in command:
        if quoted(command, JUNIT):
            raise ProvisionError(f"app.test_command {command!r}: {JUNIT} is inside quotes, where the report's path "
                                 "(quoted for the shell by provision) would keep its quotes; write it unquoted: "
                                 f"--junitxml={JUNIT}")
        return command.replace(JUNIT, shlex.quote(junit or "/dev/null"))
    if junit is None:
        return command
    if not is_pytest(command):
        raise ProvisionError(f"--junit: the test command {command!r} is not pytest's, so provision cannot ask it for "
                             f"a JUnit report; put {JUNIT} where it takes the report's path in app.test_command")
    if SHELL_RE.search(command):
        raise ProvisionError(f"--junit: the test command {command!r} is more than one command, and --junitxml added at "
                             f"its end would go to the last one; put --junitxml={JUNIT} after pytest in app.test_command")
    return f"{command} --junitxml={shlex.quote(junit)}"


def quoted(command: str, word: str) -> bool:
    """Whether ``word`` occurs inside single or double quotes of the shell line ``command``."""
    quote, i = None, 0
    while i < len(command):
        ch = command[i]
        if command.startswith(word, i) and quote:
            return True
        if ch == "\\" and quote != "'":
            i += 2
            continue
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
        i += 1
    return False


def requirement_names(files: Iterable[tuple[str, bytes]]) -> set[str]:
    """The distributions requirements files name (canonical), as pip reads their lines."""
    return {n for _, data in files for _, line in logical_lines(data.decode("utf-8", "replace"))
            if (n := requirement_name(line))}


# a requirement installed from what may change under the same requirements text: a local path
# (``.``, ``./mylib``, ``libs/x``, ``file:``), an editable install, a VCS URL, a local wheel folder
UNCACHED_RE = re.compile(r"^(-e|--editable|-f|--find-links)(\s|=|$)|^[.~/]|(^|@\s*)(file:|git\+|hg\+|svn\+|bzr\+)"
                         r"|^(?!-)[^\s;@:]*[/\\]")


def uncached(files: Iterable[tuple[str, bytes]]) -> str | None:
    """The first requirement line (``file: line``) whose install a cached test virtualenv would
    keep stale: a copy of a local folder as it was at its first ship, an editable install pointing
    into a folder since removed, a VCS branch as it was. None when the requirements name only
    distributions (and URLs of archives)."""
    for path, data in files:
        for _, line in logical_lines(data.decode("utf-8", "replace")):
            if UNCACHED_RE.search(line):
                return f"{path}: {line}"
    return None


SECRET_NAME_RE = re.compile(r"pass|secret|token|key|credential|auth", re.I)  # as config.SECRET_VAR_RE, and more
URL_PASSWORD_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)([^\s'\"]+)@")
ASSIGNMENT_RE = re.compile(r"(?<![\w-])([A-Za-z_][A-Za-z0-9_]*)=('[^']*'|\"(?:[^\"\\]|\\.)*\"|[^\s;&|]+)")


def command_secrets(command: str) -> list[str]:
    """The secrets a test command line holds: URLs' passwords (``postgres://u:PASSWORD@db``), and
    the values of ``NAME=value`` assignments whose name looks secret (pass, secret, token, key,
    credential, auth): for :func:`masked_command`, and for :func:`provision.secrets.remember`."""
    found = [m[2] for m in URL_PASSWORD_RE.finditer(command)]
    found += [m[2] for m in ASSIGNMENT_RE.finditer(command) if SECRET_NAME_RE.search(m[1])]
    return [v for v in found if v]


def remembered_secrets(command: str) -> list[str]:
    """Those of :func:`command_secrets` masked in every later line too: of 4 characters or more (a
    shorter value, ``USE_AUTH=1``, would mask every ``1`` printed)."""
    return [v for v in command_secrets(command) if len(v) >= 4]


def masked_command(command: str) -> str:
    """The test command line as it may be shown and recorded (the output, the release's meta, the
    release log): its secrets (:func:`command_secrets`) as ****."""
    command = URL_PASSWORD_RE.sub(lambda m: m[1] + MASK + "@", command)
    return ASSIGNMENT_RE.sub(lambda m: f"{m[1]}={MASK}" if SECRET_NAME_RE.search(m[1]) else m[0], command)


def venv_key(files: Iterable[tuple[str, bytes]], python: str, added: Iterable[str] = ()) -> str:
    """The test virtualenv's key: every requirements file (path and content), the python that builds
    it (its version and path) and what is installed besides."""
    h = hashlib.sha256(python.encode() + b"\0" + " ".join(added).encode())
    for path, data in files:
        h.update(b"\0" + path.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def pytest_count(output: str) -> int | None:
    """How many tests pytest's closing line (``3 passed, 1 skipped in 0.12s``) counts; None without one."""
    for line in reversed(output.splitlines()):
        found = PYTEST_SUMMARY_RE.findall(line)
        if found and re.search(r"\bin [\d.]+s", line):
            return sum(int(n) for n, _ in found)
    return None


def ship_origin(commit: str, result: str, seconds: float, command: str, count: int | None, dirty: bool) -> dict:
    """A shipped release's origin (its meta and the release log's line; `fab releases` shows it)."""
    tests = {"result": result, "seconds": round(seconds, 2), "command": command,
             **({"count": count} if count is not None else {})}
    return {"commit": commit, "tests": tests, "via": "ship", **({"dirty": True} if dirty else {})}
