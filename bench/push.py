"""Push-to-deploy against fab deploy, on fresh sandbox droplets (run as root, like make bench):

    .venv/bin/python bench/push.py [--runs 3] [--prefix bench-push-]

Per droplet: `fab git.setup` fresh and again, the size installed in /opt/provision, a first push
(the app's first deploy), then one-line changes of the app, each committed and then pushed (`git
push`), deployed (`fab deploy` from the same checkout) or shipped (`fab ship`: the app's two tests
run first, in a cached virtualenv), in turn; each timed from the command's start to the new content
answering through nginx. Prints medians (and every run); --json FILE writes them. `make bench`
(bench/run --push N) runs it too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision.layout import PUSH_HOME  # noqa: E402
from provision.sandbox import Sandbox  # noqa: E402
from provision.ssh import connect  # noqa: E402

FAB = str(Path(sys.executable).with_name("fab"))
KINDS = ("push one-line change", "fab deploy one-line change", "fab ship one-line change")
TESTS = """from app import app


def test_index():
    assert app.test_client().get("/").status_code == 200


def test_whoami():
    assert "pid" in app.test_client().get("/whoami").get_json()
"""


def answers(address: str, text: str, seconds: float = 60) -> None:
    """Returns once the app answers ``text`` (bounded)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with opener.open(f"http://{address}/", timeout=5) as r:
                if r.read().decode() == text:
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"{address} never answered {text!r}")


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.monotonic() - t0


def one_droplet(sb: Sandbox, name: str, changes: int, rows: dict) -> None:
    d = sb.up(name)
    try:
        with tempfile.TemporaryDirectory(prefix="provision-bench-push-") as t:
            tmp = Path(t)
            inv = tmp / "inventory.ini"
            inv.write_text(sb.inventory())
            repo = tmp / "hello"
            shutil.copytree(ROOT / "examples/hello", repo)
            (repo / "fabfile.py").write_text("from provision.tasks import ns\n")
            (repo / "fabric.yaml").write_text("tasks:\n  executor_class: provision.hosts.Executor\napp:\n  name: hello\n")
            (repo / "tests").mkdir()
            (repo / "tests/test_app.py").write_text(TESTS)
            env = {**os.environ, "FABRIC_INVENTORY": str(inv),
                   "GIT_SSH_COMMAND": f"ssh -F /dev/null -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} "
                                      "-o StrictHostKeyChecking=yes -o BatchMode=yes",
                   "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com", "GIT_COMMITTER_NAME": "b",
                   "GIT_COMMITTER_EMAIL": "b@example.com", "GIT_CONFIG_GLOBAL": "/dev/null"}
            rows["setup fresh"].append(run([FAB, "-H", name, "git.setup"], repo, env))
            rows["setup again"].append(run([FAB, "-H", name, "git.setup"], repo, env))
            remote = connect(d.address, "root", 22, str(sb.key), str(sb.known_hosts))
            try:
                rc, out, _ = remote.exec(f"du -sk {PUSH_HOME}")
            finally:
                remote.close()
            rows["installed KB"].append(float(out.split()[0]))
            git = lambda *a: run(["git", *a], repo, env)  # noqa: E731
            git("init", "-q", "-b", "main")
            git("add", "-A")
            git("commit", "-qm", "first")
            git("remote", "add", "production", f"ssh://root@{d.address}:22/var/lib/provision/git/hello.git")
            t0 = time.monotonic()
            git("push", "-q", "production", "main")
            answers(d.address, "Hello from provision!\n")
            rows["push first deploy"].append(time.monotonic() - t0)
            run([FAB, "-H", name, "ship"], repo, env)  # untimed: builds (or finds) the tests' virtualenv
            for i in range(len(KINDS) * changes):
                greeting = f"Hello, change {i}!"
                app = repo / "app.py"
                app.write_text(re.sub(r'return "[^"]*\\n"', f'return "{greeting}\\\\n"', app.read_text(), count=1))
                git("commit", "-qam", f"change {i}")
                t0 = time.monotonic()
                kind = KINDS[i % len(KINDS)]
                if kind.startswith("push"):
                    git("push", "-q", "production", "main")
                else:
                    run([FAB, "-H", name, kind.split()[1]], repo, env)
                answers(d.address, greeting + "\n")
                rows[kind].append(time.monotonic() - t0)
    finally:
        sb.down(name)


def measure(sb: Sandbox, runs: int, changes: int = 3, prefix: str = "bench-push-") -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {k: [] for k in ("setup fresh", "setup again", "installed KB", "push first deploy",
                                                    *KINDS)}
    for i in range(runs):
        one_droplet(sb, f"{prefix}{i}", changes, rows)
    print(f"{'':<28} {'median':>8} {'min':>8} {'max':>8}  runs")
    for k, v in rows.items():
        if v:
            print(f"{k:<28} {statistics.median(v):>8.2f} {min(v):>8.2f} {max(v):>8.2f}  {len(v)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="fresh droplets (each: setup twice, changes)")
    ap.add_argument("--changes", type=int, default=3, help="one-line changes of each kind per droplet")
    ap.add_argument("--prefix", default="bench-push-")
    ap.add_argument("--json")
    args = ap.parse_args()
    sb = Sandbox()
    sb.prepare()
    rows = measure(sb, args.runs, args.changes, args.prefix)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
