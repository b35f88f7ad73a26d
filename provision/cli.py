"""What the fab tasks do, kept out of the fabfile so it stays thin.

Every task validates everything it can locally (inventory, settings, source,
templates) for every selected host before it opens a connection, so bad
input never leaves a half-changed host.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from invoke import Exit

from . import config as cfg
from .app import deploy_steps, provision_steps, proxy_env, rollback_steps
from .errors import ProvisionError
from .executor import HostResult, Printer, connect, gather, run_steps
from .release import current_release
from .script import Lock
from .inventory import Inventory, Target
from .source import scan

SANDBOX_INVENTORY = ".sandbox/inventory.ini"
DEFAULT_INVENTORY = f"inventory.ini,{SANDBOX_INVENTORY}"


@dataclass
class Job:
    target: Target
    settings: cfg.Settings


def inventory_paths(c, project: Path) -> list[Path]:
    names = c.config.get("inventory", None) or DEFAULT_INVENTORY
    if isinstance(names, str):
        names = names.split(",")
    return [project / Path(n.strip()).expanduser() for n in names if n.strip()]


def selection(c) -> str:
    host = getattr(c, "original_host", None)
    if not host:
        raise ProvisionError("no hosts selected; pass -H ALIAS, -H GROUP or -H user@host[:port] "
                             "(see `fab inventory`)")
    return host


def jobs(c, project: Path, flags: dict) -> list[Job]:
    inv = Inventory.load(inventory_paths(c, project))
    key_flag = (c.config.connect_kwargs.get("key_filename") or [None])
    key_flag = key_flag[0] if isinstance(key_flag, list) else key_flag
    targets = inv.resolve(selection(c), default_user=c.config.user or "root",
                          default_port=int(c.config.port or 22))
    env_app = dict(getattr(c.config, "_env", {}).get("app", {}))
    out = []
    for t in targets:
        if key_flag:
            t = Target(t.alias, t.host, t.user, t.port, key_flag, t.known_hosts, t.vars)
        raw = cfg.layer(dict(c.config.app), env_app, t.vars, flags)
        out.append(Job(t, cfg.build(raw, project)))
    return out


def _connect(job: Job, c):
    t = job.target
    return connect(t.host, t.user, t.port, t.key, t.known_hosts, config=c.config, label=t.alias)


def _finish(results: list[HostResult], printer: Printer, json_file: str | None = None) -> None:
    printer.line(f"{'host':<20} {'ok':>4} {'changed':>8} {'failed':>7} {'time':>7}")
    for r in results:
        printer.line(f"{r.host:<20} {r.ok:>4} {r.changed:>8} {int(r.failed):>7} {r.duration:>6.1f}s")
    if json_file:
        Path(json_file).write_text(printer.mask(json.dumps([
            {"host": r.host, "ok": r.ok, "changed": r.changed, "failed": r.failed, "duration": round(r.duration, 3),
             "round_trips": r.round_trips, "changed_steps": r.changed_steps(), "error": r.error}
            for r in results], indent=2)) + "\n")
    if any(r.failed for r in results):
        raise Exit(code=1)


def _summary_line(r: HostResult, dry_run: bool) -> str:
    if dry_run:
        n = sum(1 for p in r.planned if p.status == "change")
        return (f"{r.host}: dry run: {n} step(s) would change, nothing was touched ({r.duration:.1f}s)" if n else
                f"{r.host}: dry run: nothing would change ({r.duration:.1f}s)")
    if r.failed:
        return f"{r.host}: FAILED after {r.changed} change(s) ({r.duration:.1f}s)"
    if r.changed == 0:
        return f"{r.host}: no changes, nothing restarted (ok={r.ok}, {r.duration:.1f}s)"
    return f"{r.host}: {r.changed} changed, ok={r.ok} ({r.duration:.1f}s)"


def guarded(fn):
    """Turn user-caused errors into one line and an exit code, no traceback."""

    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ProvisionError as e:
            raise Exit(f"error: {e}", code=e.code)
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def deployer() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def lock_for(s: cfg.Settings, action: str, release: str, break_lock: bool) -> Lock:
    holder = {"user": getpass.getuser(), "machine": socket.gethostname(), "action": action, "release": release,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    return Lock(f"/run/lock/provision-{s.name}.lock", holder, break_lock)


@guarded
def run_apply(c, project: Path, flags: dict, *, mode: str = "deploy", dry_run: bool = False, verbose: bool = False,
              json_file: str | None = None, break_lock: bool = False, to: str | None = None) -> list[HostResult]:
    """deploy, provision or rollback the selected hosts."""
    start = time.monotonic()
    work = jobs(c, project, flags)
    plans = []
    for job in work:  # decide everything locally before touching any host
        s = job.settings
        if mode == "deploy":
            source = scan(s.source)
            rid = source.release_id()
            steps = deploy_steps(s, source, rid, deployer())
        elif mode == "rollback":
            rid = to or "previous release"
            steps = rollback_steps(s, to, deployer())
        else:
            rid, steps = "-", provision_steps(s)
        plans.append((job, steps, lock_for(s, mode, rid, break_lock)))
    printer = Printer(verbose=verbose, secrets=tuple(x for job in work for x in job.settings.secrets))
    results = []
    for job, steps, lock in plans:
        remote = _connect(job, c)
        try:
            r = run_steps(remote, steps, dry_run=dry_run, printer=printer, env=proxy_env(job.settings), lock=lock)
        finally:
            remote.conn.close()
        results.append(r)
        printer.line(_summary_line(r, dry_run))
        if verbose:
            printer.line(f"{r.host}: {r.round_trips} SSH round trip(s)")
    if verbose:
        printer.line(f"total {time.monotonic() - start:.2f}s")
    _finish(results, printer, json_file)
    return results


@guarded
def run_checks(c, project: Path, flags: dict, extra_args: list[str] | None = None) -> int:
    import pytest

    work = jobs(c, project, flags)
    by_alias = {}
    lines = []
    for job in work:
        t, s = job.target, job.settings
        by_alias[t.alias] = {
            "name": s.name, "root": s.root, "user": s.user, "server_name": s.server_name,
            "health_path": s.health_path,
        }
        lines += [f"Host {t.alias}", f"  HostName {t.host}", f"  User {t.user}", f"  Port {t.port}"]
        if t.key:
            lines.append(f"  IdentityFile {t.key}")
    checks_pkg = Path(__file__).parent / "checks"
    paths = [str(checks_pkg)]
    user_dirs = sorted({str(j.settings.checks) for j in work if j.settings.checks.is_dir()})
    paths += user_dirs
    with tempfile.TemporaryDirectory(prefix="provision-check-") as tmp:
        ssh_config = Path(tmp) / "ssh_config"
        ssh_config.write_text("\n".join(lines) + "\n")
        os.environ["PROVISION_CHECK_SETTINGS"] = json.dumps(by_alias)
        hosts = ",".join(f"paramiko://{j.target.alias}" for j in work)
        sudo = ["--sudo"] if any(j.target.user != "root" for j in work) else []
        args = [*paths, f"--hosts={hosts}", f"--ssh-config={ssh_config}", "-c", str(checks_pkg / "pytest.ini"),
                f"--rootdir={project}", "-p", "no:cacheprovider", "-p", "provision.checks.plugin",
                "-v", "--no-header", "--tb=short", "-W", "ignore::UserWarning", *sudo, *(extra_args or [])]
        code = pytest.main(args)
    if code != 0:
        raise Exit(code=int(code))
    return 0


@guarded
def show_inventory(c, project: Path) -> None:
    inv = Inventory.load(inventory_paths(c, project))
    for t in inv.resolve(selection(c), default_user=c.config.user or "root", default_port=int(c.config.port or 22)):
        extra = " ".join(f"{k}={v}" for k, v in sorted(t.vars.items()))
        print(f"{t.alias:<16} {t.address:<32} key={t.key or '-'} {extra}".rstrip())


# -- sandbox ------------------------------------------------------------------
def _sandbox():
    from .sandbox import Sandbox, can_run

    reason = can_run()
    if reason:
        raise ProvisionError(f"cannot run sandbox droplets here: {reason}")
    return Sandbox()


def _write_sandbox_inventory(sb, project: Path) -> Path:
    path = project / SANDBOX_INVENTORY
    path.parent.mkdir(exist_ok=True)
    path.write_text(sb.inventory())
    return path


@guarded
def sandbox_up(project: Path, names: list[str]) -> list:
    sb = _sandbox()
    sb.prepare()
    out = []
    for name in names:
        t0 = time.monotonic()
        d = sb.up(name)
        out.append(d)
        print(f"{d.name}: up at {d.address} in {time.monotonic() - t0:.1f}s  "
              f"(ssh -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} root@{d.address})")
    inv = _write_sandbox_inventory(sb, project)
    print(f"inventory: {inv} (use -H {names[0] if names else 'sandbox'} or -H sandbox)")
    return out


@guarded
def sandbox_down(project: Path, names: list[str], everything: bool = False) -> None:
    sb = _sandbox()
    gone = sb.down_all() if everything else [n for n in names if sb.down(n)]
    for n in names:
        if n not in gone and not everything:
            print(f"{n}: no such droplet", file=sys.stderr)
    for n in gone:
        print(f"{n}: destroyed")
    _write_sandbox_inventory(sb, project)


@guarded
def sandbox_list(project: Path) -> None:
    sb = _sandbox()
    for d in sb.list():
        state = "running" if d.running() else "stopped"
        print(f"{d.name:<16} {d.address:<15} {state:<8} pid={d.pid} key={sb.key}")


@guarded
def sandbox_info(name: str) -> None:
    sb = _sandbox()
    d = sb.get(name)
    if d is None or not d.running():
        raise ProvisionError(f"no running droplet {name!r}; start it with `fab sandbox.up --name {name}`")
    print(f"URL:  http://{d.address}/")
    print(f"SSH:  ssh -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} root@{d.address}")
    print(f"Stop: fab sandbox.down --name {name}")


@guarded
def show_releases(c, project: Path) -> None:
    for job in jobs(c, project, {}):
        s = job.settings
        remote = _connect(job, c)
        try:
            keys = [("ls", f"{s.root}/releases"), ("content", f"{s.root}/releases.log"), ("file", f"{s.root}/current")]
            facts = gather(remote, keys)
        finally:
            remote.conn.close()
        live = current_release(s, facts)
        log: dict[str, dict] = {}
        for line in (facts.content(f"{s.root}/releases.log") or "").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            log.setdefault(entry.get("release"), entry) if entry.get("action") == "deploy" else None
        names = [n for n in facts.ls(f"{s.root}/releases") or [] if not n.endswith(".provision-tmp")]
        print(f"{job.target.alias}: {len(names)} release(s) in {s.root}/releases")
        for n in sorted(names):
            e = log.get(n, {})
            who = f"deployed {e['time']} by {e.get('by') or '?'}" if e else ""
            print(f"  {'*' if n == live else ' '} {n:<40} {who}".rstrip())
