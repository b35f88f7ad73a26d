"""Container deploys against virtualenv deploys of the same app, on fresh sandbox droplets (run as root):

    .venv/bin/python bench/containers.py [--runs 3] [--prefix bench-cont-] [--engine docker]

The app is examples/hello (Flask). As a virtualenv app it deploys as usual (Flask from PyPI through
the proxy, gunicorn added); as a container app (``container: true``) its Dockerfile starts FROM
localhost/debian:12 (the container droplet's base image: no registry here) and installs Debian's
python3-flask and gunicorn through the proxy (a build argument), then copies app.py. Each is timed:
fresh (the first deploy; the container droplet's engine is already there, made ready by the
sandbox), no-op, a one-line code change and a rollback (each until the text answers through nginx),
on --runs fresh droplets of each kind. Medians, min and max, every run printed. `make bench` runs it
too (bench/run --containers N).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision.sandbox import Sandbox  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from push import answers  # noqa: E402

FAB = str(Path(sys.executable).with_name("fab"))
DOCKERFILE = """FROM localhost/debian:12
ARG http_proxy
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-flask gunicorn >/dev/null \\
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY app.py /app/app.py
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "app:app"]
"""


def fab(inventory: Path, *args: str, env: dict) -> float:
    t0 = time.monotonic()
    res = subprocess.run([FAB, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "FABRIC_INVENTORY": str(inventory), **env})
    if res.returncode != 0:
        raise SystemExit(f"fab {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return time.monotonic() - t0


def measure(sb: Sandbox, name: str, container: bool, engine: str, runs: int, work: Path) -> dict:
    """``runs`` fresh droplets, each: a fresh deploy, a no-op, a one-line change, a rollback."""
    out = {"fresh": [], "no-op": [], "change": [], "rollback": []}
    for i in range(runs):
        app = work / f"{'container' if container else 'venv'}-{i}"
        shutil.copytree(ROOT / "examples/hello", app)
        if container:
            (app / "Dockerfile").write_text(DOCKERFILE)
        d = sb.up(f"{name}{i}", containers=container)
        inventory = work / f"{name}{i}.ini"
        inventory.write_text(sb.inventory())
        env = {"FABRIC_APP_NAME": "hello", "FABRIC_APP_SOURCE": str(app), **(
            {"FABRIC_APP_CONTAINER": "true", "FABRIC_APP_ENGINE": engine} if container else {})}
        try:
            if container:
                out.setdefault("engine ready (sandbox)", []).append(sb.engine_ready(d, engine))
            t0 = time.monotonic()
            fab(inventory, "-H", d.name, "deploy", env=env)
            answers(d.address, "Hello from provision!\n")
            out["fresh"].append(time.monotonic() - t0)
            out["no-op"].append(fab(inventory, "-H", d.name, "deploy", env=env))
            body = (ROOT / "examples/hello/app.py").read_text().replace("Hello from provision!", f"Hello change {i}")
            (app / "app.py").write_text(body)
            t0 = time.monotonic()
            fab(inventory, "-H", d.name, "deploy", env=env)
            answers(d.address, f"Hello change {i}\n")
            out["change"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            fab(inventory, "-H", d.name, "rollback", env=env)
            answers(d.address, "Hello from provision!\n")
            out["rollback"].append(time.monotonic() - t0)
        finally:
            sb.down(d.name)
    return out


def compare(sb: Sandbox, runs: int, engine: str = "docker", prefix: str = "bench-cont-") -> dict:
    """The virtualenv deploys of examples/hello, then the container deploys of the same app."""
    with tempfile.TemporaryDirectory() as tmp:
        results = {"virtualenv": measure(sb, prefix + "venv", False, engine, runs, Path(tmp)),
                   f"container ({engine})": measure(sb, prefix + "c", True, engine, runs, Path(tmp))}
    for kind, res in results.items():
        for what, times in res.items():
            print(f"{kind:<20} {what:<24} median {statistics.median(times):6.2f}s  min {min(times):6.2f}s  "
                  f"max {max(times):6.2f}s   runs: " + " ".join(f"{t:.2f}" for t in times))
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prefix", default="bench-cont-")
    p.add_argument("--engine", default="docker")
    a = p.parse_args()
    sb = Sandbox()
    sb.prepare()
    compare(sb, a.runs, a.engine, a.prefix)

if __name__ == "__main__":
    main()
