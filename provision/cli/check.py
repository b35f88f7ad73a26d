"""`fab check`: the built-in smoke checks and the app's own (pytest-testinfra) on every selected host."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from invoke import Exit

from ..hosts import Job, jobs, project
from ..output import Printer
from ..runner import HostResult
from ..fleet import run_fleet
from . import connect_job, exit_for_failures, guarded

if TYPE_CHECKING:
    from ..checks.plugin import CheckHost

BUILT_IN = Path(__file__).resolve().parents[1] / "checks"  # provision/checks: the smoke checks every app gets


def check_hosts(work: list[Job], connector) -> list["CheckHost"]:
    """The hosts `fab check` runs on, by alias: each with its app settings (the `app` fixture) and
    a way to connect (``connector(job)``, called only when a check needs the host)."""
    from ..checks.plugin import CheckHost  # pytest and testinfra: only `fab check` needs them

    out = []
    for job in work:
        t, s = job.target, job.settings
        settings = {"name": s.name, "user": s.user, "server_name": s.server_name, "health_path": s.health_path,
                    "deploy_user": s.deploy_user, "open_ports": list(s.open_ports),
                    "unattended_upgrades": s.unattended_upgrades, "tls": s.tls, **s.layout.variables(),
                    # the services of its processes and timers (a timer's service shares its name)
                    "process_units": [s.layout.process_unit(n) for n in (*s.processes, *s.timers)]}
        out.append(CheckHost(t.alias, settings, functools.partial(connector, job), sudo=t.user != "root"))
    return out


@guarded
def run_checks(c, flags: dict, extra_args: list[str] | None = None) -> int:
    """Every host reachable with a known key first (in parallel, one line per problem); then the
    checks, over connections that check the host key again: they never go through testinfra's."""
    from ..checks.plugin import CheckHosts, main

    work = jobs(c, flags)
    printer = Printer()

    def verify(job: Job) -> HostResult:
        connect_job(job, c).conn.close()
        return HostResult(job.target.alias)

    exit_for_failures(run_fleet(work, lambda j: j.target.alias, verify), printer)
    paths = [str(BUILT_IN)]
    paths += sorted({str(j.settings.checks) for j in work if j.settings.checks.is_dir()})
    hosts = CheckHosts(check_hosts(work, lambda job: connect_job(job, c)))
    code = main(hosts, paths, project(c), extra_args)
    exit_for_failures([HostResult(alias, error=str(e), code=e.code) for alias, e in hosts.errors().items()],
                       printer)
    if code != 0:
        raise Exit(code=code)
    return 0
