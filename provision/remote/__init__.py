"""The programs that run on a host, and the one way to ship them: as the shell command that runs them.

A host has no provision installed: a Python program runs as ``python3 -c SOURCE ARGS`` (stdlib
only, python 3.7+), the libraries it uses (``lib_*.py``, listed in :data:`LIBS`) put before its
own text, its arguments one JSON value in ``argv[1]``; a bash program is its variables'
assignments followed by its text. Every path a program uses comes in its arguments, from the
:class:`~provision.layout.Layout`.
"""

from __future__ import annotations

import json
import shlex
from importlib import resources


LIBS = {  # the libraries each program uses, in the order they are put before it
    "facts.py": ("lib_http.py",),
    "http_check.py": ("lib_http.py",),
    "nginx_reload.py": ("lib_nginx.py",),
    "switch.py": ("lib_http.py", "lib_nginx.py"),
}


def text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text()


def source(name: str) -> str:
    """A Python program's text, with the libraries it uses before it."""
    return "".join(text(lib) + "\n" for lib in LIBS.get(name, ())) + text(name)


def python(name: str, args) -> str:
    """The shell command that runs a Python program with ``args`` (as JSON in its argv[1])."""
    return f"python3 -c {shlex.quote(source(name))} {shlex.quote(json.dumps(args, sort_keys=True))}"


def bash(name: str, variables: dict) -> str:
    """A bash program's text, after shell assignments of ``variables``."""
    for key in variables:
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"not a shell variable name: {key!r}")
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in variables.items()) + text(name)
