import pytest

from provision.sandbox import _pem_blocks


def test_pem_blocks_split_and_normalise():
    a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----"
    b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----"
    text = f"# comment\n{a}\n\n{b}\ntrailing garbage\n"
    assert _pem_blocks(text) == [a + "\n", b + "\n"]
    assert _pem_blocks("") == []


def test_the_sandbox_tasks_reach_the_sandbox_module(monkeypatch):
    """`fab sandbox.*` import provision.sandbox only when they run (off the deploy path)."""
    import provision.sandbox
    from provision.cli import sandbox as tasks
    from provision.errors import ProvisionError

    monkeypatch.setattr(provision.sandbox, "can_run", lambda: "no systemd-nspawn (test)")
    with pytest.raises(ProvisionError, match=r"cannot run sandbox droplets here: no systemd-nspawn \(test\)"):
        tasks._sandbox()


def _snapshot(sb, name, parent=None):
    import json

    (sb.snapshots / name).mkdir(parents=True)
    (sb.snapshots / f"{name}.json").write_text(json.dumps({"from": "d", "parent": parent, "time": 0}))


def _droplet(sb, name, snapshot=None, pid=0, **over):
    """A droplet's state file (its network names are no real droplet's: `down` looks for them)."""
    import json
    from dataclasses import asdict

    from provision.sandbox import Droplet

    (sb.machines / name).mkdir(parents=True)
    state = asdict(Droplet(name, "10.231.0.99", pid, f"pv-unit-test-{name}", "pvh-unit-test", snapshot=snapshot, **over))
    if snapshot is None:
        del state["snapshot"]  # a droplet recorded before snapshots existed
    (sb.machines / name / "state.json").write_text(json.dumps(state))


def test_a_snapshot_stacks_on_its_parents_then_the_base(tmp_path):
    from provision.errors import ProvisionError
    from provision.sandbox import Sandbox

    sb = Sandbox(tmp_path)
    _snapshot(sb, "app")
    _snapshot(sb, "app2", parent="app")
    assert sb.layers("app2") == [sb.snapshots / "app2", sb.snapshots / "app", sb.base]
    assert sb.list_snapshots() == ["app", "app2"]
    with pytest.raises(ProvisionError, match=r"no snapshot 'nope'; take one with `fab sandbox.snapshot --name DROPLET"):
        sb.layers("nope")
    with pytest.raises(ProvisionError, match="bad snapshot name"):
        sb.layers("../etc")


def test_a_snapshot_in_use_is_neither_dropped_nor_replaced(tmp_path):
    from provision.errors import ProvisionError
    from provision.sandbox import Sandbox

    sb = Sandbox(tmp_path)
    _snapshot(sb, "app")
    _snapshot(sb, "app2", parent="app")
    _droplet(sb, "old")
    _droplet(sb, "web1", snapshot="app2")
    assert sb.get("old").snapshot is None
    with pytest.raises(ProvisionError, match=r"snapshot 'app' is in use by web1, snapshot app2; take those down"):
        sb.drop_snapshot("app")
    with pytest.raises(ProvisionError, match=r"snapshot 'app2' is in use by web1; take those down first, or"):
        sb.snapshot("web1", "app2")  # its own layer: replacing it would pull it from under the droplet
    assert (sb.snapshots / "app").is_dir()
    assert sb.drop_snapshot("nothing") is False


def test_a_snapshot_forgets_what_is_the_hosts_own(tmp_path):
    from provision.sandbox import forgotten

    for f in ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/sshd_config", "etc/machine-id", "var/log/journal/abc/system.journal",
              "var/log/nginx/access.log", "var/log/dpkg.log", "var/tmp/systemd-private-x/f", "srv/hello/current",
              "var/lib/systemd/random-seed"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in forgotten(tmp_path)] == [
        "etc/machine-id", "etc/ssh/ssh_host_ed25519_key", "var/lib/systemd/random-seed", "var/log/journal/abc",
        "var/log/nginx/access.log", "var/tmp/systemd-private-x"]


def test_overlay_layers_topmost_first_and_no_path_that_breaks_the_options():
    from pathlib import Path

    from provision.errors import ProvisionError
    from provision.sandbox import overlay_options

    assert overlay_options([Path("/s/app"), Path("/s/base")], Path("/m/upper"), Path("/m/work")) == (
        "lowerdir=/s/app:/s/base,upperdir=/m/upper,workdir=/m/work")
    with pytest.raises(ProvisionError, match="cannot be an overlay layer"):
        overlay_options([Path("/s/a:b")], Path("/m/upper"), Path("/m/work"))


def test_only_container_droplets_get_what_an_engine_needs(tmp_path):
    """An engine needs cgroup v2 writable, /proc/sys/net writable, three system calls and storage off the
    overlay; a plain droplet never gets them (its root could change its own network settings), nor an engine."""
    from provision.errors import ProvisionError
    from provision.sandbox import Droplet, Sandbox

    sb = Sandbox(tmp_path)
    m = tmp_path / "machines" / "d"
    plain, plain_env = sb.nspawn_command("d", m, "pv-d", containers=False)
    argv, env = sb.nspawn_command("d", m, "pv-d", containers=True)
    common = ["systemd-nspawn", "-q", "-D", str(m / "rootfs"), "-b", "--register=no", "--keep-unit", "--machine=d",
              "--network-namespace-path=/run/netns/pv-d", "--console=read-only", "--capability=CAP_NET_ADMIN"]
    assert (plain, plain_env) == (common, {})
    assert env == {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
    assert argv == [*common, "--system-call-filter=add_key keyctl bpf",
                    f"--bind-ro={sb.image_tar}:/var/lib/provision-sandbox/debian-12.tar",
                    f"--bind={m}/engine/docker:/var/lib/docker", f"--bind={m}/engine/containers:/var/lib/containers"]
    assert not (m / "engine").exists()  # the command is only built; the storage is made with the droplet's files
    _droplet(sb, "plain")
    plain = sb.get("plain")
    assert plain.containers is False  # a droplet recorded before container droplets existed
    with pytest.raises(ProvisionError, match=r"droplet plain was not started for containers; .*--containers"):
        sb.engine_ready(plain)
    assert isinstance(Droplet("x", "10.231.0.9", 0, "n", "v", containers=True).containers, bool)


def test_the_engine_script_installs_when_missing_and_imports_the_base_image_once(tmp_path):
    from provision.errors import ProvisionError
    from provision.sandbox import Sandbox

    sb = Sandbox(tmp_path)
    script = sb.engine_script("podman", "http://10.231.0.1:8888")
    assert "apt-get install -y -qq --no-install-recommends podman runc catatonit iptables" in script
    assert ("podman image inspect localhost/debian:12 >/dev/null 2>&1 || podman import "
            "/var/lib/provision-sandbox/debian-12.tar localhost/debian:12") in script
    assert script.index("podman info") > script.index("apt-get install")
    assert "docker.io" in sb.engine_script("docker", "http://10.231.0.1:8888")
    with pytest.raises(ProvisionError, match="unknown container engine 'lxc'"):
        sb.engine_script("lxc", "http://10.231.0.1:8888")
    # the image is named after the sandbox's Debian: 13 for trixie
    trixie = Sandbox(tmp_path, suite="trixie")
    assert "docker import /var/lib/provision-sandbox/debian-13.tar localhost/debian:13" in trixie.engine_script(
        "docker", "http://10.231.0.1:8888")
    assert f"--bind-ro={trixie.image_tar}:/var/lib/provision-sandbox/debian-13.tar" in trixie.nspawn_command(
        "d", tmp_path / "d", "pv-d", containers=True)[0]


def test_the_base_images_tarball_is_made_again_when_the_base_is_newer(tmp_path):
    import os
    import tarfile

    from provision.sandbox import Sandbox

    sb = Sandbox(tmp_path)
    (sb.base / "usr/sbin").mkdir(parents=True)
    (sb.base / "usr/sbin/sshd").write_text("")  # a base there: none is built
    tar = sb.base_image()
    os.utime(tar, (tar.stat().st_mtime + 10,) * 2)
    made = tar.stat().st_mtime
    assert sb.base_image() == tar and tar.stat().st_mtime == made  # kept: the base is older
    (sb.base / "etc").mkdir()  # the base rebuilt since
    os.utime(sb.base, (made + 20,) * 2)
    assert sb.base_image() == tar and tar.stat().st_mtime != made
    with tarfile.open(tar) as t:
        assert "./etc" in t.getnames()


def test_a_droplet_that_will_not_stop_loses_its_init_before_its_nspawn():
    """nspawn killed alone would leave the droplet's init running, reparented (docs/containers-in-droplets.md)."""
    import subprocess
    import time

    from provision.sandbox import Droplet, _alive, _children, _start_time, _stop_nspawn

    # a stand-in for nspawn that ignores TERM, with a child standing in for the droplet's init
    proc = subprocess.Popen(["/bin/sh", "-c", "trap '' TERM; sleep 60 & wait"])
    deadline = time.monotonic() + 5
    while not _children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    (child,) = _children(proc.pid)
    _stop_nspawn(Droplet("x", "10.231.0.9", proc.pid, "n", "v", started=_start_time(proc.pid)), timeout=0.3)
    assert proc.wait(timeout=5) is not None
    time.sleep(0.1)
    assert not _alive(child)


def test_a_pid_that_is_another_process_now_is_never_signalled(tmp_path):
    """A state file left behind (this machine rebooted): its PID may be another process's now. `down` and
    `running` know the process the droplet was started as by its start time (a state of an older
    version, without one: by its command line, a systemd-nspawn of that machine)."""
    import subprocess
    import time

    from provision.sandbox import Sandbox, _start_time

    sb = Sandbox(tmp_path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        for started in (_start_time(other.pid) - 1, None):
            _droplet(sb, "old", pid=other.pid, started=started)
            assert not sb.get("old").running()
            assert sb.down("old") and not (sb.machines / "old").exists()
            time.sleep(0.3)
            assert other.poll() is None  # never signalled
        _droplet(sb, "mine", pid=other.pid, started=_start_time(other.pid))  # the process it started: stopped
        assert sb.get("mine").running()
        assert sb.down("mine") and other.wait(timeout=5) is not None  # (reaped by down: no status here)
    finally:
        other.kill()
        other.wait()


def test_a_sandbox_programs_pid_reused_by_another_process_is_never_signalled(tmp_path):
    """tinyproxy's and pebble's PID files: after a reboot their PID may be another process's; stopping
    the sandbox's proxy then killed that one."""
    import subprocess
    import time

    from provision.sandbox import Sandbox, _start_time

    other = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "tinyproxy.pid"
        pidfile.write_text(f"{other.pid} {_start_time(other.pid) + 1}")  # recorded for an earlier process
        Sandbox._stop_daemon(pidfile)
        time.sleep(0.2)
        assert other.poll() is None and not pidfile.exists()
        pidfile.write_text(f"{other.pid} {_start_time(other.pid)}")  # its own: stopped
        Sandbox._stop_daemon(pidfile)
        assert _start_time(other.pid) is None  # gone (reaped by the stop itself: a child of this test)
    finally:
        other.kill()
