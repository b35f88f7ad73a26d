"""The fab tasks: `fab -H HOST deploy`, `fab -H HOST check`, `fab sandbox.up`, ...

A user's fabfile is one line, ``from provision.tasks import ns``. Thin by design: argument
parsing here, what each task does in :mod:`provision.cli`.
"""

import sys

from fabric import Task, task as fabric_task
from invoke import Collection
from invoke.parser import Argument

from . import scaffold
from .cli import droplet as droplets
from .cli import apply as applying, bootstrap as booting, check as checking, env as environment, guarded, info as showing, sandbox as sandboxes
from .cli.git import run_setup
from .cli.ship import run_ship
from .cli.maintenance import set_maintenance
from .fleet import DEFAULT_PARALLEL
from .hosts import DEFAULT_INVENTORY


class Words(Argument):
    """A task's positional words, as many as follow the task's name on the command line (invoke
    has no `*args`): the words up to the next flag or task name."""

    def __init__(self, count: int, **kwargs):
        super().__init__(**kwargs)
        self.count = count

    @property
    def value(self):
        return None if len(self._value) < self.count else self._value  # None: the parser gives it the next word

    @value.setter
    def value(self, arg):
        self._value = [*self._value, arg]


def words_after(name: str, argv: list[str], stop: set[str]) -> int:
    """How many words follow the first ``name`` in ``argv`` before a flag, ``--`` or a name in ``stop``."""
    if name not in argv:
        return 0
    n = 0
    for word in argv[argv.index(name) + 1:]:
        if word.startswith("-") or word in stop:
            break
        n += 1
    return n


class ProvisionTask(Task):
    """Short flags mean the same in every task: -s is --source; --serial has none. ``words``: the
    parameter that takes the words after ``fab ... <invoked_as>`` (env.set A=1 B=2);
    ``takes_remainder``: what follows ``--`` reaches the task (``c.remainder``)."""

    LONG_ONLY = {"serial", "no_atomic", "allow_dirty", "junit", "size", "region", "image", "key", "known_hosts", "replace",
                 "bootstrap", "timeout"}

    def __init__(self, *args, words: str | None = None, invoked_as: str = "", takes_remainder: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.words, self.invoked_as, self.takes_remainder = words, invoked_as, takes_remainder

    def arg_opts(self, name, default, taken_names):
        return super().arg_opts(name, default, taken_names | set(name.replace("_", "-")) if name in self.LONG_ONLY
                                else taken_names)

    def get_arguments(self, ignore_unknown_help=None):
        args = super().get_arguments(ignore_unknown_help)
        if self.words:
            count = words_after(self.invoked_as, sys.argv, set(task_names(ns)))
            args = [Words(count, name=self.words, kind=list, positional=True, help=a.help) if a.name == self.words
                    else a for a in args]
            args.sort(key=lambda a: a.name != self.words)  # positionals first, as invoke wants them
        return args


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
            "json": "write the per-host summary to this file",
            "no_atomic": "each host switches on its own (default: every host prepares the release first; traffic "
                         "moves only when at most --max-fail hosts failed, and goes back when more fail)", **FLEET_HELP})
def deploy(c, source=None, dry_run=False, verbose=False, json=None, break_lock=False, parallel=None, serial=None,
           max_fail=None, accept_new_host_key=False, no_atomic=False):
    """Provision the host, push a release, switch to it without dropping requests, health-check."""
    applying.run_apply(c, _flags(source), dry_run=dry_run, verbose=verbose, json_file=json, break_lock=break_lock,
                  fleet=_fleet(parallel, serial, max_fail, accept_new_host_key), atomic=not no_atomic)


@task(help={"source": "app directory, in a git repository (default: app.source)",
            "allow_dirty": "ship the working tree's tracked files with their uncommitted changes (recorded as dirty)",
            "junit": "write the tests' JUnit XML report to this file (for CI)",
            "json": "write the per-host summary to this file",
            "no_atomic": "each host switches on its own (as deploy --no-atomic)", **FLEET_HELP})
def ship(c, source=None, allow_dirty=False, junit=None, verbose=False, json=None, break_lock=False, parallel=None,
         serial=None, max_fail=None, accept_new_host_key=False, no_atomic=False):
    """Test the commit in a clean export (app.test_command), deploy exactly that tree if they pass."""
    run_ship(c, _flags(source), allow_dirty=allow_dirty, junit=junit, verbose=verbose, json_file=json,
             break_lock=break_lock, fleet=_fleet(parallel, serial, max_fail, accept_new_host_key), atomic=not no_atomic)


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


@task(help={"dry_run": "show each phase's plan and diffs, touch nothing", "json": "write the per-host summary to this file",
            "verbose": FLEET_HELP["verbose"], "accept_new_host_key": FLEET_HELP["accept_new_host_key"]})
def bootstrap(c, dry_run=False, verbose=False, json=None, accept_new_host_key=False):
    """Make a fresh host safe: a deploy user with sudo, root and password logins off, a firewall, security upgrades."""
    booting.run_bootstrap(c, dry_run=dry_run, verbose=verbose, json_file=json, accept_new_host_key=accept_new_host_key)


@task(help={"watch": "refresh in place until Ctrl-C", "interval": "seconds between refreshes of --watch (default 2)"})
def status(c, watch=False, interval="2"):
    """Per host: health, traffic and 5xx ratio, memory, CPU, disk, certificate, live release, services."""
    showing.show_status(c, watch=watch, interval=interval)


@task(help={"follow": "keep printing new lines (Ctrl-C to stop)", "lines": "lines of history per host (default 20)",
            "process": "only this process's (or timer's) log",
            "since": "only lines since then: 10m, 2h, 1d, today, yesterday, 2026-11-24 05:00 (UTC)",
            "grep": "only lines matching this extended regular expression (grep -E), chosen on the host"})
def logs(c, follow=False, lines=20, process=None, since=None, grep=None):
    """App and nginx logs of the selected hosts, each line prefixed by its host."""
    showing.show_logs(c, follow=follow, lines=int(lines), process=process, since=since, grep=grep)


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


@task(iterable=["name"], help={"name": f"droplet name (repeatable; default {DROPLET})",
                                "snapshot": "start them from this snapshot (fab sandbox.snapshot)",
                                "parallel": "droplets booting at once (default 8)",
                                "containers": "droplets that run a container engine, with localhost/debian:12 (13 for trixie)",
                                "engine": "with --containers: docker (default) or podman"})
def up(c, name=None, snapshot=None, parallel=8, containers=False, engine="docker"):
    """Start local sandbox droplets (systemd-nspawn; needs root)."""
    sandboxes.sandbox_up(c, name or [DROPLET], snapshot=snapshot, parallel=int(parallel),
                         containers=engine if containers else None)


@task(help={"name": f"the droplet to snapshot (default {DROPLET}); it is shut down and released",
            "snapshot": "the snapshot's name (an older one of that name is replaced)",
            "drop": "remove the snapshot named by --snapshot instead"})
def snapshot(c, name=DROPLET, snapshot=None, drop=False):
    """Turn a droplet into a snapshot new droplets start from (fab sandbox.up --snapshot S)."""
    sandboxes.sandbox_snapshot(c, name, snapshot, drop=drop)


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


@task(name="set", words="pairs", invoked_as="env.set", help={"pairs": "NAME=VALUE (several: NAME=VALUE NAME=VALUE)"})
def env_set(c, pairs=None):
    """Set secret environment variables of the app (root-only on the host); restarts it with no downtime."""
    environment.env_set(c, pairs or [])


@task(name="unset", words="names", invoked_as="env.unset", help={"names": "NAME (several: NAME NAME)"})
def env_unset(c, names=None):
    """Remove secret environment variables of the app; restarts it with no downtime."""
    environment.env_unset(c, names or [])


@task(name="list")
def env_list(c):
    """The names of the app's secret environment variables (values masked)."""
    environment.env_list(c)


@task(name="run", takes_remainder=True)
def run_(c):
    """fab -H HOST run -- CMD [ARGS]: CMD in the live release, as the app, with its environment."""
    environment.run_command(c, c.remainder if hasattr(c, "remainder") else ())


@task(name="setup", help={"dry_run": "show the plan and diffs, touch nothing", "verbose": "show remote commands",
                         "accept_new_host_key": "record an unknown host key (OpenSSH's accept-new)"})
def git_setup(c, dry_run=False, verbose=False, accept_new_host_key=False):
    """Push-to-deploy: a bare repository and its hook on the host; prints the remote to push to."""
    run_setup(c, verbose=verbose, dry_run=dry_run, accept_new_host_key=accept_new_host_key)


DROPLET_HELP = {"name": "the droplet's name (its inventory alias)",
                "provider": "sandbox (local droplets) or digitalocean (token in DIGITALOCEAN_TOKEN)"}


@task(name="create", help={**DROPLET_HELP, "size": "provider's size slug (digitalocean default s-1vcpu-1gb)",
                           "region": "provider's region slug (digitalocean default fra1)",
                           "image": "provider's image slug (digitalocean default debian-12-x64)",
                           "key": "private key the deploy user logs in with (its public half goes in the user data; "
                                  "default ~/.ssh/id_ed25519, the sandbox's key for sandbox)",
                           "known_hosts": "file the droplet's host key is recorded in (default ~/.ssh/known_hosts; "
                                          "the sandbox's own for sandbox)",
                           "replace": "point an existing inventory line of that name at the new droplet",
                           "bootstrap": "run fab bootstrap on it once it is ready",
                           "timeout": "seconds to wait for it to be ready (sandbox 60, digitalocean 300)"})
def droplet_create(c, name=None, provider=None, size=None, region=None, image=None, key=None, known_hosts=None,
                   replace=False, bootstrap=False, timeout=None):
    """Create a droplet with the deploy user and your key in place; record its host key; add it to inventory.ini."""
    droplets.create_droplet(c, name, provider, size=size, region=region, image=image, key=key,
                            known_hosts=known_hosts, replace=replace, bootstrap=bootstrap, timeout=timeout)


@task(name="list", help={"provider": DROPLET_HELP["provider"] + "; default: the one inventory.ini's droplets record"})
def droplet_list(c, provider=None):
    """The provider's droplets: name, address, status, size, region."""
    droplets.list_droplets(c, provider)


@task(name="destroy", help={**DROPLET_HELP, "provider": "default: the one its inventory line records",
                            "yes": "do not ask (scripts); without a terminal, droplet.destroy refuses unless --yes"})
def droplet_destroy(c, name=None, provider=None, yes=False):
    """Destroy a droplet and remove its inventory line (asks first; --yes for scripts)."""
    droplets.destroy_droplet(c, name, provider, yes=yes)


def task_names(collection: Collection) -> list[str]:
    return [*collection.task_names, *(a for names in collection.task_names.values() for a in names)]


ns = Collection(bootstrap, deploy, ship, plan, provision_, rollback, releases, status, logs, check, inventory, template, run_,
                Collection("sandbox", up, down, list_, info, snapshot), Collection("env", env_set, env_unset, env_list),
                Collection("maintenance", maintenance_on, maintenance_off), Collection("git", git_setup),
                Collection("droplet", droplet_create, droplet_list, droplet_destroy))
ns.configure({"inventory": DEFAULT_INVENTORY})
