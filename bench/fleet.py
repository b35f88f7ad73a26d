"""The big-fleet figures of `make bench` (bench/run --fleet N): `fab deploy` to N droplets at once.

One droplet gets examples/hello deployed and becomes a snapshot (Sandbox.snapshot); N droplets boot
from it in parallel (that time is reported), so the figures do not spend minutes on apt. Then, with
fab's default parallelism, each run times a no-op deploy to all N and a deploy of a one-line code
change to all N (a new release and the blue/green switch on every host); medians/min/max over the
runs. Every droplet and the snapshot are torn down by name at the end, also on failure.

Targets (issue 13, on a 2-core machine): no-op to 50 at most 3 s, a one-line change at most 8 s.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAB = str(Path(sys.executable).with_name("fab"))
PREFIX = os.environ.get("PROVISION_TEST_PREFIX", "")  # of droplet names, beside other runs on this machine
# Inventory vars of the fleet group: what the reference job runs on each host (see README, Performance).
FLEET_VARS: dict[str, str] = {}


def deploy_all(selection: str, source: Path, env: dict, report: Path, expect_changed: bool) -> float:
    """Wall time of `fab -H selection deploy`; exits with fab's output when a host failed or the
    deploy changed something it should not have (or nothing it should have)."""
    t0 = time.perf_counter()
    res = subprocess.run([FAB, "-H", selection, "deploy", "--source", str(source), "--json", str(report)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    summary = json.loads(report.read_text()) if report.exists() else []
    wrong = [r["host"] for r in summary if r["failed"] or bool(r["changed"]) != expect_changed]
    if res.returncode != 0 or wrong or not summary:
        sys.exit(f"bench: deploy to {selection} went wrong on {', '.join(wrong) or 'the run'}:\n"
                 f"{res.stdout[-4000:]}{res.stderr[-4000:]}")
    return elapsed


def fleet(sb, n: int, runs: int) -> dict:
    """Boot n droplets from a snapshot of a deployed one; time no-op and one-line-change deploys to all."""
    from provision.fleet import DEFAULT_PARALLEL

    origin, snapshot = f"{PREFIX}fleet-origin", f"{PREFIX}fleet"
    names = [f"{PREFIX}fleet{i:02d}" for i in range(n)]
    figures: dict = {"droplets": n, "runs": runs, "parallel": DEFAULT_PARALLEL, "vars": FLEET_VARS,
                     "noop": [], "change": [], "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="provision-bench-") as t:
        tmp = Path(t)
        app = tmp / "hello"
        shutil.copytree(ROOT / "examples/hello", app)
        inventory = tmp / "inventory.ini"
        env = dict(os.environ, FABRIC_INVENTORY=str(inventory))
        group_vars = "".join(f"{k}={v}\n" for k, v in FLEET_VARS.items())

        def write_inventory() -> None:
            hosts = [d.name for d in sb.list() if d.name in (origin, *names)]
            inventory.write_text(sb.inventory() + "\n[fleet]\n" + "\n".join(hosts) + "\n"
                                 + (f"\n[fleet:vars]\n{group_vars}" if group_vars else ""))

        try:
            sb.up(origin)
            write_inventory()
            deploy_all("fleet", app, env, tmp / "origin.json", expect_changed=True)
            sb.snapshot(origin, snapshot)
            t0 = time.perf_counter()
            sb.up_many(names, snapshot=snapshot)
            figures["boot"] = time.perf_counter() - t0
            write_inventory()
            print(f"fleet: {n} droplets booted from a snapshot in {figures['boot']:.1f}s", flush=True)
            app_py = app / "app.py"
            for i in range(runs):
                noop = deploy_all("fleet", app, env, tmp / "noop.json", expect_changed=False)
                app_py.write_text(app_py.read_text().replace("Hello", "Hi", 1) if i % 2 == 0
                                  else app_py.read_text().replace("Hi", "Hello", 1))
                change = deploy_all("fleet", app, env, tmp / "change.json", expect_changed=True)
                figures["noop"].append(noop)
                figures["change"].append(change)
                print(f"fleet run {i + 1}/{runs}: no-op to {n} {noop:.2f}s, one-line change to {n} {change:.2f}s",
                      flush=True)
        finally:
            sb.down_many([origin, *names])
            sb.drop_snapshot(snapshot)
    figures["load_after"] = os.getloadavg()[0]
    print(f"{'fleet of ' + str(n):<14} {'median':>8} {'min':>8} {'max':>8}   ({runs} runs, parallel "
          f"{DEFAULT_PARALLEL}, load {figures['load_before']:.1f} before, {figures['load_after']:.1f} after)")
    for key, label in (("noop", "no-op"), ("change", "code change")):
        v = figures[key]
        print(f"{label:<14} {statistics.median(v):>7.2f}s {min(v):>7.2f}s {max(v):>7.2f}s")
    print(f"boot of {n} from a snapshot: {figures['boot']:.1f}s")
    return figures


if __name__ == "__main__":  # python bench/fleet.py [N] [RUNS]: the fleet figures alone
    sys.path.insert(0, str(ROOT))
    from provision.sandbox import Sandbox

    fleet(Sandbox(), int(sys.argv[1]) if len(sys.argv) > 1 else 50, int(sys.argv[2]) if len(sys.argv) > 2 else 3)
