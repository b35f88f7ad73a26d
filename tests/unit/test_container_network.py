"""A container app's own engine network (provision/containernet.py) and the --network its containers
run with (remote/container_run.py), planned without a host; shell commands run against a fake engine."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from provision import config as cfg, containernet
from provision.app import Deploy, container_configs
from provision.facts import Facts
from provision.remote import source as program_source
from provision.source import scan
from provision.steps import Command

from .test_containers import ROOT, app, fake_engine


def network_step(s):
    return next(st for st in containernet.steps(s) if isinstance(st, Command) and st.name.startswith("network "))


def test_each_container_app_gets_a_network_of_its_own_made_when_missing(tmp_path):
    s = app(tmp_path)
    step = network_step(s)
    assert step.name == "network provision-hello"
    bridge = containernet.bridge(s)
    assert bridge.startswith("pvapp-") and len(bridge) <= 15  # a Linux interface name
    assert bridge != containernet.bridge(SimpleNamespace(name="hello2"))
    missing = Facts({("command", step.unless): 1})
    assert step.plan(missing, set()).commands == [
        f"docker network create -o com.docker.network.bridge.enable_icc=false -o com.docker.network.bridge.name={bridge} "
        "provision-hello >/dev/null"]
    assert step.plan(Facts({("command", step.unless): 0}), set()) is None  # there: nothing to do
    podman = network_step(app(tmp_path, engine="podman"))
    assert podman.plan(Facts({("command", podman.unless): 1}), set()).commands == ["podman network create -o isolate=true provision-hello >/dev/null"]
    assert containernet.steps(cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), ROOT)) == []


@pytest.mark.parametrize("engine,answer,there", [
    ("docker", "{bridge} false", True),
    ("docker", "{bridge} true", False),  # inter-container communication on: not provision's
    ("docker", "", False),  # no such network
    ("podman", "true", True),
    ("podman", "", False),
])
def test_the_network_counts_as_there_only_as_provision_makes_it(tmp_path, engine, answer, there):
    s = app(tmp_path, engine=engine)
    fake = tmp_path / "bin" / engine
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n[ -n '{answer}' ] || exit 1\n"
                    f"echo '{answer.format(bridge=containernet.bridge(s))}'\n")
    fake.chmod(0o755)
    check = network_step(s).unless
    rc = subprocess.run(["sh", "-c", check], env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}).returncode
    assert (rc == 0) == there
    assert (tmp_path / "args").read_text().startswith("network inspect -f ")
    assert (tmp_path / "args").read_text().rstrip().endswith(" provision-hello")


def test_the_network_is_made_after_the_engine_and_before_the_release_runs(tmp_path):
    s = app(tmp_path)
    names = [st.name for st in Deploy(s, scan(s.source), "r9").steps("r9")]
    assert names.index("packages nginx docker.io") < names.index("network provision-hello") < names.index(
        "image localhost/hello:r9") < names.index("switch hello")


@pytest.mark.skipif(os.geteuid() != 0, reason="the env files it reads must be root's")
@pytest.mark.parametrize("how", [["serve", "a"], ["once", "/bin/sh", "-c", "true"], ["once", "--name", "hello-w", "true"]])
def test_every_container_of_the_app_runs_on_its_network(tmp_path, how):
    s = app(tmp_path / "src" if (tmp_path / "src").mkdir() is None else None)
    own = tmp_path / "releases" / "r5" / ".provision"
    own.mkdir(parents=True)
    settings = json.loads(container_configs(s)["container.json"])
    assert settings["network"] == "provision-hello"
    engine, log = fake_engine(tmp_path)
    settings.update(env_files=["env", str(tmp_path / "none.env"), str(tmp_path / "none2.env")], run_dir=str(tmp_path / "run"))
    (own / "container.json").write_text(json.dumps(settings))
    prog = own / "container-run.py"
    prog.write_text(program_source("container_run.py").replace('"/usr/bin/" + c["engine"]', repr(str(engine))))
    res = subprocess.run([sys.executable, "-I", str(prog), *how], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    run = next(line.split() for line in log.read_text().splitlines() if line.startswith("run "))
    assert run[run.index("--network") + 1] == "provision-hello"
    assert run.index("--network") < run.index("localhost/hello:r5")  # an engine option, not the command's
