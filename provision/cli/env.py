"""The app's environment and one-off commands: env.set, env.unset, env.list, run."""

from __future__ import annotations

import os
import shlex
import sys

from invoke import Exit

from .. import appenv, secrets
from ..app import health_check, proves_upstream, rendered
from ..config import Settings
from ..errors import ProvisionError
from ..facts import collect_facts
from ..fleet import DEFAULT_PARALLEL, exit_code, run_fleet
from ..hosts import Job, jobs
from ..layout import RELEASE_DIR
from ..output import Printer, summary_line, summary_table
from ..release import Switch, current_release
from ..runner import HostResult, run_steps
from ..steps import Directory, Recipe, RootsOnly, Step
from . import connect_job, exit_for_failures, guarded, host_failed
from .apply import deployer, lock_for


class EnvChange(Recipe):
    """A change to the secrets file, then, when a release is live, the app restarted through the
    switch (the live release in the idle slot, health gate, traffic moves) so that it sees it.
    Before the first deploy only the file is written: the deploy's instance reads it."""

    def __init__(self, s: Settings, change: Step, by: str = ""):
        self.s, self.change, self.by = s, change, by
        self.prove = proves_upstream(rendered(s, "nginx-site.conf.j2"))

    def target_facts(self):
        return [("file", self.s.layout.current)]

    def target(self, facts):
        return current_release(self.s, facts)

    def facts(self):  # the restart's facts too, whatever the target
        return list(dict.fromkeys([*map(tuple, self.target_facts()), *collect_facts(self.all_steps("-"))]))

    def all_steps(self, target: str) -> list[Step]:
        lay = self.s.layout
        return [RootsOnly(lay.tree, hint=f"deploy first: its message says how to fix {lay.root}"),
                Directory(lay.root, owner="root", group="root", mode=0o755), self.change,
                Switch(self.s, target, action="restart", by=self.by, restart_on=("secrets",), prove=self.prove),
                health_check(self.s, self.prove)]

    def steps(self, target):
        return self.all_steps(target) if target else self.all_steps("-")[:3]


def _apply(c, change) -> None:
    """``change(settings)``: the Secrets step of each selected host, applied with the restart."""
    work = jobs(c, {})
    printer = Printer()

    def one(job: Job) -> HostResult:
        s, remote = job.settings, None
        try:
            remote = connect_job(job, c)
            r = run_steps(remote, EnvChange(s, change(s), deployer()), printer=printer,
                          lock=lock_for(s, "env", "-", False))
        except ProvisionError as e:
            return host_failed(printer, job.target.alias, e)
        finally:
            if remote is not None:
                remote.close()
        printer.line(summary_line(r, False))
        return r

    results = run_fleet(work, lambda j: j.target.alias, one, parallel=DEFAULT_PARALLEL)
    summary_table(results, printer)
    code = exit_code(results)
    if code:
        raise Exit(code=code)


@guarded
def env_set(c, words: list[str]) -> None:
    values = appenv.pairs(words)
    secrets.remember([*values.values(), appenv.payload(values)])
    _apply(c, lambda s: appenv.Secrets(s.layout, values=values))


@guarded
def env_unset(c, words: list[str]) -> None:
    names = appenv.names(words)
    _apply(c, lambda s: appenv.Secrets(s.layout, names=names))


@guarded
def env_list(c) -> None:
    printer = Printer()

    def one(job: Job) -> HostResult:
        s, label = job.settings, job.target.alias
        remote = connect_job(job, c)
        try:
            rc, out, err = remote.exec(remote.sudo + appenv.secret_names_command(s.layout), timeout=60)
        finally:
            remote.close()
        if rc != 0:
            return HostResult(label, error=f"{label}: cannot read {s.layout.secrets_file}: {err.strip()[-300:]}")
        for name in out.split():
            printer.line(f"{label}: {name}={secrets.MASK} (secret)")
        for name, value in sorted(s.env.items()):
            printer.line(f"{label}: {name}={value} (app.env)")
        if not out.split() and not s.env:
            printer.line(f"{label}: no environment variables (fab env.set NAME=VALUE, or app.env in fabric.yaml)")
        return HostResult(label)

    results = run_fleet(jobs(c, {}), lambda j: j.target.alias, one)
    exit_for_failures(results, printer)


def run_line(s: Settings, argv: list[str] | tuple[str, ...], tty: bool = False) -> str:
    """The host's command line for `fab run -- argv`: in the live release (``current``), as the app;
    one line on stderr and exit 2 when there is none. It runs in the web unit's sandbox; a container
    app's, in a one-off container of the live release's image (``tty``: with a terminal)."""
    lay = s.layout
    if s.container:
        process = ["/usr/bin/python3", "-I", f"{lay.current}/{RELEASE_DIR}/container-run.py", "once",
                   *(["-t"] if tty else []), "--", *argv]  # after `--`: never an option of container-run.py
    else:
        process = appenv.app_process(lay, s.user, lay.current, ["/usr/bin/env", *argv],
                                     rendered(s, "app@.service.j2").decode())
    missing = f"error: no live release of {s.name} on this host; deploy first"
    return (f"if [ ! -d {shlex.quote(lay.current + '/')} ]; then echo {shlex.quote(missing)} >&2; exit 2; fi; "
            f"exec {shlex.join(process)}")


def terminal() -> bool:
    """fab runs in the foreground of a terminal (stdin and stdout): then the command gets one too."""
    try:
        return sys.stdin.isatty() and sys.stdout.isatty() and os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:  # a terminal that is not this process's controlling one
        return False


@guarded
def run_command(c, argv) -> None:
    if not argv:
        raise ProvisionError("nothing to run; give the command after --: fab -H HOST run -- COMMAND [ARGS]")
    work = jobs(c, {})
    if len(work) != 1:
        raise ProvisionError(f"run takes one host; -H selects {len(work)} "
                             f"({', '.join(j.target.alias for j in work[:5])}): name one")
    job = work[0]
    remote = connect_job(job, c)
    tty = terminal()
    try:
        command = run_line(job.settings, argv, tty)
        # a terminal fab does not own (a background job) is not read: invoke would fail on it
        result = remote.conn.run(f"{remote.sudo}bash -c {shlex.quote(command)}", pty=tty, warn=True, hide=False,
                                 echo=False, in_stream=None if tty or not sys.stdin.isatty() else False)
    finally:
        remote.close()
    if result.exited:
        raise Exit(code=result.exited)
