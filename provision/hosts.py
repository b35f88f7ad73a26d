"""Which hosts a task acts on, and with which settings.

Fabric's own executor calls a task once per ``-H`` item, each time with a Connection. provision's
tasks act on the whole selection at once (in parallel, in rolling batches, one summary and one
exit code), so ``fab`` runs them through :class:`Executor` (``tasks.executor_class`` in
fabric.yaml): each task named on the command line is called once, with a :class:`Selection`
context holding every ``-H`` item and the project directory (where the fabfile is).

:func:`jobs` resolves a selection through the inventory and layers each host's settings
(:mod:`provision.config`): all of it locally, before any connection.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import invoke
from fabric.executor import Executor as FabricExecutor
from invoke import Call, Exit

from . import config as cfg
from .errors import ProvisionError
from .inventory import Inventory, Target

SANDBOX_INVENTORY = ".sandbox/inventory.ini"
DEFAULT_INVENTORY = f"inventory.ini,{SANDBOX_INVENTORY}"
EXECUTOR = f"{__name__}.Executor"
# Taken out of the environment at import: `fab` imports the fabfile, and so this module,
# before invoke reads the environment (see config.take_env).
ENV_APP = cfg.take_env()


class Selection(invoke.Context):
    """A task's context: invoke's (config, local commands) plus the hosts named with -H."""

    # Declared on the class: invoke's Context sends an attribute it does not know into the config.
    hosts: tuple[str, ...] = ()
    project: Path | None = None
    remainder: tuple[str, ...] = ()  # what follows `--` on the command line (the run task's command)

    def __init__(self, config=None, hosts: tuple[str, ...] = (), project: Path | None = None,
                 remainder: tuple[str, ...] = ()):
        super().__init__(config=config)
        self.hosts = tuple(hosts)
        self.project = project or Path.cwd()
        self.remainder = tuple(remainder)


class SelectionCall(Call):
    """A task call for a whole selection (Fabric's ConnectionCall is one per host)."""

    def __init__(self, *args, hosts: tuple[str, ...] = (), project: Path | None = None,
                 remainder: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.hosts, self.project, self.remainder = tuple(hosts), project, tuple(remainder)

    def clone_data(self):
        return dict(super().clone_data(), hosts=self.hosts, project=self.project, remainder=self.remainder)

    def make_context(self, config) -> Selection:
        return Selection(config=config, hosts=self.hosts, project=self.project, remainder=self.remainder)


class Executor(FabricExecutor):
    """Fabric's executor, with one call per task for the whole selection."""

    def normalize_hosts(self, hosts):
        """The whole selection as one item (Fabric's makes one per host)."""
        names = tuple(h["host"] if isinstance(h, dict) else str(h).strip() for h in hosts or ())
        return [{"hosts": tuple(n for n in names if n)}] if names else []

    def parameterize(self, call, connection_init_kwargs):
        return call.clone(into=SelectionCall, with_=dict(connection_init_kwargs, project=self.project))

    @property
    def project(self) -> Path:
        loaded_from = getattr(self.collection, "loaded_from", None)
        return Path(loaded_from).resolve() if loaded_from else Path.cwd()

    def expand_calls(self, calls, apply_hosts=True):
        rest = remainder(self.core.remainder if self.core is not None else "")
        if rest and not (calls and all(getattr(c.task, "takes_remainder", False) for c in calls)):
            raise Exit("error: `fab -H HOST -- COMMAND` is not a provision task; `fab -H HOST run -- COMMAND` runs "
                       "COMMAND in the app's live release (use ssh for anything else)", code=2)
        core, joined = self.core, self.core.remainder if self.core is not None else ""
        if joined:
            core.remainder = ""  # else Fabric adds a call that runs it itself, as the SSH user
        try:
            expanded = super().expand_calls(calls, apply_hosts)
        finally:
            if joined:
                core.remainder = joined
        return [c.clone(with_={"remainder": rest}) for c in
                (c if isinstance(c, SelectionCall) else self.parameterize(c, {}) for c in expanded)]


def remainder(joined: str, argv: list[str] | None = None) -> tuple[str, ...]:
    """What follows ``--`` on the command line, word for word (invoke joins it with spaces, which
    loses the quoting of `fab run -- python -c 'print(1)'`)."""
    argv = sys.argv if argv is None else argv
    if not joined or "--" not in argv:
        return ()
    return tuple(argv[argv.index("--") + 1:])


def selection(c) -> tuple[str, ...]:
    """The hosts named with -H (the raw items: aliases, groups, addresses)."""
    if not isinstance(c, Selection):
        raise ProvisionError(f"fab ran this task once per host, with Fabric's own executor; add `tasks: "
                             f"{{executor_class: {EXECUTOR}}}` to fabric.yaml (`python -m provision init` writes it)")
    if not c.hosts:
        raise ProvisionError("no hosts selected; pass -H ALIAS, -H GROUP or -H user@host[:port] (see `fab inventory`)")
    return c.hosts


def project(c) -> Path:
    return c.project if isinstance(c, Selection) and c.project else Path.cwd()


@dataclass
class Job:
    """One host of the selection, with its settings."""

    target: Target
    settings: cfg.Settings


def inventory_paths(c) -> list[Path]:
    names = c.config.get("inventory", None) or DEFAULT_INVENTORY
    if isinstance(names, str):
        names = names.split(",")
    return [project(c) / Path(n.strip()).expanduser() for n in names if n.strip()]


def targets(c) -> list[Target]:
    """The selected hosts, from the inventory or as given."""
    inv = Inventory.load(inventory_paths(c))
    return inv.resolve(",".join(selection(c)), default_user=c.config.user or "root",
                       default_port=c.config.port or 22)


def jobs(c, flags: dict, selected: list[Target] | None = None) -> list[Job]:
    """Every selected host with its settings, validated: defaults < fabric.yaml (``app:``) <
    inventory vars < FABRIC_APP_* < task flags. ``selected``: the hosts, as :func:`targets` read
    them once (fab ship: the inventory read once for its whole run)."""
    key_flag = (c.config.connect_kwargs.get("key_filename") or [None])
    key_flag = key_flag[0] if isinstance(key_flag, list) else key_flag
    project_app = c.config.get("app") or {}
    if not hasattr(project_app, "keys"):
        raise ProvisionError(f"`app` in fabric.yaml must be a mapping of settings (name: value lines), "
                             f"not a {type(project_app).__name__}; fix fabric.yaml")
    out = []
    for t in targets(c) if selected is None else selected:
        if key_flag:
            t = Target(t.alias, t.host, t.user, t.port, key_flag, t.known_hosts, t.vars)
        if t.key and not os.path.isfile(os.path.expanduser(t.key)):
            raise ProvisionError(f"{t.alias}: SSH key file {t.key} not found; fix -i KEY or `key=` in the inventory")
        raw = cfg.layer({str(k): v for k, v in project_app.items()}, ENV_APP, t.vars, flags)
        out.append(Job(t, cfg.build(raw, project(c))))
    return out
