"""`fab git.setup`: push-to-deploy on the selected hosts (provision/push.py decides what goes there);
then `git push production main` deploys on the host itself (provision/receive.py)."""

from __future__ import annotations

from invoke import Exit

from ..app import proxy_env
from ..fleet import exit_code, run_fleet
from ..hosts import Job, jobs
from ..output import Printer, summary_line, summary_table
from ..push import package_files, record, remote_hint, remote_url, setup_steps
from ..runner import HostResult, run_steps
from . import guarded, on_host


@guarded
def run_setup(c, verbose: bool = False, dry_run: bool = False, accept_new_host_key: bool = False) -> list[HostResult]:
    """Set up push-to-deploy on every selected host; print each host's remote URL."""
    printer = Printer(verbose=verbose)
    files = package_files()
    plans = []
    for job in jobs(c, {}):  # everything decided locally, before any host is touched
        s, t = job.settings, job.target
        ca = s.ca_bundle.read_text() if s.ca_bundle else None
        plans.append((job, setup_steps(s, t.user, record(s, t.alias, t.vars, ca), files)))
    urls = {}

    def one(plan) -> HostResult:
        job, steps = plan
        t = job.target
        r, remote = on_host(printer, job, c, accept_new_host_key, lambda remote: run_steps(
            remote, steps, dry_run=dry_run, printer=printer, env=proxy_env(job.settings)))
        if remote is not None:
            printer.line(summary_line(r, dry_run))
        if not r.failed:
            urls[t.alias] = remote_url(t.user, t.host, t.port, job.settings.layout.git_repo)
        return r

    results = run_fleet(plans, lambda p: p[0].target.alias, one)
    summary_table(results, printer)
    for job, _ in plans:
        if job.target.alias in urls and not dry_run:
            printer.line(f"{job.target.alias}: push to deploy {job.settings.name} (branch "
                         f"{job.settings.git_branch}):\n  " + remote_hint(urls[job.target.alias], job.target.key,
                                                                          remote_name(job, plans)).replace("\n", "\n  "))
    code = exit_code(results)
    if code:
        raise Exit(code=code)
    return results


def remote_name(job: Job, plans) -> str:
    """``production`` for one host; each host's alias when several are set up."""
    return "production" if len(plans) == 1 else job.target.alias
