"""Container apps (app.container): settings, the host layout of their slots, and the deploy's steps,
planned without a host; the program their units run (remote/container_run.py) with a fake engine."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from provision import config as cfg
from provision.app import Deploy, Rollback, container_configs, image_step, packages
from provision.errors import ProvisionError
from provision.layout import Layout
from provision.release import Prune, Switch, stop_idle
from provision.remote import source as program_source
from provision.source import scan
from provision.steps import Command

from .test_release import UP, host, with_log

ROOT = Path(__file__).resolve().parents[2]


def app(tmp_path, dockerfile=True, **over):
    (tmp_path / "app.py").write_text("print('hi')\n")
    if dockerfile:
        (tmp_path / "Dockerfile").write_text("FROM localhost/debian:12\n")
    raw = dict(cfg.DEFAULTS, name="hello", source=str(tmp_path), container=True, **over)
    return cfg.build(raw, ROOT)


def test_a_container_app_needs_a_dockerfile_or_an_image_and_no_requirements(tmp_path):
    s = app(tmp_path)
    assert (s.container, s.engine, s.image, s.port) == (True, "docker", "", 8000)
    assert s.layout.container and packages(s) == ("nginx", "docker.io")
    with pytest.raises(ProvisionError, match=r"app.container=True: no Dockerfile in .*add one, or name an image"):
        app(tmp_path / "x" if (tmp_path / "x").mkdir() is None else None, dockerfile=False)
    assert app(tmp_path, image="registry.example.com/hello:1.2").image == "registry.example.com/hello:1.2"
    with pytest.raises(ProvisionError, match=r"app.engine='lxc': expected docker or podman"):
        app(tmp_path, engine="lxc")
    with pytest.raises(ProvisionError, match=r"app.image=.*set app.container: true too"):
        cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello", image="x:1"), ROOT)
    assert packages(app(tmp_path, engine="podman")) == ("nginx", "podman", "runc", "catatonit", "iptables")


def test_each_slot_of_a_container_app_listens_on_a_local_port_of_its_own():
    lay = Layout("hello", container=True)
    a, b = lay.slot_port("a"), lay.slot_port("b")
    assert 20000 <= a < b == a + 1 <= 29999 and a % 2 == 0
    assert lay.upstream("b") == f"server 127.0.0.1:{b} fail_timeout=0;\n"
    assert (lay.address("a"), lay.answers("a")) == (f"127.0.0.1:{a}", f"127.0.0.1:{a}")
    # either kind of upstream file names its slot, whatever the layout reading it
    assert Layout("hello").live_slot(lay.upstream("b")) == "b" and lay.live_slot(Layout("hello").upstream("a")) == "a"
    assert Layout("other", container=True).live_slot(lay.upstream("a")) is None
    assert lay.image("r2") == "localhost/hello:r2"


def test_a_container_release_runs_its_image_and_holds_no_release_id_in_its_configs(tmp_path):
    s = app(tmp_path, env={"A": "1"})
    configs = container_configs(s)
    settings = json.loads(configs["container.json"])
    assert settings["slot_ports"] == {"a": s.layout.slot_port("a"), "b": s.layout.slot_port("b")}
    assert settings["env_files"] == ["env", "/srv/hello/secrets.env", "/srv/hello/shared/.env"]
    unit = configs["unit"].decode()
    assert "ExecStart=/usr/bin/python3 -I /srv/hello/slots/%i/.provision/container-run.py serve %i" in unit
    assert "ExecStop=-/usr/bin/docker stop --time 30 hello-%i" in unit and "Requires=docker.service" in unit
    assert configs == container_configs(s)  # the same settings, the same release: a no-op stays one
    src = scan(s.source)
    d = Deploy(s, src, "r9")
    steps = d.steps("r9")
    names = [st.name for st in steps]
    assert not any("virtualenv" in n for n in names) and "image localhost/hello:r9" in names
    assert names.index("image localhost/hello:r9") < names.index("switch hello")
    assert not any(n.endswith("hello@.socket") for n in names)


def test_the_image_is_built_with_the_proxy_from_the_environment_or_pulled(tmp_path):
    s = app(tmp_path, proxy="http://user:Xq9pw0rd7@10.0.0.1:3128")
    step = image_step(s, "r2")
    assert isinstance(step, Command) and step.when == ("code",)
    build = step.commands[0]
    assert build.startswith("docker build -q --build-arg http_proxy --build-arg https_proxy --build-arg no_proxy ")
    assert "Xq9pw0rd7" not in build and build.endswith("-t localhost/hello:r2 /srv/hello/releases/r2 >/dev/null")
    pulled = image_step(app(tmp_path, image="reg.example.com/hello:1", engine="podman"), "r2").commands
    assert pulled[1:3] == ("podman pull -q reg.example.com/hello:1 >/dev/null", "podman tag reg.example.com/hello:1 localhost/hello:r2")


def test_the_switch_of_a_container_app_gates_on_the_slots_port_and_checks_its_image(tmp_path):
    s = app(tmp_path)
    args = json.loads(shlex.split(Switch(s, "r2", prove=True).plan(host(), set()).commands[0])[-1])
    port = s.layout.slot_port("b")
    assert args["new"]["socket"] == f"127.0.0.1:{port}" and args["new"]["address"] == f"127.0.0.1:{port}"
    assert args["container"] == {"engine": "docker", "image": "localhost/hello:r2", "name": "hello-b"}
    # no socket units to stop
    assert stop_idle(s, host(live="a", b="r0", b_state=UP), "a")[-1] == "systemctl stop hello@b.service"
    rollback = Rollback(s, None)
    assert "container@" not in rollback.app_unit and "container-run.py" in rollback.app_unit


def test_pruning_a_container_app_removes_the_images_of_releases_gone(tmp_path):
    s = app(tmp_path)
    facts = with_log(host(releases=("r1",)), "")
    change = Prune(s, "r1").plan(facts, {"switched"})
    assert change.summary == "unused images"
    assert "docker images --format '{{.Tag}}' localhost/hello" in change.commands[-1]
    assert "docker rmi localhost/hello:\"$t\"" in change.commands[-1]


def fake_engine(tmp_path):
    """A fake engine at a path container-run.py reaches by its settings: records its arguments and the
    env file it was given."""
    log = tmp_path / "engine.log"
    engine = tmp_path / "bin" / "docker"
    engine.parent.mkdir()
    engine.write_text("#!/bin/sh\n" f"echo \"$@\" >> {log}\n"
                      "for a; do case $prev in --env-file) cat \"$a\" >> " + str(log) + " ;; esac; prev=$a; done\n"
                      "exit 0\n")
    engine.chmod(0o755)
    return engine, log


@pytest.mark.skipif(os.geteuid() != 0, reason="the env files it reads must be root's")
def test_container_run_gives_the_engine_the_apps_environment_in_a_root_only_file(tmp_path):
    from provision.remote.lib_envfile import env_text

    s = app(tmp_path / "src" if (tmp_path / "src").mkdir() is None else None, env={"PLAIN": "1"})
    own = tmp_path / "releases" / "r5" / ".provision"
    own.mkdir(parents=True)
    settings = json.loads(container_configs(s)["container.json"])
    engine, log = fake_engine(tmp_path)
    secrets, shared = tmp_path / "secrets.env", tmp_path / "shared.env"
    secrets.write_text(env_text({"TOKEN": "s3cr=t \"x\"", "PLAIN": "2"}))
    secrets.chmod(0o600)
    shared.write_text(env_text({"PLAIN": "3"}))
    shared.chmod(0o640)
    (own / "env").write_text(env_text({"PLAIN": "1", "ONLY": "env"}))
    settings.update(env_files=["env", str(secrets), str(shared)], run_dir=str(tmp_path / "run"), user="nobody")
    (own / "container.json").write_text(json.dumps(settings))
    prog = own / "container-run.py"
    prog.write_text(program_source("container_run.py").replace('"/usr/bin/" + c["engine"]', repr(str(engine))))
    res = subprocess.run([sys.executable, "-I", str(prog), "once", "--", "/bin/sh", "-c", "true"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    lines = [line for line in log.read_text().splitlines() if not line.startswith("image inspect ")]
    assert lines[0].startswith("run --rm -i --name hello.p.") and " --env-file " in lines[0] and lines[0].endswith(
        "--cap-drop=ALL --security-opt=no-new-privileges --init --cgroup-parent=provision-hello.slice localhost/hello:r5 /bin/sh -c true")
    assert lines[1:] == ["HOME=/tmp", "ONLY=env", "PLAIN=3", 'TOKEN=s3cr=t "x"']
    assert not list((tmp_path / "run").iterdir())  # a one-off's env file goes with it


def test_a_container_apps_processes_run_in_containers_of_the_live_release(tmp_path):
    from provision.processes import unit_steps

    s = app(tmp_path, processes={"worker": "celery -A app worker"})
    files = {st.path: st.content.decode() for st in unit_steps(s, "r3", "") if hasattr(st, "content")}
    unit = files["/etc/systemd/system/hello.worker.service"]
    assert ("ExecStart=/usr/bin/python3 -I /srv/hello/releases/r3/.provision/container-run.py once --name hello.p.worker -- "
            '/bin/sh -c "celery -A app worker"') in unit
    assert "User=" not in unit  # the image says who runs it
