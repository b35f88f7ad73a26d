"""remote/container_run.py, the program a container app's units, release command and `fab run` run on
the host: run for real here, with a fake engine on its path that records what it was asked."""

import contextlib
import json
import os
import pwd
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from provision import config as cfg
from provision.app import container_configs
from provision.remote import source as program_source

ROOT = Path(__file__).resolve().parents[2]
NOBODY = pwd.getpwnam("nobody")
APP_USER = f"{NOBODY.pw_uid}:{NOBODY.pw_gid}"

# The fake engine: each call one JSON line in the log ({"argv": [...], "env": <its --env-file's text>,
# "client": <its own proxy variables and DOCKER_CONFIG>});
# `image inspect` prints $FAKE_IMAGE_ENV (the image's Config.Env as JSON), `run` exits $FAKE_RUN_EXIT, or
# with $FAKE_RUN_BLOCKS runs until a `stop` (then exits 143, as a container stopped does).
FAKE_ENGINE = """#!{python}
import json, os, sys, time
argv = sys.argv[1:]
env = None
if "--env-file" in argv:
    env = open(argv[argv.index("--env-file") + 1]).read()
# its own environment's proxy variables and docker config directory (the client passes those on)
client = {{k: v for k, v in os.environ.items() if k.lower().endswith("_proxy") or k == "DOCKER_CONFIG"}}
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"argv": argv, "env": env, "client": client}}) + "\\n")
if argv[:2] == ["image", "inspect"]:
    print(os.environ.get("FAKE_IMAGE_ENV", "null"))
if argv[:1] == ["stop"]:
    open({log!r} + ".stopped", "w").close()
if argv[:1] == ["run"] and os.environ.get("FAKE_RUN_BLOCKS"):  # as a container does, until stopped
    for _ in range(200):
        if os.path.exists({log!r} + ".stopped"):
            sys.exit(143)
        time.sleep(0.1)
sys.exit(int(os.environ.get("FAKE_RUN_EXIT", "0")) if argv[:1] == ["run"] else 0)
"""


class Release:
    """A container app's release on a fake host under ``tmp_path``: its container-run.py and container.json
    (the deploy's, ``over`` changed), the engine a fake at ``bin/<engine>``."""

    def __init__(self, tmp_path: Path, **over):
        src = tmp_path / "src"
        src.mkdir()
        (src / "Dockerfile").write_text("FROM localhost/debian:12\n")
        (src / "app.py").write_text("print('hi')\n")
        raw = dict(cfg.DEFAULTS, name="hello", source=str(src), container=True)
        raw.update({k: v for k, v in over.items() if k in ("engine", "image")})
        configs = container_configs(cfg.build(raw, ROOT))
        settings = json.loads(configs["container.json"])
        self.own = tmp_path / "releases" / "r5" / ".provision"
        self.own.mkdir(parents=True)
        self.run_dir = tmp_path / "run"
        settings.update(env_files=["env", str(tmp_path / "secrets.env"), str(tmp_path / "shared.env")],
                        run_dir=str(self.run_dir), user="nobody")
        settings.update({k: v for k, v in over.items() if k not in ("engine", "image")})
        (self.own / "container.json").write_text(json.dumps(settings))
        self.log = tmp_path / "engine.log"
        engine = tmp_path / "bin" / settings["engine"]
        engine.parent.mkdir()
        engine.write_text(FAKE_ENGINE.format(python=sys.executable, log=str(self.log)))
        engine.chmod(0o755)
        self.prog = self.own / "container-run.py"
        self.prog.write_text(program_source("container_run.py").replace('"/usr/bin/" + c["engine"]', repr(str(engine))))

    def __call__(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-I", str(self.prog), *args], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=30)

    @contextlib.contextmanager
    def running(self, *args: str):
        """container-run.py ARGS started (in a session of its own) with a fake engine whose `run` blocks
        until a `stop`; yields it and the engine's `run` call once made. Killed when the block ends."""
        proc = subprocess.Popen([sys.executable, "-I", str(self.prog), *args], stderr=subprocess.PIPE, text=True,
                                env={"PATH": "/usr/bin:/bin", "FAKE_RUN_BLOCKS": "1"}, start_new_session=True)
        try:
            for _ in range(100):
                if self.runs():
                    break
                time.sleep(0.05)
            (run,) = self.runs()
            yield proc, run
        finally:
            proc.kill()

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def runs(self) -> list[dict]:
        """The engine's `run` calls."""
        return [call for call in self.calls() if call["argv"][:1] == ["run"]]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_container_of_the_app_runs_as_the_app_user_of_the_host(tmp_path):
    release = Release(tmp_path)
    for args in (("serve", "a"), ("once", "--", "/bin/sh", "-c", "true")):
        res = release(*args)
        assert res.returncode == 0, res.stderr
    serve, once = release.runs()
    for argv in (serve["argv"], once["argv"]):
        # its uid:gid, looked up on the host, whatever the image's USER says; no capability, no new privilege
        assert option(argv, "--user") == APP_USER
        assert "--cap-drop=ALL" in argv and "--security-opt=no-new-privileges" in argv
        assert argv.index("--user") < argv.index("localhost/hello:r5")


def test_home_is_tmp_unless_the_app_or_its_image_sets_one(tmp_path):
    release = Release(tmp_path)
    assert release("serve", "a").returncode == 0
    assert release("serve", "b", env={"FAKE_IMAGE_ENV": '["PATH=/bin", "HOME=/app"]'}).returncode == 0
    (release.own / "env").write_text('HOME="/srv/data"\n')
    assert release("serve", "a").returncode == 0
    homes = [[line for line in run["env"].splitlines() if line.startswith("HOME=")] for run in release.runs()]
    assert homes == [["HOME=/tmp"], [], ["HOME=/srv/data"]]


@pytest.mark.parametrize("user, why", [("no-such-user-here", "no user no-such-user-here on this host"),
                                       ("root", "user root is root's (uid or gid 0)")])
def test_no_container_starts_without_the_app_user_or_as_root(tmp_path, user, why):
    release = Release(tmp_path, user=user)
    res = release("serve", "a")
    assert res.returncode == 1 and why in res.stderr, res.stderr
    assert release.runs() == []


def test_once_reads_no_option_after_its_double_dash_and_refuses_a_command_without_one(tmp_path):
    release = Release(tmp_path)
    res = release("once", "--", "--name", "hello-a", "sh")
    assert res.returncode == 0, res.stderr
    (run,) = release.runs()
    assert run["argv"][-4:] == ["localhost/hello:r5", "--name", "hello-a", "sh"]
    # the command's words name no container: a one-off's is named after its pid
    assert option(run["argv"], "--name").removeprefix("hello.p.").isdigit()
    assert not [call for call in release.calls() if call["argv"][:1] == ["rm"]]  # nothing removed
    for args in (("once", "--name", "hello-a", "sh"), ("once", "sh"), ("once", "-t", "--"), ("once", "--bad", "x", "--", "sh")):
        res = release(*args)
        assert res.returncode == 1 and "usage: container-run.py" in res.stderr, (args, res.stderr)
    # refused: the engine never asked to do anything
    assert [call for call in release.calls() if call["argv"][:2] != ["image", "inspect"]] == release.runs()
    assert len(release.runs()) == 1


def test_fab_run_and_the_release_command_pass_their_command_after_a_double_dash(tmp_path):
    """What `fab run -- --name hello-a sh` and a release command of the same words run on the host:
    container-run.py gets them as the command, never as its own options (it would remove hello-a, the
    live slot's container, as root)."""
    from provision.appenv import ReleaseCommand
    from provision.cli.env import run_line

    release = Release(tmp_path)
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path / "src"), container=True), ROOT)
    fab_run = shlex.split(run_line(s, ["--name", "hello-a", "sh"]).split("; exec ", 1)[1])
    step = ReleaseCommand(s.layout, s.user, "--name hello-a sh", "r5", "", container=True)
    command = json.loads(shlex.split(step.plan(None, {"code"}).commands[0])[-1])["argv"]
    for argv, expected, where in ((fab_run, ["--name", "hello-a", "sh"], s.layout.current),
                                  (command, ["/bin/sh", "-c", "--name hello-a sh"], s.layout.release("r5"))):
        assert argv[:3] == ["/usr/bin/python3", "-I", f"{where}/.provision/container-run.py"]
        res = release(*argv[3:])
        assert res.returncode == 0, res.stderr
        assert release.runs()[-1]["argv"][-len(expected) - 1:] == ["localhost/hello:r5", *expected]
    assert not [call for call in release.calls() if call["argv"][:1] == ["rm"]]


def test_a_process_container_never_takes_a_slots_name_nor_removes_one(tmp_path):
    from provision.layout import Layout
    from provision.processes import unit_steps

    # a process named like a slot, or app shop's process worker-b beside app shop-worker's slot b
    assert Layout("shop").process_container("a") not in {Layout("shop").container_name(s) for s in "ab"}
    assert Layout("shop").process_container("worker-b") != Layout("shop-worker").container_name("b")
    release = Release(tmp_path)
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path / "src"), container=True, processes={"a": "work"},
                       timers={"b": {"schedule": "daily", "command": "tidy"}}), ROOT)
    units = [st.content.decode() for st in unit_steps(s, "r5", "") if hasattr(st, "content")]
    execs = [shlex.split(line) for unit in units for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert [argv[3:7] for argv in execs] == [["once", "--name", "hello.p.a", "--"], ["once", "--name", "hello.p.b", "--"]]
    assert release("once", "--name", "hello.p.a", "--", "work").returncode == 0
    assert option(release.runs()[-1]["argv"], "--name") == "hello.p.a"
    assert [call["argv"] for call in release.calls() if call["argv"][:1] == ["rm"]] == [["rm", "-f", "hello.p.a"]]
    # a slot's container (this app's or another's), or anything else, is no process's: refused, nothing removed
    for name in ("hello-a", "hello-b", "other.p.a", "hello.p.", "hello.p.a/../x", "hello.p.A"):
        res = release("once", "--name", name, "--", "work")
        assert res.returncode == 1 and "usage: container-run.py" in res.stderr, (name, res.stderr)
    assert len([call for call in release.calls() if call["argv"][:1] == ["rm"]]) == 1
    assert release("serve", "b").returncode == 0 and option(release.runs()[-1]["argv"], "--name") == "hello-b"


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_no_proxy_of_the_engines_environment_reaches_a_container(tmp_path, engine):
    """The deploy exports app.proxy (its password too) to the release command: podman's `run` would copy
    it into the container (--http-proxy defaults to true), docker's client its config.json's proxies."""
    release = Release(tmp_path, engine=engine)
    proxy = "http://user:Xq9pw0rd7@10.0.0.1:3128"
    env = {"http_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": "localhost", "ALL_PROXY": proxy,
           "DOCKER_CONFIG": str(tmp_path)}
    for args in (("serve", "a"), ("once", "--", "env"), ("once", "--name", "hello.p.w", "--", "env")):
        assert release(*args, env=env).returncode == 0
    assert len(release.runs()) == 3
    for call in release.calls():
        # docker's client gets its defaults (no proxies); podman, none (it would fail to stat one)
        assert list(call["client"]) == (["DOCKER_CONFIG"] if engine == "docker" else []), call
        assert not Path(call["client"].get("DOCKER_CONFIG", "/nonexistent")).exists()
    for run in release.runs():
        assert ("--http-proxy=false" in run["argv"]) == (engine == "podman")
        assert "Xq9pw0rd7" not in json.dumps(run)


def test_a_container_apps_process_and_timer_units_stop_their_containers(tmp_path):
    from provision.processes import unit_steps

    Release(tmp_path)
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path / "src"), container=True, processes={"w": "work"},
                       timers={"t": {"schedule": "daily", "command": "tidy"}}, graceful_timeout=12), ROOT)
    units = {st.path.rsplit("/", 1)[1]: st.content.decode().splitlines() for st in unit_steps(s, "r5", "")
             if hasattr(st, "content")}
    for unit, name in (("hello.w.service", "hello.p.w"), ("hello.t.service", "hello.p.t")):
        lines = units[unit]
        assert f"ExecStop=-/usr/bin/docker stop --time 12 {name}" in lines
        assert f"ExecStopPost=-/usr/bin/docker rm -f {name}" in lines
        assert "KillMode=mixed" in lines and "SuccessExitStatus=143 137" in lines and "TimeoutStopSec=22" in lines
        assert not [line for line in lines if line.startswith("KillMode=") and line != "KillMode=mixed"]


@pytest.mark.parametrize("options", [["--name", "hello.p.w"], []])
def test_term_to_once_stops_its_container_and_removes_its_env_file(tmp_path, options):
    """systemd stops a process's unit (or a running timer's, which gets no ExecStop) with TERM to
    container-run.py alone (KillMode=mixed): it stops its container, never leaves it running."""
    import signal

    release = Release(tmp_path)
    with release.running("once", *options, "--", "work") as (once, run):
        assert len(list(release.run_dir.iterdir())) == 1  # its env file
        once.send_signal(signal.SIGTERM)
        assert once.wait(timeout=15) == 143, once.stderr.read()
    name = option(run["argv"], "--name")
    assert [call["argv"] for call in release.calls() if call["argv"][:1] == ["stop"]] == [["stop", "--time", "30", name]]
    assert list(release.run_dir.iterdir()) == []


def test_a_hangup_that_kills_the_engine_client_first_still_removes_the_container(tmp_path):
    """fab run's connection gone: the hangup reaches the whole session, the engine's client too, which
    dies at once (with a TTY docker's client passes no signal on): the container was left running."""
    import signal

    release = Release(tmp_path)
    with release.running("once", "-t", "--", "sh") as (once, run):
        os.killpg(once.pid, signal.SIGHUP)  # container-run.py and the fake client both
        assert once.wait(timeout=15) == 129, once.stderr.read()
    name = option(run["argv"], "--name")
    assert ["rm", "-f", name] in [call["argv"] for call in release.calls()]
    assert list(release.run_dir.iterdir()) == []


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_a_docker_apps_process_and_timer_units_need_dockers_daemon(tmp_path, engine):
    from provision.processes import unit_steps

    Release(tmp_path)
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path / "src"), container=True, engine=engine,
                       processes={"w": "work"}, timers={"t": {"schedule": "daily", "command": "tidy"}}), ROOT)
    units = [st.content.decode().splitlines() for st in unit_steps(s, "r5", "")
             if getattr(st, "path", "").endswith(".service")]
    assert len(units) == 2
    for lines in units:
        docker = engine == "docker"
        assert ("After=network-online.target docker.service" in lines) == docker
        assert ("Requires=docker.service" in lines) == docker
        assert docker or "After=network-online.target" in lines


def test_podman_pulls_a_short_image_name_from_docker_hub_as_docker_would(tmp_path):
    """podman refuses a short name without a registries.conf search list: app.image is qualified for it."""
    from provision.app import image_step

    Release(tmp_path)

    def image(engine, name):
        return cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path / "src"), container=True, engine=engine,
                              image=name), ROOT).image

    assert image("podman", "nginx:1") == "docker.io/library/nginx:1"
    assert image("podman", "team/app:2") == "docker.io/team/app:2"
    for name in ("reg.example.com/app:1", "localhost/app:1", "reg:5000/app", "docker.io/library/nginx:1", "quay.io/x/y"):
        assert image("podman", name) == name
    assert image("docker", "nginx:1") == "nginx:1"
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path / "src"), container=True, engine="podman",
                       image="nginx:1"), ROOT)
    assert image_step(s, "r2").commands[1] == "podman pull -q docker.io/library/nginx:1 >/dev/null"


@pytest.mark.parametrize("exits", [False, True])
def test_the_switch_takes_a_start_job_systemd_has_not_run_yet_for_no_exit(tmp_path, exits):
    """`systemctl start --no-block` returns once systemd queued the job, before it runs it: until then
    the unit reads inactive (dead), its job pending. A container's port refuses connections at once,
    so the gate asks at once: it took that for an exit and refused the release, with an empty log."""
    import threading
    import time

    from .test_switch import RUNNING, SYSTEMCTL, Host

    base = tempfile.mkdtemp(prefix="sw", dir="/tmp")  # short: a unix socket's path has room for 107 bytes
    host = Host(base)
    try:
        host.write(f"{base}/bin/systemctl", SYSTEMCTL.replace(
            "exit 0\n", '[ "$1" = start ] && [ -e "$FAKE/state-started" ] && mv "$FAKE/state-started" "$FAKE/state"\n'
                        "exit 0\n"), 0o755)
        host.write(f"{base}/state", "ActiveState=inactive\nSubState=dead\nNRestarts=0\n")
        # after the start call: its job queued, not run yet; or no job left (it ran and the unit exited)
        host.write(f"{base}/state-started", "ActiveState=inactive\nSubState=dead\nNRestarts=0\n"
                                            + ("" if exits else "Job=4242\n"))

        def job_runs():
            time.sleep(0.5)
            host.write(f"{base}/state", RUNNING)
            host.gunicorn()

        threading.Thread(target=job_runs, daemon=True).start()
        res = host.switch(timeout=5)
        if exits:
            assert res.returncode == 1 and "hello@b exited (it is dead)" in res.stderr, res.stdout + res.stderr
        else:
            assert res.returncode == 0 and res.stdout == "hello@b now serves r2\n", res.stdout + res.stderr
    finally:
        time.sleep(0.6)
        for s in host.servers:
            s.shutdown()
            s.server_close()
        subprocess.run(["rm", "-rf", base], check=True)
