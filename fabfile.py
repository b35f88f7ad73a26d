"""provision tasks: `fab -H HOST deploy`, `fab -H HOST check`, `fab sandbox.up`, ...

Thin by design: argument parsing here, everything else in the provision package.
"""

from pathlib import Path

from fabric import task
from invoke import Collection

from provision import cli
from provision.config import DEFAULTS

PROJECT = Path(__file__).resolve().parent


def _flags(source=None):
    return {"source": source}


@task(help={"source": "app directory to deploy (default: app.source)", "dry_run": "show the plan and diffs, touch nothing",
            "verbose": "show remote commands and round trips", "json": "write the per-host summary to this file"})
def deploy(c, source=None, dry_run=False, verbose=False, json=None):
    """Provision the host, push a release, install configs, (re)load, health-check."""
    cli.run_apply(c, PROJECT, _flags(source), full=True, dry_run=dry_run, verbose=verbose, json_file=json)


@task(help={"source": "app directory (default: app.source)", "verbose": "show remote commands"})
def plan(c, source=None, verbose=False):
    """What `deploy` would change, with diffs; touches nothing."""
    cli.run_apply(c, PROJECT, _flags(source), full=True, dry_run=True, verbose=verbose)


@task(name="provision", help={"dry_run": "show the plan, touch nothing", "verbose": "show remote commands"})
def provision_(c, dry_run=False, verbose=False):
    """Packages, app user and directory layout only."""
    cli.run_apply(c, PROJECT, _flags(), full=False, dry_run=dry_run, verbose=verbose)


@task(help={"source": "app directory (default: app.source)"})
def check(c, source=None):
    """Run the smoke checks (pytest-testinfra) against the selected hosts."""
    cli.run_checks(c, PROJECT, _flags(source))


@task
def inventory(c):
    """Show the selected hosts (-H) with their resolved settings."""
    cli.show_inventory(c, PROJECT)


@task(iterable=["name"], help={"name": "droplet name (repeatable; default sandbox1)"})
def up(c, name=None):
    """Start local sandbox droplets (systemd-nspawn; needs root)."""
    cli.sandbox_up(PROJECT, name or ["sandbox1"])


@task(iterable=["name"], name="down", help={"name": "droplet name (repeatable)", "all": "destroy all droplets and the proxy"})
def down(c, name=None, all=False):
    """Destroy sandbox droplets."""
    cli.sandbox_down(PROJECT, name or ([] if all else ["sandbox1"]), everything=all)


@task(name="list")
def list_(c):
    """List sandbox droplets."""
    cli.sandbox_list(PROJECT)


@task(help={"name": "droplet name (default sandbox1)"})
def info(c, name="sandbox1"):
    """Print a droplet's URL and how to SSH in."""
    cli.sandbox_info(name)


ns = Collection(deploy, plan, provision_, check, inventory, Collection("sandbox", up, down, list_, info))
ns.configure({"app": dict(DEFAULTS), "inventory": cli.DEFAULT_INVENTORY})
