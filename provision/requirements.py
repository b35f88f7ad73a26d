"""The app's Python dependencies, read locally before any host is touched.

Either a requirements file (``app.requirements``, default ``requirements.txt``) with every file it
includes (``-r``/``-c``, found relative to the including file and inside the app's source), or,
when there is no ``requirements.txt``, ``pyproject.toml``'s ``[project] dependencies`` (the app
itself is not installed: it runs from its release, ``src/`` layouts through gunicorn's
``pythonpath``). What they install, plus the server packages provision adds, decides the
virtualenv's key: a change in any included file builds a new virtualenv.

Hash-pinned requirements (pip's ``--require-hashes`` mode: a ``--hash`` on any line, or a
``--require-hashes`` line) get nothing added: pip would refuse an unpinned package, so the user
pins the server packages too, and one missing is an error here.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ProvisionError

GUNICORN = "gunicorn>=22"
UVICORN = "uvicorn[standard]>=0.30"  # [standard]: a WebSocket library (websockets), uvloop, httptools
DEFAULT_FILE = "requirements.txt"
PYPROJECT = "pyproject.toml"
FROM_PYPROJECT = "pyproject-dependencies.txt"  # the requirements file made of pyproject.toml's dependencies
SRC = "src"

# pip's own rules (pip/_internal/req/req_file.py): a comment starts at a '#' at the start of a
# line or after whitespace; a line ending in a backslash goes on on the next one.
COMMENT_RE = re.compile(r"(^|\s+)#.*$")
HASH_RE = re.compile(r"(^|\s)--hash(=|\s)")
NAME_RE = re.compile(r"([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*(?=[<>=!~;@\s]|$)")
INCLUDES = (("--requirement", "-r"), ("--constraint", "-c"))


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Dependencies:
    """What the virtualenv installs: ``files`` (path inside the source, content), the requirements
    file pip is given first, then each file it includes; ``added``: what provision installs besides."""

    origin: Path  # the file they come from: the requirements file or pyproject.toml
    files: tuple[tuple[str, bytes], ...]
    hashed: bool
    added: tuple[str, ...]

    @property
    def main(self) -> str:
        return self.files[0][0]

    def key(self, python: str) -> str:
        """The virtualenv's key. A lone requirements file with gunicorn added hashes as it always
        did, so hosts deployed before includes were read keep their virtualenvs."""
        h = hashlib.sha256()
        h.update(self.files[0][1] + b"\0" + python.encode() + b"\0" + " ".join(self.added).encode())
        for path, data in self.files[1:]:
            h.update(b"\0" + path.encode() + b"\0" + data)
        return h.hexdigest()[:16]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a requirements file, continuations joined and comments dropped, as pip reads it."""
    out, pending, first = [], [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.endswith("\\") and not COMMENT_RE.match(line):
            first = first or n
            pending.append(line[:-1])
            continue
        if COMMENT_RE.match(line):
            line = " " + line
        if pending:
            line, n, pending, first = "".join(pending) + line, first, [], 0
        out.append((n, COMMENT_RE.sub("", line).strip()))
    if pending:
        out.append((first, COMMENT_RE.sub("", "".join(pending)).strip()))
    return [(n, line) for n, line in out if line]


def servers(asgi: bool) -> tuple[str, ...]:
    """The packages provision adds (unless the requirements are hash-pinned)."""
    return (GUNICORN, UVICORN) if asgi else (GUNICORN,)


def include_of(line: str) -> tuple[str, str] | None:
    """``(-r or -c, path)`` of a line including another file, as pip parses its options; else None."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    head = tokens[0] if tokens else ""
    for long, short in INCLUDES:
        if head in (long, short):
            return (short, tokens[1]) if len(tokens) > 1 else None
        if head.startswith(long + "="):
            return short, head[len(long) + 1:]
        if head.startswith(short) and not head.startswith("--"):
            return short, head[len(short):]
    return None


def from_requirements(source: Path, requirements: str, asgi: bool) -> Dependencies:
    """A requirements file inside ``source`` and every file it includes, each read once."""
    main = inside(source, "", requirements, f"invalid setting app.requirements={requirements!r}", "it")
    files, names, hashed = read_tree(source, main)
    if hashed:
        missing = [canonical(re.split(r"[\[<>=]", s)[0]) for s in servers(asgi)]
        missing = [m for m in missing if m not in names]
        if missing:
            what = " and ".join(missing)
            raise ProvisionError(
                f"{main} is hash-pinned (--hash), so provision adds no {what} to it: pin {what} there too, "
                f"with its --hash (pip download {' '.join(missing)}, then pip hash each file)"
                + ("; WebSockets need websockets pinned as well" if "uvicorn" in missing else ""))
    return Dependencies(source / main, tuple(files.items()), hashed, () if hashed else servers(asgi))


def read_tree(source: Path, main: str) -> tuple[dict[str, bytes], set[str], bool]:
    """The requirements file ``main`` (a path inside ``source``) and every file it includes, each read
    once: {path: content}, the names they install (constraints aside) and whether any is hash-pinned."""
    files: dict[str, bytes] = {}
    names: set[str] = set()
    hashed = False
    todo = [(main, False)]
    while todo:
        rel, constraint = todo.pop(0)
        if rel in files:
            continue
        files[rel] = data = (source / rel).read_bytes()
        for n, line in logical_lines(data.decode("utf-8", "replace")):
            hashed = hashed or line == "--require-hashes" or bool(HASH_RE.search(line))
            include = include_of(line)
            if include:
                option, path = include
                todo.append((inside(source, rel, path, f"{rel}, line {n}", f"{option} {path}"),
                             constraint or option == "-c"))
            elif not constraint and requirement_name(line):
                names.add(requirement_name(line))
    return files, names, hashed


def requirement_name(line: str) -> str | None:
    """The distribution a requirements file's (logical) line installs, canonical; None for an option."""
    name = None if line.startswith("-") else NAME_RE.match(line)
    return canonical(name.group(1)) if name else None


def inside(source: Path, including: str, path: str, where: str, what: str) -> str:
    """The path inside ``source`` of a file named ``path`` from the file ``including`` (relative to
    its folder), which must be a file there; one line naming the problem otherwise."""
    if "://" in path:
        raise ProvisionError(f"{where}: {what}: provision ships included files with the virtualenv; "
                             "download it into your app's source and include it by its relative path")
    if path.startswith("/"):
        raise ProvisionError(f"{where}: {what}: an absolute path means nothing on the host; "
                             "give the path relative to this file")
    parts: list[str] = []
    for part in PurePosixPath(including).parent.joinpath(path).parts:
        if part == ".." and not parts:
            raise ProvisionError(f"{where}: {what} leaves the app's source ({source}); keep the file inside it")
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    rel = "/".join(parts)
    found = (source / rel).resolve()
    if not found.is_relative_to(source.resolve()):
        raise ProvisionError(f"{where}: {what} leads out of the app's source ({source}) through a link; "
                             "keep the file inside it")
    if not found.is_file():
        raise ProvisionError(f"{where}: {what}: no such file {source / rel}; create it or fix the path")
    return rel


def from_pyproject(source: Path, asgi: bool) -> Dependencies:
    """``[project] dependencies`` of ``pyproject.toml``, as a requirements file."""
    try:  # here, not at import: provision.receive imports this module wherever tomllib is missing
        import tomllib
    except ModuleNotFoundError:  # python < 3.11: its upstream, tomli (a dependency there only)
        import tomli as tomllib
    path = source / PYPROJECT
    fix = f"list your app's packages there or in {DEFAULT_FILE}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProvisionError(f"{path}: not valid TOML ({e}); fix it, or list your app's packages in {DEFAULT_FILE}")
    project = data.get("project")
    if not isinstance(project, dict):
        raise ProvisionError(f"{path} has no [project] table and there is no {DEFAULT_FILE}: "
                             f"add [project] dependencies (provision reads no [tool.*] tables), or write a {DEFAULT_FILE}")
    if "dependencies" in (project.get("dynamic") or []):
        raise ProvisionError(f"{path} declares its dependencies dynamic, which provision cannot read: {fix}")
    deps = project.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ProvisionError(f"{path}: [project] dependencies must be a list of strings like \"flask>=3\"; {fix}")
    for d in deps:
        if not d.strip() or d.strip().startswith("-") or "\n" in d or "\r" in d:
            raise ProvisionError(f"{path}: [project] dependency {d!r} is not a requirement like \"flask>=3\"; {fix}")
    text = "".join(f"{d.strip()}\n" for d in deps).encode()
    return Dependencies(path, ((FROM_PYPROJECT, text),), False, servers(asgi))


def load(source: Path, requirements: str, asgi: bool) -> Dependencies:
    """The app's dependencies: the requirements file; without the default one, pyproject.toml."""
    if (source / requirements).is_file():
        return from_requirements(source, requirements, asgi)
    if requirements == DEFAULT_FILE and (source / PYPROJECT).is_file():
        return from_pyproject(source, asgi)
    if requirements == DEFAULT_FILE:
        raise ProvisionError(f"no {DEFAULT_FILE} or {PYPROJECT} in {source}: list your app's packages in "
                             f"{DEFAULT_FILE} (or [project] dependencies in {PYPROJECT}), or set app.requirements")
    raise ProvisionError(f"invalid setting app.requirements={requirements!r}: no such file {source / requirements}; "
                         "create it or set app.requirements")


def pythonpath(source: Path, wsgi: str) -> str:
    """``src`` when the app's module is there and not at the top of its source (a src/ layout), else ""."""
    top = wsgi.split(":")[0].split(".")[0]

    def has(d: Path) -> bool:
        return (d / f"{top}.py").is_file() or (d / top).is_dir()

    return SRC if not has(source) and has(source / SRC) else ""
