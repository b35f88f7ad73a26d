"""The deploy lock as it runs on the host, by a real local bash: flock on a file in a folder of the
test's, systemd faked on PATH. The fake keeps each scope's processes where the script looks for them
(``<cgroup>/system.slice/<scope>/cgroup.procs``) and records every call in ``calls``.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from provision.layout import Layout
from provision.lock import Lock
from provision.script import build_script, parse_report
from provision.steps import Change, Planned, Step

BUSCTL = """#!/bin/bash
echo "busctl $*" >> "$FAKE/calls"
mkdir -p "$FAKE/cg/system.slice/$5" && echo "${11}" > "$FAKE/cg/system.slice/$5/cgroup.procs"
"""
SYSTEMCTL = """#!/bin/bash
echo "systemctl $*" >> "$FAKE/calls"
if [ "$1" = kill ]; then  # systemd kills exactly the scope's processes
  f="$FAKE/cg/system.slice/$3/cgroup.procs"; kill -"${2#--signal=SIG}" $(cat "$f") 2>/dev/null; : > "$f"
fi
"""
OLD_SCOPE = "provision-deploy-hello-4242.scope"


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("busctl", BUSCTL), ("systemctl", SYSTEMCTL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "run").mkdir()
    (tmp_path / "calls").write_text("")
    return tmp_path


def run(fake, lock, commands=("true",)):
    script = build_script([Planned(Step(), Change(list(commands)))], lock=lock)
    # the script sets its own PATH: the fakes go in front of it
    script = script.replace("export LC_ALL=C PATH=", f"export LC_ALL=C PATH={fake / 'bin'}:", 1)
    return subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, FAKE=str(fake)))


def lock(fake, **kw):
    return Lock(Layout("hello", run_dir=str(fake / "run")), {"user": "alice", "action": "deploy"},
                cgroup=str(fake / "cg"), **kw)


def last_holder(fake, pid, procs=()):
    """What a holder killed outright leaves: its holder file, and its scope with what still runs."""
    (fake / "run" / "hello.deploy").write_text(json.dumps({"user": "bob", "pid": pid, "scope": OLD_SCOPE}) + "\n")
    scope = fake / "cg" / "system.slice" / OLD_SCOPE
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))


def test_a_free_lock_is_taken_and_names_its_holder_and_scope_while_the_deploy_runs(fake):
    seen = fake / "seen"
    res = run(fake, lock(fake), [f"cat {fake}/run/hello.deploy > {seen}", "ls -l /proc/self/fd/ > /dev/null"])
    assert res.returncode == 0, res.stdout + res.stderr
    holder = json.loads(seen.read_text())
    assert holder["user"] == "alice" and holder["scope"] == f"provision-deploy-hello-{holder['pid']}.scope"
    assert not (fake / "run" / "hello.deploy").exists()  # gone with the deploy
    assert oct((fake / "run" / "hello.lock").stat().st_mode & 0o777) == "0o600"  # no one else can open it


def test_the_lock_is_held_by_the_deploy_alone_not_by_its_steps(fake):
    # a step left running in the background (an orphan, once its holder is gone) does not hold the lock
    res = run(fake, lock(fake), [f"flock -n {fake}/run/hello.lock true && touch {fake}/free-in-step || true"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (fake / "free-in-step").exists()  # held while the deploy runs...
    res = run(fake, lock(fake), [f"(sleep 2; touch {fake}/late) > /dev/null 2>&1 &"])
    assert res.returncode == 0
    subprocess.run(["flock", "-n", str(fake / "run" / "hello.lock"), "true"], check=True)  # ...and not after


def test_a_held_lock_is_refused_naming_the_holder(fake):
    holder = subprocess.Popen(["flock", str(fake / "run" / "hello.lock"), "sleep", "30"])
    try:
        time.sleep(0.2)
        (fake / "run" / "hello.deploy").write_text(json.dumps({"user": "bob", "pid": holder.pid}) + "\n")
        res = run(fake, lock(fake), [f"touch {fake}/never"])
        report = parse_report(res.stdout)
        assert res.returncode == 75 and report.locked_by == {"user": "bob", "pid": holder.pid}
        assert not (fake / "never").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holders_running_steps_are_waited_for_then_the_host_is_planned_again(fake):
    last_holder(fake, 999999, [4243])  # a step the killed holder had started still runs...
    ender = subprocess.Popen(["bash", "-c", f"sleep 0.5; : > {fake}/cg/system.slice/{OLD_SCOPE}/cgroup.procs"])
    res = run(fake, lock(fake), [f"touch {fake}/never"])  # ...for half a second
    ender.wait()
    report = parse_report(res.stdout)
    assert res.returncode == 76 and report.waited, res.stdout + res.stderr
    assert not (fake / "never").exists()


def test_break_lock_stops_the_holders_scope_and_never_a_pid_named_in_a_file(fake):
    victim = subprocess.Popen(["sleep", "30"])  # someone else's process, named as the holder's pid
    step = subprocess.Popen(["sleep", "30"])  # the killed holder's step, in its scope
    try:
        last_holder(fake, victim.pid, [step.pid])
        res = run(fake, lock(fake, break_lock=True))
        assert res.returncode == 0, res.stdout + res.stderr
        assert parse_report(res.stdout).stale["scope"] == OLD_SCOPE  # reported as broken
        assert f"systemctl kill --signal=SIGTERM {OLD_SCOPE}" in (fake / "calls").read_text()
        assert step.wait(timeout=5) == -signal.SIGTERM
        assert victim.poll() is None  # alive
    finally:
        for p in (victim, step):
            p.kill()
            p.wait()


def test_a_holder_whose_scope_is_empty_is_taken_over_at_once(fake):
    last_holder(fake, 999999, [])
    t0 = time.monotonic()
    res = run(fake, lock(fake))
    assert res.returncode == 0, res.stdout + res.stderr
    assert parse_report(res.stdout).stale["user"] == "bob"
    assert time.monotonic() - t0 < 30  # (a live holder would be waited for: up to 300 s)
    assert "kill" not in (fake / "calls").read_text()


def holders_of(path) -> list[int]:
    """The processes with ``path`` open (as systemd has them in the holder's scope)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")):
                out.append(int(pid))
        except OSError:
            pass
    return out


def parked(fake, tmp_path) -> subprocess.Popen:
    """A transaction's first stage (hold) run over a fake SSH connection (a shell named sshd that
    stays), once its lock is parked; returns the connection."""
    sshd = tmp_path / "sshd"
    sshd.write_bytes(open("/bin/bash", "rb").read())
    sshd.chmod(0o755)
    script = build_script([Planned(Step(), Change(["true"]))], lock=lock(fake, transaction="t1", hold=True))
    (tmp_path / "stage1").write_text(script.replace("export LC_ALL=C PATH=", f"export LC_ALL=C PATH={fake / 'bin'}:", 1))
    conn = subprocess.Popen([str(sshd), "-c", f"bash -s < {tmp_path}/stage1 > {tmp_path}/out1; sleep 30; true"],
                            env=dict(os.environ, FAKE=str(fake)))
    for _ in range(100):
        if "@@ok" in ((tmp_path / "out1").exists() and (tmp_path / "out1").read_text() or ""):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # the script has exited, its watcher holds the lock
    assert subprocess.run(["flock", "-n", str(fake / "run" / "hello.lock"), "true"]).returncode == 1
    return conn


def test_a_transaction_keeps_the_lock_between_its_stages_while_its_connection_lives(fake, tmp_path):
    lock_file = fake / "run" / "hello.lock"
    conn = parked(fake, tmp_path)
    try:
        holder = json.loads((fake / "run" / "hello.deploy").read_text())
        assert holder["transaction"] == "t1"
        # another deploy (or another transaction) is refused, naming the holder
        for other in (lock(fake), lock(fake, transaction="t2")):
            res = run(fake, other, [f"touch {fake}/never"])
            assert res.returncode == 75 and parse_report(res.stdout).locked_by["user"] == "alice"
        # the transaction's next stage takes it over (systemd stops the parked holder's scope) and
        # its last stage lets it go
        scope = fake / "cg" / "system.slice" / holder["scope"]
        scope.mkdir(parents=True, exist_ok=True)
        (scope / "cgroup.procs").write_text("".join(f"{p}\n" for p in holders_of(lock_file)))
        res = run(fake, lock(fake, transaction="t1"), [f"touch {fake}/stage2"])
        report = parse_report(res.stdout)
        assert res.returncode == 0 and report.stale is None and report.locked_by is None, res.stdout + res.stderr
        assert (fake / "stage2").exists() and not (fake / "run" / "hello.deploy").exists()
        subprocess.run(["flock", "-n", str(lock_file), "true"], check=True)
    finally:
        conn.kill()
        conn.wait()


def test_a_transactions_lock_goes_with_its_connection(fake, tmp_path):
    conn = parked(fake, tmp_path)
    conn.kill()  # fab killed, the connection lost: sshd's session ends
    conn.wait()
    res = run(fake, lock(fake))  # the next deploy, at once: it waits the moment the watcher takes to go
    assert res.returncode == 0 and parse_report(res.stdout).stale is None, res.stdout  # nothing "taken over"
