"""The app's environment: plain variables (``app.env``, in each release), secrets (``fab env.set``,
a root-only file on the host) and ``shared/.env``; and the processes that get it besides the web
service: the release command (``app.release_command``, before a release takes traffic) and
``fab run -- CMD``.

Every such process runs as a transient systemd service (``systemd-run``) with the same
``EnvironmentFile=`` lines and sandbox as the app's unit (:mod:`provision.sandboxing`): systemd
reads the files as root, so the secrets file stays root's alone, and no value ever appears in a
command line.
"""

from __future__ import annotations

import base64
import json
import re
import shlex

from . import remote
from .errors import ProvisionError
from .layout import RELEASE_DIR, TMP, VENV, Layout
from .remote.lib_envfile import env_text
from .sandboxing import run_properties
from .steps import Change, Step

q = shlex.quote

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def name_problem(name: str) -> str | None:
    if not NAME_RE.fullmatch(name):
        return "a variable name is letters, digits and _, not starting with a digit"
    return None


def value_problem(value: str) -> str | None:
    if "\n" in value or "\r" in value or "\0" in value:
        return "a value is one line (no newline, no NUL)"
    return None


def env_setting(value) -> dict[str, str]:
    """``app.env``: a mapping of names to values (numbers and booleans as text); from the inventory
    or the environment, one string of NAME=VALUE items separated by commas. Raises ValueError(why)."""
    if isinstance(value, str):
        items = [i for i in value.split(",") if i.strip()]
        if any("=" not in i for i in items):
            raise ValueError("expected NAME=VALUE items separated by commas")
        value = dict(i.strip().split("=", 1) for i in items)
    if not hasattr(value, "items"):
        raise ValueError("expected a mapping of variable names to values (NAME: value lines)")
    out = {}
    for k, v in value.items():
        if isinstance(v, (dict, list, tuple)) or v is None:
            raise ValueError(f"the value of {k} is not text or a number")
        v = str(v).lower() if isinstance(v, bool) else str(v)
        why = name_problem(str(k)) or value_problem(v)
        if why:
            raise ValueError(f"{k}: {why}")
        out[str(k)] = v
    return out


def env_file(variables: dict[str, str]) -> bytes:
    """A release's plain environment file, as systemd's EnvironmentFile= reads it."""
    return env_text(variables).encode()


def app_process(lay: Layout, user: str, release_dir: str, argv: list[str], app_unit: str,
                writable: tuple[str, ...] = ()) -> list[str]:
    """The command line that runs ``argv`` in ``release_dir`` as the app does: its user, its
    environment (plain, then the unit's: secrets, shared/.env; later ones win, as in the unit) and
    virtualenv, in the web unit's sandbox (``app_unit``, the rendered app@.service.j2: its data dirs
    writable, and ``writable`` too). stdin, stdout and stderr are systemd-run's own, a TTY when they
    all are one (--pipe --pty); it waits and exits with the command's status."""
    venv = f"{release_dir}/{VENV}"
    return ["systemd-run", "--quiet", "--collect", "--pipe", "--pty", "--service-type=exec",
            f"--uid={user}", f"--gid={user}", f"--working-directory={release_dir}",
            f"--setenv=PATH={venv}/bin:{SYSTEM_PATH}", f"--setenv=VIRTUAL_ENV={venv}",
            "-p", f"EnvironmentFile=-{lay.release_env(release_dir)}", *run_properties(app_unit, writable),
            "--", *argv]


class ReleaseCommand(Step):
    """``app.release_command`` in the new release, once it is complete (its virtualenv too) and
    before the switch: only when this deploy made a release (``code``). A non-zero exit refuses
    the release (remote/release_command.py records it) and stops the deploy before the switch."""

    barrier = True

    def __init__(self, lay: Layout, user: str, command: str, release: str | None, app_unit: str, by: str = "",
                 fills: tuple[str, ...] = (), container: bool = False):
        self.lay, self.user, self.command, self.release, self.by = lay, user, command, release, by
        self.container = container  # a container app: in a one-off container of the release's image
        self.app_unit = app_unit  # the rendered web unit: the command runs in its sandbox
        self.fills = fills  # directories of the release the command may write (made for it, then root's)

    @property
    def name(self):
        return "release command"

    def plan(self, facts, notified):
        if "code" not in notified or not self.release:
            return None
        release = self.lay.release(self.release)
        if self.container:
            argv = ["/usr/bin/python3", "-I", f"{release}/{RELEASE_DIR}/container-run.py", "once", "--", "/bin/sh", "-c",
                    self.command]
            return Change([remote.python("release_command.py", {
                "argv": argv, "secrets_file": self.lay.secrets_file, "env_file": self.lay.env_file,
                "release_log": self.lay.release_log, "release": self.release, "by": self.by})], summary=self.command)
        argv = app_process(self.lay, self.user, release, ["/bin/sh", "-c", self.command], self.app_unit,
                           tuple(f"{release}/{d}" for d in self.fills))
        run = remote.python("release_command.py", {
            "argv": argv, "secrets_file": self.lay.secrets_file, "env_file": self.lay.env_file,
            "release_log": self.lay.release_log,
            "release": self.release, "by": self.by})
        fills = [q(f"{release}/{d}") for d in self.fills]
        if not fills:
            return Change([run], summary=self.command)
        # The release is root's; the command writes only these, made empty for it. Once it has
        # ended they become root's like the rest (remote/seal.py: each directory made root's
        # through its own descriptor before it is listed, never through a path the app can still
        # change; links and special files removed), whatever the command's exit.
        dirs = " ".join(fills)
        return Change([
            f"for d in {dirs}; do mkdir -p \"$(dirname \"$d\")\" && install -d -m 755 -o {q(self.user)} -g {q(self.user)} \"$d\"; done",
            f"__rc=0; {run} || __rc=$?",
            remote.python("seal.py", {"base": release, "dirs": list(self.fills)}),
            '[ "$__rc" -eq 0 ] || exit "$__rc"',
        ], summary=self.command)


class Secrets(Step):
    """Set (``values``) or unset (``names``) variables of the secrets file. The values reach the
    host's program on its stdin (a heredoc of the apply script), never in its arguments."""

    notify = ("secrets",)

    def __init__(self, lay: Layout, values: dict[str, str] | None = None, names: tuple[str, ...] = ()):
        self.lay, self.values, self.names = lay, values, tuple(names)

    @property
    def name(self):
        return f"secrets {self.lay.secrets_file}"

    def plan(self, facts, notified):
        op = "set" if self.values is not None else "unset"
        names = sorted(self.values) if self.values is not None else list(self.names)
        command = remote.python("app_env.py", {"op": op, "path": self.lay.secrets_file, "tmp": TMP, "names": names})
        return Change([f"{command} <<'__PROVISION_EOF__'\n{payload(self.values or {})}\n__PROVISION_EOF__"],
                      summary=f"{op} {' '.join(names)}")


def payload(values: dict[str, str]) -> str:
    """What app_env.py reads on stdin: base64, so that no value can end the heredoc."""
    return base64.b64encode(json.dumps(values).encode()).decode()


def secret_names_command(lay: Layout) -> str:
    """The command that prints the names in the secrets file, one a line (never a value)."""
    return remote.python("app_env.py", {"op": "list", "path": lay.secrets_file, "tmp": TMP, "names": []})


def pairs(items: list[str]) -> dict[str, str]:
    """``env.set`` arguments, NAME=VALUE each."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        why = ("expected NAME=VALUE" if not sep else name_problem(name) or value_problem(value))
        if why:
            raise ProvisionError(f"invalid env.set argument {name + ('=…' if sep else '')!r}: {why}")
        out[name] = value
    if not out:
        raise ProvisionError("env.set needs NAME=VALUE arguments: fab -H HOST env.set NAME=VALUE [NAME=VALUE ...]")
    return out


def names(items: list[str]) -> tuple[str, ...]:
    for name in items:
        why = name_problem(name)
        if why:
            raise ProvisionError(f"invalid env.unset argument {name!r}: {why}")
    if not items:
        raise ProvisionError("env.unset needs variable names: fab -H HOST env.unset NAME [NAME ...]")
    return tuple(items)
