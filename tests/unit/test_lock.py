"""The deploy lock as it runs on the host, by a real local bash with fake busctl and systemctl on PATH.

The fakes keep systemd's side in a folder: ``scope`` exists while the scope is active, ``procs``
lists its processes (what the cgroup holds), ``calls`` records every call.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from provision.script import Lock, build_script, parse_report
from provision.steps import Change, Planned, Step

BUSCTL = """#!/bin/bash
echo "busctl $*" >> "$FAKE/calls"
if [ -e "$FAKE/scope" ]; then echo "Call failed: Unit $5 was already loaded or has a fragment file." >&2; exit 1; fi
touch "$FAKE/scope"
"""
SYSTEMCTL = """#!/bin/bash
echo "systemctl $*" >> "$FAKE/calls"
case "$1" in
  is-active) [ -e "$FAKE/scope" ] ;;
  show) [ -e "$FAKE/scope" ] && echo "/../../..$FAKE/cg" ;;  # its cgroup.procs: $FAKE/cg/cgroup.procs
  kill|stop) rm -f "$FAKE/scope"; : > "$FAKE/cg/cgroup.procs" ;;
  reset-failed) ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("busctl", BUSCTL), ("systemctl", SYSTEMCTL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "cgroup.procs").write_text("")
    (tmp_path / "run").mkdir()
    return tmp_path


def run(fake, lock, commands=("true",)):
    script = build_script([Planned(Step(), Change(list(commands)))], lock=lock)
    # the script sets its own PATH: the fakes go in front of it
    script = script.replace("export LC_ALL=C PATH=", f"export LC_ALL=C PATH={fake / 'bin'}:", 1)
    env = dict(os.environ, FAKE=str(fake))
    return subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True, env=env, timeout=60)


def lock(fake, **kw):
    return Lock("hello", {"user": "alice", "action": "deploy"}, run_dir=str(fake / "run"), **kw)


def held_by(fake, pid, procs="4242\n"):
    (fake / "scope").touch()
    (fake / "cg" / "cgroup.procs").write_text(procs)
    (fake / "run" / "hello.deploy").write_text(json.dumps({"user": "bob", "pid": pid}) + "\n")


def test_a_free_lock_is_taken_and_its_holder_named_while_the_deploy_runs(fake):
    seen = fake / "seen"
    res = run(fake, lock(fake), [f"cat {fake}/run/hello.deploy > {seen}"])
    assert res.returncode == 0, res.stdout + res.stderr
    holder = json.loads(seen.read_text())
    assert holder["user"] == "alice" and holder["pid"] > 0
    assert not (fake / "run" / "hello.deploy").exists()  # gone with the deploy
    assert "StartTransientUnit" in (fake / "calls").read_text()


def test_a_killed_holders_steps_are_waited_for_then_the_host_is_planned_again(fake):
    dead = subprocess.Popen(["true"])
    dead.wait()
    held_by(fake, dead.pid)
    # its orphaned steps finish after a while: the scope goes
    ender = subprocess.Popen(["bash", "-c", f"sleep 0.5; rm -f {fake}/scope"])
    res = run(fake, lock(fake), [f"touch {fake}/never"])
    ender.wait()
    report = parse_report(res.stdout)
    assert res.returncode == 76 and report.waited and report.locked_by is None
    assert not (fake / "never").exists()


def test_break_lock_stops_the_scope_and_never_a_pid_named_in_a_file(fake):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        held_by(fake, victim.pid)  # a forged holder naming someone else's process
        res = run(fake, lock(fake, break_lock=True))
        report = parse_report(res.stdout)
        assert res.returncode == 0, res.stdout + res.stderr
        assert report.stale == {"user": "bob", "pid": victim.pid}  # reported as broken
        calls = (fake / "calls").read_text()
        assert "systemctl kill --signal=SIGTERM provision-deploy-hello.scope" in calls
        time.sleep(0.1)
        assert victim.poll() is None  # alive
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def test_an_active_scope_with_no_process_left_is_taken_at_once(fake):
    held_by(fake, 999999, procs="")  # systemd lost the cgroup's "empty" event
    t0 = time.monotonic()
    res = run(fake, lock(fake))
    assert res.returncode == 0, res.stdout + res.stderr
    assert parse_report(res.stdout).stale == {"user": "bob", "pid": 999999}
    assert time.monotonic() - t0 < 5
    assert "kill" not in (fake / "calls").read_text()
