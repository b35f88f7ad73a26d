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
from provision.steps import Command, File, plan

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
    wsgi = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), ROOT)
    assert containernet.steps(wsgi) == []


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
@pytest.mark.parametrize("how", [["serve", "a"], ["once", "--", "/bin/sh", "-c", "true"],
                                 ["once", "--name", "hello.p.w", "--", "true"]])
def test_every_container_of_the_app_runs_on_its_network(tmp_path, how):
    s = app(tmp_path / "src" if (tmp_path / "src").mkdir() is None else None)
    own = tmp_path / "releases" / "r5" / ".provision"
    own.mkdir(parents=True)
    settings = json.loads(container_configs(s)["container.json"])
    assert settings["network"] == "provision-hello"
    engine, log = fake_engine(tmp_path)
    settings.update(env_files=["env", str(tmp_path / "none.env"), str(tmp_path / "none2.env")], run_dir=str(tmp_path / "run"),
                    user="nobody")  # a user this machine has
    (own / "container.json").write_text(json.dumps(settings))
    prog = own / "container-run.py"
    prog.write_text(program_source("container_run.py").replace('"/usr/bin/" + c["engine"]', repr(str(engine))))
    res = subprocess.run([sys.executable, "-I", str(prog), *how], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    run = next(line.split() for line in log.read_text().splitlines() if line.startswith("run "))
    assert run[run.index("--network") + 1] == "provision-hello"
    assert run.index("--network") < run.index("localhost/hello:r5")  # an engine option, not the command's


def test_the_rules_drop_loopback_and_container_traffic_from_elsewhere_before_any_nat():
    text = containernet.rules().decode()
    assert text.startswith("# Managed by provision")
    # replaced whole and atomically: the table made (so that deleting it never fails), deleted, made again
    assert "table inet provision-containers\ndelete table inet provision-containers\ntable inet provision-containers {" in text
    prerouting = text[text.index("chain prerouting"):text.index("chain forward")]
    assert "type filter hook prerouting priority raw;" in prerouting  # -300: before conntrack and the DNAT (-100)
    rules = [line.strip() for line in prerouting.splitlines() if line.strip().endswith("drop")]
    assert rules == ['iifname != "lo" ip daddr 127.0.0.0/8 drop', 'iifname != "lo" ip6 daddr ::1 drop',
                     'iifname != "pvapp-*" fib daddr oifname "pvapp-*" drop',
                     'iifname != "cni-podman*" fib daddr oifname "cni-podman*" drop',
                     'iifname != "podman*" fib daddr oifname "podman*" drop']
    assert 'iifname "pvapp-*" oifname "pvapp-*" drop' in text[text.index("chain forward"):]
    assert "policy drop" not in text  # drops only these: the rest is the other tables' (bootstrap's firewall, the engines')
    # every app's bridge is one the rules know
    assert containernet.bridge(SimpleNamespace(name="shop")).startswith(containernet.BRIDGE_PREFIX)


def test_the_rules_load_at_boot_before_the_engines_and_go_with_their_unit():
    unit = containernet.unit().decode()
    assert f"ExecStart=/usr/sbin/nft -f {containernet.RULES_FILE}" in unit
    assert "ExecStop=-/usr/sbin/nft delete table inet provision-containers" in unit
    assert "Before=network-pre.target docker.service podman.service" in unit and "After=nftables.service" in unit
    assert "WantedBy=sysinit.target" in unit


def test_the_rules_are_installed_checked_and_loaded_once_then_nothing_to_do(tmp_path):
    s = app(tmp_path)
    steps = containernet.steps(s)
    etc = {"type": "dir", "mode": 0o755, "owner": "root", "group": "root"}
    fresh = {("package", "nftables"): False, ("file", "/etc/provision"): etc,
             ("file", containernet.RULES_FILE): None, ("file", containernet.UNIT_FILE): None,
             ("service", containernet.UNIT): None, ("command", network_step(s).unless): 1}
    planned = plan(steps, Facts(fresh))
    assert [p.step.name for p in planned if p.change] == [
        "packages nftables", f"file {containernet.RULES_FILE}", f"file {containernet.UNIT_FILE}",
        f"service {containernet.UNIT}", "network provision-hello"]
    service = next(p for p in planned if p.step.name == f"service {containernet.UNIT}").change.commands
    assert service == ["systemctl daemon-reload", f"systemctl enable --quiet {containernet.UNIT}",
                       f"/usr/sbin/nft -c -f {containernet.RULES_FILE}", f"systemctl reload-or-restart {containernet.UNIT}"]
    same = {**fresh, ("package", "nftables"): True, ("command", network_step(s).unless): 0,
            ("service", containernet.UNIT): {"loaded": True, "active": True, "enabled": True},
            **{("file", f.path): {"type": "file", "sha256": f.sha256, "owner": "root", "group": "root", "mode": 0o644}
               for f in steps if isinstance(f, File)}}
    assert [p.step.name for p in plan(steps, Facts(same)) if p.change] == []  # a no-op deploy: facts only
    # new rules (a newer provision): checked, then reloaded in place (nft -f replaces the table atomically)
    old = {**same, ("file", containernet.RULES_FILE): {"type": "file", "sha256": "0" * 64, "owner": "root",
                                                       "group": "root", "mode": 0o644}}
    changed = [p for p in plan(steps, Facts(old)) if p.change]
    assert [p.step.name for p in changed] == [f"file {containernet.RULES_FILE}", f"service {containernet.UNIT}"]
    assert changed[1].change.commands == [f"/usr/sbin/nft -c -f {containernet.RULES_FILE}",
                                          f"systemctl reload {containernet.UNIT}"]
