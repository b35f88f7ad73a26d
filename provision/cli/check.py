"""`fab check`: the built-in smoke checks and the app's own (pytest-testinfra) on every selected host."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
import threading
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


def check_settings(job: Job) -> dict:
    """What the `app` fixture gives the checks of ``job``'s host."""
    s = job.settings
    return {"name": s.name, "user": s.user, "server_name": s.server_name, "health_path": s.health_path,
            "deploy_user": s.deploy_user, "open_ports": list(s.open_ports),
            "unattended_upgrades": s.unattended_upgrades, "tls": s.tls, **s.layout.variables(),
            "container": s.container, "engine": s.engine,
            # the services of its processes and timers (a timer's service shares its name)
            "process_units": [s.layout.process_unit(n) for n in (*s.processes, *s.timers)],
            "monitor_units": [f"{s.layout.monitor_unit}.service"] if s.monitor else []}


def check_hosts(work: list[Job], connector) -> list["CheckHost"]:
    """The hosts `fab check` runs on, by alias: each with its app settings (the `app` fixture) and
    a way to connect (``connector(job)``, called only when a check needs the host)."""
    from ..checks.plugin import CheckHost  # pytest and testinfra: only `fab check` needs them

    return [CheckHost(job.target.alias, check_settings(job), functools.partial(connector, job),
                      sudo=job.target.user != "root") for job in work]


@guarded
def run_checks(c, flags: dict, extra_args: list[str] | None = None) -> int:
    """Every host reachable with a known key first (in parallel, one line per problem); then the
    checks, over connections that check the host key again: they never go through testinfra's.
    One host: one pytest session here; several: a session per host (provision.checks.worker),
    CHECK_PARALLEL at a time, each host's output printed whole, in the selection's order."""
    work = jobs(c, flags)
    printer = Printer()

    def verify(job: Job) -> HostResult:
        connect_job(job, c).close()
        return HostResult(job.target.alias)

    exit_for_failures(run_fleet(work, lambda j: j.target.alias, verify), printer)
    paths = [str(BUILT_IN)]
    paths += sorted({str(j.settings.checks) for j in work if j.settings.checks.is_dir()})
    if len(work) == 1:
        from ..checks.plugin import CheckHosts, main

        hosts = CheckHosts(check_hosts(work, lambda job: connect_job(job, c)))
        codes = [main(hosts, paths, project(c), extra_args)]
        errors = [HostResult(alias, error=str(e), code=e.code) for alias, e in hosts.errors().items()]
    else:
        codes, errors = check_in_parallel(work, paths, project(c), extra_args)
    exit_for_failures(errors, printer)
    code = session_code(codes)
    if code != 0:
        raise Exit(code=code)
    return 0


CHECK_PARALLEL = 16  # hosts' sessions at once: each is a python process (CPU), its checks mostly wait on SSH


def session_code(codes: list[int]) -> int:
    """The exit code of several hosts' pytest sessions: a failed check (1) before any other problem."""
    bad = [c for c in codes if c != 0]
    return 1 if 1 in bad else max(bad, default=0)


def check_in_parallel(work: list[Job], paths: list[str], rootdir: Path, extra_args: list[str] | None
                      ) -> tuple[list[int], list[HostResult]]:
    """Each host's checks in a worker process of its own; a host's output is printed whole once it and
    every host before it are done. Its pytest exit codes, and the hosts that refused a connection."""
    from ..checks.worker import spec

    outputs: dict[int, str] = {}
    printed = [0]
    lock = threading.Lock()
    outcomes: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="provision-check-") as tmp:
        def one(i: int) -> HostResult:
            t = work[i].target
            result = Path(tmp) / f"{i}.json"
            proc = subprocess.run([sys.executable, "-m", "provision.checks.worker"], capture_output=True, text=True,
                                  input=spec(t, check_settings(work[i]), t.user != "root", paths, rootdir, extra_args,
                                             result))
            outcomes[t.alias] = (json.loads(result.read_text()) if result.exists() else
                                 {"code": 3, "error": f"{t.alias}: the checks did not run: "
                                                      f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}"})
            with lock:  # print in the selection's order, each host whole
                outputs[i] = f"== {t.alias} ==\n{proc.stdout}{proc.stderr}"
                while printed[0] in outputs:
                    sys.stdout.write(outputs.pop(printed[0]))
                    sys.stdout.flush()
                    printed[0] += 1
            return HostResult(t.alias)

        run_fleet(list(range(len(work))), lambda i: work[i].target.alias, one, parallel=CHECK_PARALLEL)
    codes = [o["code"] for a, o in outcomes.items() if "error" not in o]
    errors = [HostResult(a, error=o["error"], code=o["code"]) for a, o in outcomes.items() if "error" in o]
    return codes, errors
