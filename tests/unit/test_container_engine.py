"""A container app's engine on the host: docker's proxy drop-in (written, restarted, taken back), the
image's commands, and switching an app between a virtualenv and a container. Planned without a host;
the shell the steps run is run here with a fake systemctl on PATH."""

import os
import subprocess

from provision.app import engine_steps
from provision.steps import Command

from .test_containers import app


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

