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
from urllib.parse import urlsplit
from importlib import resources

from ..layout import NGINX_LOCAL, RELEASE_DIR, TMP, Layout

LIBS = {  # the libraries each program uses, in the order they are put before it
    "facts.py": ("lib_http.py",),
    "http_check.py": ("lib_http.py",),
    "status.py": ("lib_http.py", "lib_logtime.py"),
    "monitor.py": ("lib_http.py",),
    "log_filter.py": ("lib_logtime.py",),
    "nginx_reload.py": ("lib_nginx.py",),
    "switch.py": ("lib_http.py", "lib_nginx.py", "lib_releaselog.py"),
    "app_env.py": ("lib_envfile.py",),
    "release_command.py": ("lib_envfile.py", "lib_releaselog.py"),
    "container_run.py": ("lib_envfile.py",),
}


def text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text()


def source(name: str) -> str:
    """A Python program's text, with the libraries it uses before it. Its first line names it, so
    that ``ps`` on the host (and a test's ``pgrep``) tells which program runs."""
    return f"# provision: {name}\n" + "".join(text(lib) + "\n" for lib in LIBS.get(name, ())) + text(name)


def python(name: str, args) -> str:
    """The shell command that runs a Python program with ``args`` (as JSON in its argv[1])."""
    return f"python3 -c {shlex.quote(source(name))} {shlex.quote(json.dumps(args, sort_keys=True))}"


def bash(name: str, variables: dict) -> str:
    """A bash program's text, after shell assignments of ``variables``."""
    for key in variables:
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ValueError(f"not a shell variable name: {key!r}")
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in variables.items()) + text(name)


def host_port(url: str) -> str:
    """``host:port`` of an http URL."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 80}"


def switch_command(layout: Layout, release: str, slot: str, old: str | None, action: str, by: str, health: dict,
                   daemon_reload: bool, nginx: str | None = None, stage: str = "all", log: dict | None = None,
                   engine: str | None = None) -> str:
    """The command that makes ``release`` live in ``slot`` (``old``: the live slot, or None), see switch.py
    (``stage``: all, prepare, commit or revert).
    ``health``: {path, host, timeout, header}, header the one the site names the socket that answered
    in (None when the site does not); ``nginx``: where the proof through nginx connects to; ``log``: more
    for the release log's line (the origin of a release: commit, tests); ``engine``: a container app's
    (its slots run the release's image, on ports instead of sockets)."""
    if old == slot:
        raise ValueError(f"the switch starts {release} in the idle slot, not in the live slot {slot}")
    release_dir = layout.release(release)
    return python("switch.py", {
        "app": layout.name, "release": release, "action": action, "by": by, "daemon_reload": daemon_reload,
        "release_dir": release_dir, "release_own_dir": RELEASE_DIR, "venv": layout.release_venv(release),
        "current": layout.current, "current_target": layout.current_target(release),
        "release_log": layout.release_log, "upstream_file": layout.upstream_file, "site_enabled": layout.site_enabled,
        "socket_unit_file": layout.socket_unit_file, "wants": layout.wants, "sockets_wants": layout.sockets_wants,
        "nginx_pid": layout.nginx_pid, "nginx": nginx or host_port(NGINX_LOCAL), "tmp": TMP, "health": health,
        "new": {"slot": slot, "unit": layout.unit(slot), "unit_file": layout.unit_file(slot),
                "socket": layout.answers(slot), "address": layout.address(slot), "slot_link": layout.slot_link(slot),
                "slot_target": layout.slot_target(release), "upstream": layout.upstream(slot)},
        "container": {"engine": engine, "image": layout.image(release), "name": layout.container_name(slot)}
        if engine else None,
        "old": {"slot": old, "unit": layout.unit(old)} if old else None, "stage": stage, "log": log or {},
    })
