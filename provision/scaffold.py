"""What `python -m provision init` writes into a project, and what it guesses.

Pure functions of a directory's contents (nothing here writes or imports the user's code):
:func:`plan` gives the three files, their text and notes for the user; ``__main__`` writes them.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from invoke.util import yaml

from . import config as cfg
from .errors import ProvisionError
from .hosts import EXECUTOR
from .render import NAMES, default_template

FILES = ("fabfile.py", "fabric.yaml", "inventory.ini")  # what init writes

FABFILE = "from provision.tasks import ns  # noqa: F401  (the tasks: `fab --list`)\n"

INVENTORY = """\
# Your hosts (Ansible-style INI). `fab -H web1 deploy` deploys to one host, `fab -H web deploy` to
# the group, `fab -H web inventory` shows what a selection resolves to. A host needs no entry:
# `fab -H root@203.0.113.10 deploy` works too. A non-root user works through passwordless sudo.
#
# [web]
# web1 host=203.0.113.10 user=deploy key=~/.ssh/id_ed25519
# web2 host=203.0.113.11 user=deploy
#
# [web:vars]
# server_name=example.com
# workers=4
"""

WSGI_EXAMPLE = "myapp:app"


@dataclass
class Scaffold:
    name: str
    wsgi: str | None  # None: not guessed (app.wsgi's default applies until the user sets it)
    files: dict[str, str]  # file name -> text, in the order of FILES
    notes: list[str] = field(default_factory=list)


def app_name(directory: str) -> str:
    """The directory's name made into a valid app name (see :func:`provision.config.name_problem`):
    lowercase ASCII, runs of other characters as '-', leading non-letters dropped, at most 31."""
    text = unicodedata.normalize("NFKD", directory).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9_-]+", "-", text)
    name = re.sub(r"^[^a-z]+", "", text)[:31].rstrip("-_")
    why = cfg.name_problem(name)
    if why:
        raise ProvisionError(f"cannot name the app after the directory {directory!r} ({name or 'nothing'!r} is "
                             f"not a valid app name: {why}); run `python -m provision init --name NAME`")
    return name


def check_name(name: str) -> str:
    why = cfg.name_problem(name)
    if why:
        raise ProvisionError(f"invalid app name {name!r}: {why}")
    return name


def top_level_names(path: Path) -> set[str]:
    """The names a module binds at its top level (assignments, definitions, imports), read
    without running it; none if it cannot be read or parsed."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


def guess_wsgi(root: Path) -> tuple[str | None, str | None]:
    """(app.wsgi, None) when the layout tells it, else (None, why not): ``app.py`` binding ``app``
    (app:app) or defining ``create_app`` (app:create_app()); Django's ``<package>/wsgi.py``
    binding ``application`` (<package>.wsgi:application)."""
    defined = top_level_names(root / "app.py")
    if "app" in defined:
        return "app:app", None
    if "create_app" in defined:
        return "app:create_app()", None
    django = [p.parent.name for p in sorted(root.glob("*/wsgi.py"))
              if p.parent.name.isidentifier() and "application" in top_level_names(p)]
    if len(django) == 1:
        return f"{django[0]}.wsgi:application", None
    if django:
        return None, f"several Django projects ({', '.join(f'{d}/wsgi.py' for d in django)})"
    return None, "no app.py binding app or create_app, no <package>/wsgi.py binding application"


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar that reads back as this string (quoted only where YAML would
    read another type, like ``on`` or ``null``)."""
    return value if yaml.safe_load(value) == value else json.dumps(value)


def fabric_yaml(name: str, wsgi: str | None) -> str:
    wsgi_line = (f"  wsgi: {_scalar(wsgi)}" if wsgi else
                 f"  # wsgi: {WSGI_EXAMPLE}  # module:callable or module:factory(); not guessed "
                 f"(default {cfg.DEFAULTS['wsgi']})")
    defaults = ", ".join(f"{k}: {cfg.DEFAULTS[k]}" for k in ("source", "requirements", "server_name", "workers",
                                                          "health_path"))
    return f"""\
# Settings for `fab` (Fabric's own config file), written by `python -m provision init`.
# provision's tasks act on the whole -H selection at once: its executor calls each task once.
tasks:
  executor_class: {EXECUTOR}
# The app: only what differs from provision's defaults (see provision's README):
# {defaults}, ...
# Inventory vars, FABRIC_APP_<KEY> environment variables and task flags override these.
app:
  name: {_scalar(name)}
{wsgi_line}
"""


def existing(root: Path) -> list[str]:
    """Those of :data:`FILES` already in ``root`` (a link counts, even a dangling one)."""
    return [f for f in FILES if (root / f).exists() or (root / f).is_symlink()]


def plan(root: Path, name: str | None = None) -> Scaffold:
    """What init writes into ``root``: the app named ``name`` or after the directory."""
    name = check_name(name) if name is not None else app_name(root.resolve().name)
    wsgi, why_not = guess_wsgi(root)
    notes = []
    if why_not:
        notes.append(f"app.wsgi not guessed ({why_not}): set it in fabric.yaml, module:callable "
                     f"like {WSGI_EXAMPLE} (default {cfg.DEFAULTS['wsgi']})")
    if not (root / "requirements.txt").is_file() and not (root / "pyproject.toml").is_file():
        notes.append("no requirements.txt or pyproject.toml here: list your app's packages in requirements.txt "
                     "(deploy installs them), or set app.requirements in fabric.yaml")
    texts = {"fabfile.py": FABFILE, "fabric.yaml": fabric_yaml(name, wsgi), "inventory.ini": INVENTORY}
    return Scaffold(name, wsgi, {f: texts[f] for f in FILES}, notes)



def template_text(name: str | None) -> str:
    """The kit's template ``name`` (to start an override in templates/ from); no name: the names,
    one a line."""
    return default_template(name) if name else "".join(f"{n}\n" for n in NAMES)
