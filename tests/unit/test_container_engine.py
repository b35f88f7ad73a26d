"""A container app's engine on the host: docker's proxy drop-in (written, restarted, taken back), the
image's commands, and switching an app between a virtualenv and a container. Planned without a host;
the shell the steps run is run here with a fake systemctl on PATH."""

import os
import subprocess

from provision import config as cfg
from provision.app import (ENGINE_PROXY_CLAIMS, ENGINE_PROXY_DROPIN, ENGINE_PROXY_ENV, Deploy, DockerProxyDropped,
                          engine_steps, image_step)
from provision.facts import Facts
from provision.source import scan
from provision.steps import Command, File

from .test_containers import ROOT, app


def fake_systemctl(tmp_path, docker: str | None):
    """A systemctl that knows docker.service in state ``docker`` ("active", "inactive"), or not at all
    (None: exit 5 for a restart of it, as systemd says "Unit docker.service not found"). Logs its calls."""
    log = tmp_path / "systemctl.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    known = "" if docker is None else docker
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$1" in daemon-reload) exit 0 ;; esac\n'
        'unit=""; for a; do case $a in *.service) unit=$a ;; esac; done\n'
        f'[ "$unit" = docker.service ] && state={known!r} || state=""\n'
        'case "$1" in\n'
        '  is-active) [ "$state" = active ] && exit 0; [ -n "$state" ] && exit 3; exit 4 ;;\n'
        '  try-restart|restart) [ -n "$state" ] && exit 0; echo "Unit $unit not found." >&2; exit 5 ;;\n'
        'esac\nexit 0\n')
    (bin_dir / "systemctl").chmod(0o755)
    return bin_dir, log


def run(commands, bin_dir) -> subprocess.CompletedProcess:
    """The commands as the executor runs a step's: in order, the first failure fails the step."""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-e", "-c", "\n".join(commands)], env=env, capture_output=True, text=True)


def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    return d


def proxy_command(s) -> Command:
    return next(st for st in engine_steps(s) if isinstance(st, Command) and st.label == "docker proxy")


def test_the_docker_proxy_restarts_a_running_docker_and_passes_on_a_host_without_docker_yet(tmp_path):
    """B8: the drop-in is written before the deploy installs docker (so a fresh install starts with
    it); its restart must not fail where docker.service does not exist yet."""
    s = app(src(tmp_path), proxy="http://10.0.0.1:3128")
    step = proxy_command(s)
    for state, restarted in ((None, False), ("inactive", False), ("active", True)):
        case = tmp_path / str(state)
        case.mkdir()
        bin_dir, log = fake_systemctl(case, state)
        res = run(step.commands, bin_dir)
        assert res.returncode == 0, (state, res.stderr)
        calls = log.read_text().splitlines()
        assert calls[0] == "daemon-reload"
        assert any(c.endswith("restart docker.service") for c in calls) == restarted, (state, calls)


def engine_facts(claims=None, dropin=True):
    f = {"type": "file", "owner": "root", "group": "root", "mode": 0o644, "sha256": "x"}
    return Facts({("ls", ENGINE_PROXY_CLAIMS): claims, ("file", ENGINE_PROXY_DROPIN): f if dropin else None,
                  ("file", ENGINE_PROXY_ENV): f if dropin else None})


def dropped(s) -> DockerProxyDropped:
    [step] = [st for st in engine_steps(s) if isinstance(st, DockerProxyDropped)]
    return step


def test_a_docker_app_with_a_proxy_claims_the_drop_in_and_one_without_takes_it_back(tmp_path):
    """B7: the drop-in went only ever in. It goes when no app on the host claims it any more."""
    with_proxy = app(src(tmp_path), proxy="http://10.0.0.1:3128")
    claim = f"{ENGINE_PROXY_CLAIMS}/hello"
    assert claim in [st.path for st in engine_steps(with_proxy) if isinstance(st, File)]
    assert not any(isinstance(st, DockerProxyDropped) for st in engine_steps(with_proxy))
    dropin = f"rm -f {ENGINE_PROXY_DROPIN} {ENGINE_PROXY_ENV}"
    # the proxy unset on a docker app: its claim and the drop-in go, the running docker restarts
    change = dropped(app(src(tmp_path))).plan(engine_facts(["hello"]), set())
    assert change.commands[:2] == [f"rm -f {claim}", dropin] and change.summary == "remove the drop-in"
    assert change.commands[2:] == ["systemctl daemon-reload", "if systemctl is-active --quiet docker.service; "
                                   "then systemctl restart docker.service; fi"]
    # an older provision's drop-in (no claims) goes on a docker app's deploy: its settings are docker's now
    assert dropped(app(src(tmp_path))).plan(engine_facts(None), set()).commands[0] == dropin
    # podman now: the claim and drop-in go; docker, which this app no longer uses, is not restarted
    podman = dropped(app(src(tmp_path), engine="podman", proxy="http://10.0.0.1:3128"))
    assert podman.plan(engine_facts(["hello"]), set()).commands == [f"rm -f {claim}", dropin, "systemctl daemon-reload"]
    # another app still claims it: only this app's claim goes
    venv = venv_app(tmp_path)
    change = dropped(venv).plan(engine_facts(["hello", "shop"]), set())
    assert change.commands == [f"rm -f {claim}"] and "other apps keep" in change.summary
    # nothing of this app's: a venv app leaves an unclaimed drop-in alone, and a host without any is a no-op
    assert dropped(venv).plan(engine_facts(None), set()) is None
    assert dropped(app(src(tmp_path))).plan(engine_facts([], dropin=False), set()) is None
    # both kinds of app deploy with it
    for s in (venv, app(src(tmp_path))):
        assert any(isinstance(st, DockerProxyDropped) for st in Deploy(s, scan(s.source), "r1").steps("r1"))


def venv_app(tmp_path):
    """The same app as a virtualenv app (container: false)."""
    (src(tmp_path) / "requirements.txt").write_text("flask\n")
    return cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(src(tmp_path)), proxy="http://10.0.0.1:3128"), ROOT)


def test_a_pulled_image_keeps_only_the_releases_tag_so_pruning_the_release_frees_it(tmp_path):
    """B9: pull + tag kept the registry's tag too; pruning's rmi of the release's tag only untagged it,
    and every image ever pulled stayed on the host. (No registry is reachable here: a real pull is
    not tested on a droplet.)"""
    for engine in ("docker", "podman"):
        s = app(src(tmp_path), image="reg.example.com/hello:1", engine=engine)
        assert image_step(s, "r2").commands == (
            f"{engine} pull -q reg.example.com/hello:1 >/dev/null",
            f"{engine} tag reg.example.com/hello:1 localhost/hello:r2",
            f"{engine} rmi reg.example.com/hello:1 >/dev/null")
