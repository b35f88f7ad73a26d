"""Push-to-deploy with root's login (no bootstrap, no sudo): the hook runs the program itself, so
git's hook environment (GIT_DIR, the quarantine) would reach every root step unless dropped."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from provision.layout import Layout

from .conftest import ROOT
from .test_push import get, git_env

pytestmark = pytest.mark.integration
APP = Layout("hello")


def test_a_push_as_root_deploys_with_gits_environment_dropped(droplet, tmp_path):
    res = droplet.fab("-H", droplet.name, "git.setup")
    assert res.returncode == 0, res.stdout + res.stderr
    url = f"ssh://root@{droplet.address}:22{APP.git_repo}"
    assert f"git remote add production {url}" in res.stdout
    assert "sudo" not in droplet.sh(f"cat {APP.git_repo}/hooks/pre-receive")
    d = tmp_path / "hello"
    shutil.copytree(ROOT / "examples/hello", d)
    (d / "fabric.yaml").write_text("app:\n  name: hello\n")
    # a requirement from a git repository: root's pip runs git, which git's hook environment (GIT_DIR=.,
    # the quarantine) would send to the pushed repository ("ref updates forbidden inside quarantine")
    droplet.sh("set -e; mkdir -p /opt/tinypkg && cd /opt/tinypkg && git init -q && "
               "printf '[build-system]\\nrequires = [\"setuptools\"]\\nbuild-backend = \"setuptools.build_meta\"\\n"
               "[project]\\nname = \"tinypkg\"\\nversion = \"0.1\"\\n' > pyproject.toml && "
               "echo 'X = 1' > tinypkg.py && git add -A && git -c user.name=t -c user.email=t@example.com commit -qm x")
    with open(d / "requirements.txt", "a") as f:
        f.write("git+file:///opt/tinypkg#egg=tinypkg\n")
    env = git_env(droplet.sandbox)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=d, env=env, capture_output=True, text=True, timeout=600)
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-qm", "first"),
                 ("remote", "add", "production", url)):
        assert git(*args).returncode == 0
    res = git("push", "production", "main")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert get(droplet.address) == "Hello from provision!\n"
    logged = droplet.sh(f"tail -n 1 {APP.release_log}")
    assert '"pusher": "root"' in logged and '"via": "push"' in logged, logged
