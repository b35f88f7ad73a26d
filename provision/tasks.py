"""The fab tasks: `fab -H HOST deploy`, `fab -H HOST check`, `fab sandbox.up`, ...

A user's fabfile is one line, ``from provision.tasks import ns``. Thin by design: argument
parsing here, what each task does in :mod:`provision.cli`.
"""

from fabric import Task, task as fabric_task
from invoke import Collection

from . import scaffold
from .cli import apply as applying, check as checking, guarded, info as showing, sandbox as sandboxes
from .cli.maintenance import set_maintenance
from .fleet import DEFAULT_PARALLEL
from .hosts import DEFAULT_INVENTORY


class ProvisionTask(Task):
    """Short flags mean the same in every task: -s is --source; --serial has none."""

    LONG_ONLY = {"serial"}

    def arg_opts(self, name, default, taken_names):
        return super().arg_opts(name, default, taken_names | set(name) if name in self.LONG_ONLY else taken_names)


DROPLET = "sandbox1"  # the sandbox tasks' droplet when none is named


def task(*args, **kwargs):
    return fabric_task(*args, klass=ProvisionTask, **kwargs)


def _flags(source=None):
    return {"source": source}


FLEET_HELP = {"parallel": f"hosts at once (default {DEFAULT_PARALLEL})", "serial": "rolling batches of N hosts",
              "max_fail": "failed hosts tolerated before later batches are skipped (default 0)",
              "accept_new_host_key": "record unknown host keys (like OpenSSH's accept-new); changed keys are "
                                     "always refused",
              "break_lock": "stop a stuck deploy that holds the host's deploy lock",
              "verbose": "show remote commands, step times and round trips"}


def _fleet(parallel, serial, max_fail, accept_new_host_key):
    return {"parallel": int(parallel) if parallel else None, "serial": int(serial) if serial else None,
            "max_fail": int(max_fail or 0), "accept_new_host_key": accept_new_host_key}


@task(help={"source": "app directory to deploy (default: app.source)", "dry_run": "show the plan and diffs, touch nothing",
            "json": "write the per-host summary to this file", **FLEET_HELP})
def deploy(c, source=None, dry_run=False, verbose=False, json=None, break_lock=False, parallel=None, serial=None,
           max_fail=None, accept_new_host_key=False):
    """Provision the host, push a release, switch to it without dropping requests, health-check."""
    applying.run_apply(c, _flags(source), dry_run=dry_run, verbose=verbose, json_file=json, break_lock=break_lock,
                  fleet=_fleet(parallel, serial, max_fail, accept_new_host_key))


@task(help={"source": "app directory (default: app.source)", "verbose": "show remote commands"})
def plan(c, source=None, verbose=False):
    """What `deploy` would change, with diffs; touches nothing."""
    applying.run_apply(c, _flags(source), dry_run=True, verbose=verbose)


@task(name="provision", help={"dry_run": "show the plan, touch nothing", **FLEET_HELP})
def provision_(c, dry_run=False, verbose=False, break_lock=False, parallel=None, serial=None, max_fail=None,
               accept_new_host_key=False):
    """Packages, app user and directory layout only."""
    applying.run_apply(c, _flags(), mode="provision", dry_run=dry_run, verbose=verbose, break_lock=break_lock,
                  fleet=_fleet(parallel, serial, max_fail, accept_new_host_key))


@task(help={"to": "release id (default: the one before the live release)", **FLEET_HELP})
def rollback(c, to=None, verbose=False, break_lock=False, parallel=None, serial=None, max_fail=None,
             accept_new_host_key=False):
    """Switch traffic back to an earlier release (no rebuild)."""
    applying.run_apply(c, _flags(), mode="rollback", to=to, verbose=verbose, break_lock=break_lock,
                  fleet=_fleet(parallel, serial, max_fail, accept_new_host_key))


@task
def status(c):
    """Per host: live release, service states, uptime, last deploy."""
    showing.show_status(c)


@task(help={"follow": "keep printing new lines (Ctrl-C to stop)", "lines": "lines of history per host (default 20)",
            "process": "only this process's (or timer's) log"})
def logs(c, follow=False, lines=20, process=None):
    """App and nginx logs of the selected hosts, each line prefixed by its host."""
    showing.show_logs(c, follow=follow, lines=int(lines), process=process)


@task
def releases(c):
    """List the releases on the host; * marks the live one."""
    showing.show_releases(c)


@task(help={"source": "app directory (default: app.source)"})
def check(c, source=None):
    """Run the smoke checks (pytest-testinfra) against the selected hosts."""
    checking.run_checks(c, _flags(source))


@task
def inventory(c):
    """Show the selected hosts (-H) with their resolved settings."""
    showing.show_inventory(c)


@task(help={"name": f"one of {', '.join(scaffold.NAMES)} (default: list them)"})
def template(c, name=None):
    """Print one of the kit's templates, to start yours from: templates/NAME beside the fabfile."""
    guarded(lambda: print(scaffold.template_text(name), end=""))()


@task(name="on", help={"message": "what the default maintenance page says (HTML-escaped)"})
def maintenance_on(c, message=None):
    """nginx answers visitors 503 with the live release's maintenance.html, else a page with the message."""
    set_maintenance(c, True, message)


@task(name="off")
def maintenance_off(c):
    """Visitors reach the app again."""
    set_maintenance(c, False)


@task(iterable=["name"], help={"name": f"droplet name (repeatable; default {DROPLET})"})
def up(c, name=None):
    """Start local sandbox droplets (systemd-nspawn; needs root)."""
    sandboxes.sandbox_up(c, name or [DROPLET])


@task(iterable=["name"], name="down", help={"name": "droplet name (repeatable)", "all": "destroy all droplets and the proxy"})
def down(c, name=None, all=False):
    """Destroy sandbox droplets."""
    sandboxes.sandbox_down(c, name or ([] if all else [DROPLET]), everything=all)


@task(name="list")
def list_(c):
    """List sandbox droplets."""
    sandboxes.sandbox_list(c)


@task(help={"name": f"droplet name (default {DROPLET})"})
def info(c, name=DROPLET):
    """Print a droplet's URL and how to SSH in."""
    sandboxes.sandbox_info(name)


ns = Collection(deploy, plan, provision_, rollback, releases, status, logs, check, inventory, template,
                Collection("sandbox", up, down, list_, info), Collection("maintenance", maintenance_on, maintenance_off))
ns.configure({"inventory": DEFAULT_INVENTORY})
