"""One host's checks in a pytest session of its own: `fab check` on several hosts runs one of these
per host, in parallel (``python -m provision.checks.worker``), each with its own connection, and
prints each host's output whole. pytest runs one session per process, so hosts in parallel means
processes; a session costs about 0.3 s of CPU, far less than the SSH round trips of a host's checks.

Its instructions come as JSON on stdin (never in a command line): the host (alias, app settings,
how to connect: host key checked as for every connection provision opens), the check paths, the
rootdir, extra pytest arguments, and a file for the outcome: {"code": pytest's exit code} or
{"error": the one line a refused connection gives, "code": its exit code}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ProvisionError
from ..ssh import connect
from .plugin import CheckHost, CheckHosts, main


def spec(target, settings: dict, sudo: bool, paths: list[str], rootdir: Path, extra_args: list[str] | None,
         result: Path) -> str:
    """The instructions for one host's worker (``target``: its inventory Target)."""
    return json.dumps({"alias": target.alias, "settings": settings, "sudo": sudo, "paths": paths,
                       "rootdir": str(rootdir), "extra_args": extra_args or [], "result": str(result),
                       "connect": {"host": target.host, "user": target.user, "port": target.port, "key": target.key,
                                   "known_hosts": target.known_hosts}})


def run(s: dict) -> int:
    def opener():
        return connect(**s["connect"], label=s["alias"])

    hosts = CheckHosts([CheckHost(s["alias"], s["settings"], opener, sudo=s["sudo"])])
    code = main(hosts, s["paths"], Path(s["rootdir"]), s["extra_args"])
    error: ProvisionError | None = hosts.errors().get(s["alias"])
    outcome = {"code": code} if error is None else {"code": error.code, "error": str(error)}
    Path(s["result"]).write_text(json.dumps(outcome))
    return code


if __name__ == "__main__":
    sys.exit(run(json.load(sys.stdin)))
