"""The scale figures of `make bench` (issue 13): a big app's deploys and a 200 MB file, each on a fresh
sandbox droplet, with what each `fab deploy` costs beside its wall time: fab's peak memory (its
rusage) and the bytes sent to the droplet (the kernel's count on the droplet's end of the bridge,
SSH's own overhead included).

    big_app(sb, runs)    fresh / no-op / one-line change of bench/bigapp.py's app (3,000 files, 36 MB)
    big_file(sb, runs)   a 200 MB file added to a deployed app, then one of its megabytes changed
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bigapp import make_big_app, make_big_file, touch_one_line

ROOT = Path(__file__).resolve().parents[1]
FAB = str(Path(sys.executable).with_name("fab"))


@dataclass
class Run:
    seconds: float
    rss_mb: float
    sent_mb: float


def sent_bytes(veth: str) -> int:
    """Bytes this machine sent into the droplet's end of its veth pair."""
    return int(Path(f"/sys/class/net/{veth}/statistics/tx_bytes").read_text())


def measured_deploy(host: str, veth: str, inventory: Path, source: Path) -> Run:
    env = dict(os.environ, FABRIC_INVENTORY=str(inventory))
    before = sent_bytes(veth)
    t0 = time.perf_counter()
    proc = subprocess.Popen([FAB, "-H", host, "deploy", "--source", str(source)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench: deploy of {source} to {host} failed:\n{out.decode(errors='replace')}")
    return Run(elapsed, usage.ru_maxrss / 1024, (sent_bytes(veth) - before) / 1e6)


@contextmanager
def fresh_droplet(sb, name: str):
    """A fresh droplet ``name`` and a temporary folder holding an inventory of it: (folder, droplet,
    inventory); the droplet is destroyed afterwards, also on failure."""
    with tempfile.TemporaryDirectory(prefix="provision-bench-") as t:
        tmp = Path(t)
        d = sb.up(name)
        try:
            inventory = tmp / "inventory.ini"
            inventory.write_text(sb.inventory())
            yield tmp, d, inventory
        finally:
            sb.down(name)


def table(title: str, rows: dict[str, list[Run]]) -> dict:
    print(f"{title:<22} {'median':>8} {'min':>8} {'max':>8} {'RSS MB':>8} {'sent MB':>8}")
    out = {}
    for label, runs in rows.items():
        s = [r.seconds for r in runs]
        rss, sent = max(r.rss_mb for r in runs), statistics.median(r.sent_mb for r in runs)
        print(f"{label:<22} {statistics.median(s):>7.2f}s {min(s):>7.2f}s {max(s):>7.2f}s {rss:>8.0f} {sent:>8.2f}")
        out[label] = {"median": statistics.median(s), "min": min(s), "max": max(s), "rss_mb_max": rss,
                      "sent_mb_median": sent, "runs": len(runs), "seconds": s}
    return out


def big_app(sb, runs: int) -> dict:
    """bench/bigapp.py's app on a fresh droplet per run: its fresh deploy, a no-op, a one-line change."""
    rows: dict[str, list[Run]] = {"big fresh": [], "big no-op": [], "big change": []}
    for i in range(runs):
        name = f"big{i}"
        with fresh_droplet(sb, name) as (tmp, d, inventory):
            app = make_big_app(tmp / "big")
            rows["big fresh"].append(measured_deploy(name, d.veth, inventory, app))
            rows["big no-op"].append(measured_deploy(name, d.veth, inventory, app))
            touch_one_line(app, f"Hello, big run {i}!")
            rows["big change"].append(measured_deploy(name, d.veth, inventory, app))
        print(f"big app run {i + 1}/{runs}: " + "  ".join(f"{k} {v[-1].seconds:.2f}s" for k, v in rows.items()),
              flush=True)
    return table(f"big app ({runs} runs)", rows)


def big_file(sb, runs: int, megabytes: int = 200) -> dict:
    """examples/hello deployed on a fresh droplet per run; then the same app with a 200 MB file
    (incompressible); then one megabyte of that file changed."""
    rows: dict[str, list[Run]] = {f"{megabytes} MB file added": [], "1 MB of it changed": []}
    for i in range(runs):
        name = f"file{i}"
        with fresh_droplet(sb, name) as (tmp, d, inventory):
            app = make_big_file(tmp / "app", megabytes)
            blob = (app / "model.bin").rename(tmp / "model.bin")
            measured_deploy(name, d.veth, inventory, app)
            blob.rename(app / "model.bin")
            rows[f"{megabytes} MB file added"].append(measured_deploy(name, d.veth, inventory, app))
            with open(app / "model.bin", "r+b") as fh:
                fh.seek(megabytes // 2 * 1_000_000)
                fh.write(os.urandom(1_000_000))
            rows["1 MB of it changed"].append(measured_deploy(name, d.veth, inventory, app))
        print(f"big file run {i + 1}/{runs}: " + "  ".join(f"{k} {v[-1].seconds:.2f}s" for k, v in rows.items()),
              flush=True)
    return table(f"{megabytes} MB file ({runs} runs)", rows)
