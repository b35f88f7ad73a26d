"""A push's deploy, on the host: the program the app's pre-receive hook runs as root
(``layout.PUSH_PROGRAM``; see provision/push.py), the pushed commit's tree as a tar on stdin.

It unpacks the tree into a fresh root-only folder under /var/tmp (removed whatever happens),
reads ``app:`` from the tree's fabric.yaml (as fab does), layers the settings `fab git.setup`
recorded for this host over it, and runs the same deploy as `fab deploy` (provision.app.Deploy,
the runner, the deploy lock) against the host itself through provision.local. Its lines go to
stdout as they come (the pusher sees them as ``remote: ...``); it exits non-zero when the deploy
fails, which rejects the push.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import config as cfg
from . import secrets
from .app import Deploy, proxy_env
from .errors import ProvisionError
from .layout import PUSH_TMP, Layout
from .local import Local
from .lock import Lock
from .output import Printer, summary_line
from .push import host_raw
from .render import NAMES as TEMPLATES
from .runner import run_steps
from .source import PROJECT_FILES, deploy_files, scan

CONFIG_FILES = ("fabric.yaml", "fabric.yml")


def project_app(tree: Path, short: str) -> dict:
    """``app:`` of the tree's fabric.yaml, read as invoke reads it (yaml.safe_load)."""
    from invoke.util import yaml
    path = next((tree / n for n in CONFIG_FILES if (tree / n).is_file()), None)
    if path is None:
        raise ProvisionError(f"commit {short} has no fabric.yaml at the top of the repository; commit one with "
                             "the app's settings (`python -m provision init` writes it)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path.name} of commit {short}" + (f", line {mark.line + 1}" if mark else "")
        raise ProvisionError(f"{where}: {' '.join(str(getattr(e, 'problem', None) or e).split())}; fix the YAML "
                             "and push again")
    app = data.get("app") if isinstance(data, dict) else None
    if app is None:
        app = {}
    if not hasattr(app, "keys"):
        raise ProvisionError(f"`app` in {path.name} of commit {short} must be a mapping of settings (name: value "
                             f"lines), not a {type(app).__name__}; fix it and push again")
    return dict(app)


def deploy(rec: dict, tar, sha: str, branch: str, pusher: str, work: Path, printer: Printer) -> int:
    """Deploy the tree read from ``tar`` (commit ``sha``), unpacked under ``work``."""
    short, label = sha[:7], rec.get("label") or rec["app"]
    tree = work / "tree"
    tree.mkdir()
    untar = subprocess.run(["tar", "-x", "--no-same-owner", "-f", "-", "-C", str(tree)], stdin=tar,
                           capture_output=True, text=True)
    if untar.returncode != 0:
        raise ProvisionError(f"cannot unpack commit {short}: {untar.stderr.strip()[-300:]}")
    ca_file = None
    if rec.get("ca_bundle"):
        ca_file = work / "ca-bundle.pem"
        ca_file.write_text(rec["ca_bundle"])
    s = cfg.build(host_raw(project_app(tree, short), rec, str(ca_file) if ca_file else None), tree)
    if s.name != rec["app"]:
        raise ProvisionError(f"fabric.yaml of commit {short} names the app {s.name!r}, but this repository deploys "
                             f"{rec['app']!r}; push {s.name} to its own repository (fab git.setup)")
    own = [*(tree / f for f in PROJECT_FILES), *(s.templates / n for n in TEMPLATES)]
    source = scan(s.source, deploy_files(s.source, own), tuple((p, deploy_files(p, own)) for p in s.include))
    source = dataclasses.replace(source, revision=short, dirty=False, untracked=())
    rid = source.release_id()
    host = socket.gethostname()
    origin = {"commit": sha, "via": "push", "branch": branch, "pusher": pusher}
    holder = {"user": pusher, "machine": f"{host} (git push)", "action": "deploy", "release": rid,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    printer.line(f"{label}: deploying commit {short} of {branch} as release {rid}")
    r = run_steps(Local(label), Deploy(s, source, rid, f"{pusher}@{host} (git push)", origin), printer=printer,
                  env=proxy_env(s), lock=Lock(s.layout, holder))
    printer.line(summary_line(r, False))
    if r.failed:
        printer.line(f"{label}: push refused: commit {short} is not deployed, {branch} stays where it was")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="provision-receive", description=__doc__.splitlines()[0])
    ap.add_argument("--app", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--branch", required=True)
    args = ap.parse_args(argv)
    printer = Printer(stream=sys.stdout)
    for sig in (signal.SIGHUP, signal.SIGTERM):  # the push went away: the temporary tree goes too (finally)
        signal.signal(sig, lambda n, _: sys.exit(128 + n))
    if os.geteuid() != 0:
        printer.error("the push's deploy runs as root (the hook runs it through sudo -n); check the hook")
        return 2
    if cfg.name_problem(args.app):
        printer.error(f"bad app name {args.app!r}")
        return 2
    work = None
    try:
        try:
            rec = json.loads(Path(Layout(args.app).push_settings).read_text())
        except (OSError, ValueError) as e:
            raise ProvisionError(f"cannot read this host's settings of {args.app} ({e}); run fab git.setup again")
        secrets.remember(cfg.secret_values(rec.get("vars") or {}))
        work = Path(tempfile.mkdtemp(prefix="provision-push-", dir=PUSH_TMP))  # 0700, root's
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # the source's hash cache: nothing kept in root's home
        # the tree is not a checkout: git, asked by the source scan, never looks for one above it (in
        # /var/tmp, where any user may create a .git whose config would run commands as root)
        os.environ["GIT_CEILING_DIRECTORIES"] = str(work)
        return deploy(rec, sys.stdin.buffer, args.commit, args.branch, os.environ.get("SUDO_USER") or "root", work,
                      printer)
    except ProvisionError as e:
        printer.error(str(e))
        return e.code
    except KeyboardInterrupt:
        printer.error("interrupted")
        return 130
    except BrokenPipeError:  # the pusher went away: the deploy stopped after its step, as when fab is interrupted
        return 141
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
