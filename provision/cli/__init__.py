"""What the fab tasks do (:mod:`provision.tasks` parses their arguments), one module per kind of
task: ``apply`` (deploy, provision, rollback), ``check``, ``info`` (status, releases, logs,
inventory), ``sandbox``. Here: what they share, and how a user's mistake ends a run (one line,
an exit code, no traceback).

Every task validates everything it can locally (inventory, settings, source, templates) for
every selected host before it opens a connection, so bad input never leaves a half-changed host.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from invoke import Exit
from invoke.config import AmbiguousMergeError
from invoke.util import yaml

from .. import secrets
from ..errors import ProvisionError
from ..fleet import exit_code
from ..hosts import Job
from ..output import Printer
from ..runner import HostResult
from ..ssh import Remote, connect


def connect_job(job: Job, c, accept_new_host_key: bool = False) -> Remote:
    t = job.target
    return connect(t.host, t.user, t.port, t.key, t.known_hosts, config=c.config, label=t.alias,
                   accept_new_host_key=accept_new_host_key)


def guarded(fn):
    """Turn user-caused errors into one line and an exit code, no traceback."""

    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ProvisionError as e:
            raise Exit(f"error: {secrets.mask(str(e))}", code=e.code)
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130)
        except BrokenPipeError:  # output piped into `head` and the like
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=0)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def config_error(error: BaseException, tb) -> str | None:
    """The one line for an error invoke raises while it reads its configuration, else None.

    Invoke reads fabric.yaml and FABRIC_* variables after importing the fabfile but
    before any task runs, so `guarded` cannot catch what goes wrong there."""
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark else "a config file"
        problem = getattr(error, "problem", None) or str(error)
        return f"{where}: {' '.join(problem.split())}; fix the YAML"
    if isinstance(error, AmbiguousMergeError):  # its message holds whole config sections: not shown
        return ("a config file (fabric.yaml) gives a list or a single value where a mapping is expected, "
                "or the reverse; fix the YAML")
    if any(frame.f_globals.get("__name__") == "invoke.env" for frame, _ in traceback.walk_tb(tb)):
        names = ", ".join(sorted(k for k in os.environ if k.startswith("FABRIC_")))
        return (f"cannot use the FABRIC_* environment variables ({names}): {' '.join(str(error).split())}; "
                "unset the wrong one, or set its value in fabric.yaml")
    return None


def _excepthook(kind, error, tb) -> None:
    """Python's hook for uncaught exceptions (sys.excepthook): errors of `config_error`
    end the process with one line and exit code 2; others print as usual.

    A hook returning leaves the process with code 1, so this one exits itself (os._exit,
    after flushing): no task has run, nothing is left to clean up."""
    message = config_error(error, tb)
    if message is None:
        return sys.__excepthook__(kind, error, tb)
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


# `fab` imports the fabfile, and so this module, before it reads fabric.yaml and FABRIC_* variables.
sys.excepthook = _excepthook


def host_failed(printer: Printer, host: str, e: ProvisionError) -> HostResult:
    """A host's own problem, said in its one line, as its result: the other hosts go on."""
    printer.error(str(e))
    return HostResult(host, error=str(e), code=e.code)


def on_host(printer: Printer, job: Job, c, accept_new_host_key: bool, work) -> tuple[HostResult, Remote | None]:
    """``work(remote)`` on a job's host over a connection of its own, closed after; a host's problem
    (unreachable, refused key, ...) becomes its result. Also the connection, None when none opened."""
    t0, remote = time.monotonic(), None
    try:
        remote = connect_job(job, c, accept_new_host_key)
        r = work(remote)
    except ProvisionError as e:
        r = host_failed(printer, job.target.alias, e)
    finally:
        if remote is not None:
            remote.close()
    r.duration = time.monotonic() - t0
    return r, remote


def exit_for_failures(results: list[HostResult], printer: Printer) -> None:
    for r in results:
        if r.failed:
            printer.error(r.error)
    code = exit_code(results)
    if code:
        raise Exit(code=code)
