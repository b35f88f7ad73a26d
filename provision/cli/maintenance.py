"""fab maintenance.on / maintenance.off: nginx answers visitors 503 and a page while the flag file
(root's, see provision/layout.py) is there; the app keeps running and deploys keep working."""

from __future__ import annotations

from ..errors import ProvisionError
from ..fleet import run_fleet
from ..hosts import Job, jobs
from ..output import Printer
from ..processes import maintenance_steps
from ..runner import HostResult, run_steps
from . import connect_job, exit_for_failures, guarded


@guarded
def set_maintenance(c, on: bool, message: str | None = None) -> None:
    printer = Printer()

    def one(job: Job) -> HostResult:
        remote = connect_job(job, c)
        try:
            r = run_steps(remote, maintenance_steps(job.settings.layout, on, message), printer=printer)
        except ProvisionError as e:  # this host's problem; the others go on
            r = HostResult(job.target.alias, error=str(e), code=e.code)
        finally:
            remote.close()
        if not r.failed:
            printer.line(f"{job.target.alias}: maintenance " + ("on: visitors get 503 and the maintenance page" if on
                                                                 else "off: visitors reach the app"))
        return r

    exit_for_failures(run_fleet(jobs(c, {}), lambda j: j.target.alias, one), printer)
