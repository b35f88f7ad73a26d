"""The sandbox tasks: local droplets (systemd-nspawn) for tests and the demo. Off the deploy path:
:mod:`provision.sandbox` is imported only by these."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..droplets import without_created
from ..errors import ProvisionError
from ..hosts import SANDBOX_INVENTORY, project
from . import guarded


def _sandbox():
    from ..sandbox import Sandbox, can_run

    reason = can_run()
    if reason:
        raise ProvisionError(f"cannot run sandbox droplets here: {reason}")
    return Sandbox()


def _write_sandbox_inventory(sb, c) -> Path:
    path = project(c) / SANDBOX_INVENTORY
    path.parent.mkdir(exist_ok=True)
    made = project(c) / "inventory.ini"  # droplet.create's lines for sandbox droplets win over the sandbox's
    path.write_text(without_created(sb.inventory(), made.read_text() if made.exists() else ""))
    return path


@guarded
def sandbox_up(c, names: list[str], snapshot: str | None = None, parallel: int = 8,
               containers: str | None = None) -> list:
    """``containers``: None, or the container engine to make ready in each droplet (docker, podman)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..sandbox import ENGINES

    if containers is not None and containers not in ENGINES:
        raise ProvisionError(f"unknown container engine {containers!r}: use --containers or --engine "
                             f"{' or --engine '.join(ENGINES)}")
    sb = _sandbox()
    t0 = time.monotonic()
    out = sb.up_many(names, snapshot=snapshot, workers=parallel, containers=containers is not None)
    took = [None] * len(out)
    if containers:  # each droplet's engine made ready at once (apt through the proxy, the image imported)
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(out)))) as pool:
            took = list(pool.map(lambda d: sb.engine_ready(d, containers), out))
    for d, seconds in zip(out, took):
        ready = f", {containers} ready with {sb.image_name} in {seconds:.1f}s" if containers else ""
        print(f"{d.name}: up at {d.address}" + (f" from snapshot {snapshot}" if snapshot else "") + ready +
              f"  (ssh -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} root@{d.address})")
    print(f"{len(out)} droplet(s) up in {time.monotonic() - t0:.1f}s")
    inv = _write_sandbox_inventory(sb, c)
    print(f"inventory: {inv} (use -H {names[0] if names else 'sandbox'} or -H sandbox)")
    return out


@guarded
def sandbox_snapshot(c, name: str, snapshot: str | None, drop: bool = False) -> None:
    if not snapshot:
        raise ProvisionError("name the snapshot: fab sandbox.snapshot --name DROPLET --snapshot NAME")
    sb = _sandbox()
    if drop:
        if not sb.drop_snapshot(snapshot):
            raise ProvisionError(f"no snapshot {snapshot!r}; `fab sandbox.list` shows them")
        print(f"snapshot {snapshot}: removed")
        return
    t0 = time.monotonic()
    layer = sb.snapshot(name, snapshot)
    print(f"{name}: snapshot {snapshot} taken in {time.monotonic() - t0:.1f}s ({layer}); droplet released. "
          f"Start droplets from it: fab sandbox.up --name NAME --snapshot {snapshot}")
    _write_sandbox_inventory(sb, c)


@guarded
def sandbox_down(c, names: list[str], everything: bool = False) -> None:
    sb = _sandbox()
    gone = sb.down_all() if everything else sb.down_many(names)
    for n in names:
        if n not in gone and not everything:
            print(f"{n}: no such droplet", file=sys.stderr)
    for n in gone:
        print(f"{n}: destroyed")
    _write_sandbox_inventory(sb, c)


@guarded
def sandbox_list(c) -> None:
    sb = _sandbox()
    for d in sb.list():
        state = "running" if d.running() else "stopped"
        origin = f" snapshot={d.snapshot}" if d.snapshot else ""
        print(f"{d.name:<16} {d.address:<15} {state:<8} pid={d.pid}{origin} key={sb.key}")
    for s in sb.list_snapshots():
        print(f"snapshot {s}")


@guarded
def sandbox_info(name: str) -> None:
    sb = _sandbox()
    d = sb.get(name)
    if d is None or not d.running():
        raise ProvisionError(f"no running droplet {name!r}; start it with `fab sandbox.up --name {name}`")
    print(f"URL:  http://{d.address}/")
    print(f"SSH:  ssh -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} root@{d.address}")
    print(f"Stop: fab sandbox.down --name {name}")
