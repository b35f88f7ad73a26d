"""Push-to-deploy on a real droplet: bootstrap (pushes come as the deploy user, through sudo), fab
git.setup, then real `git push`es over SSH from a temporary repository (this machine's git and
OpenSSH client): a commit deployed, a commit whose app fails at import rejected with the old
release serving, a bad fabric.yaml, other branches, a second setup, the lock shared with fab
deploy. Order matters: one droplet."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import re
import time
import urllib.request

import pytest

from provision.layout import PUSH_TMP, PUSH_WORK_PREFIX, Layout
from provision.ssh import connect

from .conftest import FAB, ROOT

pytestmark = pytest.mark.integration
APP = Layout("hello")


def get(address: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}/", timeout=10) as r:
        return r.read().decode()


def as_deploy(droplet, command: str) -> tuple[int, str, str]:
    """``command`` as root on the droplet, through the deploy user's sudo (root's login is off)."""
    remote = connect(droplet.address, "deploy", 22, str(droplet.sandbox.key), str(droplet.sandbox.known_hosts))
    try:
        return remote.exec(f"sudo -n bash -c {shlex.quote(command)}", timeout=120)
    finally:
        remote.close()


@pytest.fixture(scope="module")
def host(droplet):
    """The droplet bootstrapped, with an inventory naming its deploy user."""
    res = droplet.fab("-H", droplet.name, "bootstrap")
    assert res.returncode == 0, res.stdout + res.stderr
    text = droplet.inventory.read_text().replace(f"{droplet.name} host={droplet.address} user=root",
                                                 f"{droplet.name} host={droplet.address} user=deploy")
    assert f"{droplet.name} host={droplet.address} user=deploy" in text
    droplet.inventory.write_text(text)
    return droplet


def git_env(sb) -> dict:
    """This machine's git, pushing over SSH with the sandbox's key and known hosts only."""
    return {**os.environ, "GIT_SSH_COMMAND": f"ssh -F /dev/null -i {sb.key} -o UserKnownHostsFile={sb.known_hosts} "
                                             "-o StrictHostKeyChecking=yes -o BatchMode=yes",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": "/dev/null"}


@pytest.fixture(scope="module")
def repo(host, tmp_path_factory):
    """A git repository of the example app, with the production remote added as setup prints it."""
    d = tmp_path_factory.mktemp("push") / "hello"
    shutil.copytree(ROOT / "examples/hello", d)
    (d / "fabric.yaml").write_text("app:\n  name: hello\n")
    env = git_env(host.sandbox)

    def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["git", *args], cwd=d, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 or not check, f"git {' '.join(args)}: {r.stdout}{r.stderr}"
        return r
    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-qm", "first")
    git.path, git.env = d, env
    return git


def commit(git, message: str, greeting: str | None = None, fabric: str | None = None) -> str:
    app = git.path / "app.py"
    if greeting is not None:
        app.write_text(re.sub(r'return "[^"]*\\n"', f'return "{greeting}\\\\n"', app.read_text(), count=1))
    if fabric is not None:
        (git.path / "fabric.yaml").write_text(fabric)
    git("commit", "-qam", message)
    return git("rev-parse", "HEAD").stdout.strip()


def last_logged(host) -> dict:
    rc, out, err = as_deploy(host, f"tail -n 1 {APP.release_log}")
    assert rc == 0, err
    return json.loads(out)


def remote_main(git) -> str:
    return git("ls-remote", "production", "refs/heads/main").stdout.split()[0]


def test_setup_prints_the_remote_and_a_second_setup_changes_nothing(host, repo):
    res = host.fab("-H", host.name, "git.setup")
    assert res.returncode == 0, res.stdout + res.stderr
    url = f"ssh://deploy@{host.address}:22{APP.git_repo}"
    assert f"git remote add production {url}" in res.stdout
    assert f"GIT_SSH_COMMAND='ssh -i {host.sandbox.key}'" in res.stdout
    repo("remote", "add", "production", url)
    again = host.fab("-H", host.name, "git.setup")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{host.name}: no changes, nothing restarted" in again.stdout, again.stdout
    rc, out, _ = as_deploy(host, f"stat -c '%U %a %n' {APP.git_repo} {APP.git_repo}/hooks "
                                 f"{APP.git_repo}/hooks/pre-receive {APP.push_settings} /opt/provision/receive "
                                 f"/opt/provision/code/provision/receive.py {PUSH_TMP}")
    assert out.split("\n")[:7] == [f"deploy 700 {APP.git_repo}", f"root 755 {APP.git_repo}/hooks",
                                   f"root 755 {APP.git_repo}/hooks/pre-receive", f"root 600 {APP.push_settings}",
                                   "root 755 /opt/provision/receive",
                                   "root 644 /opt/provision/code/provision/receive.py", f"root 700 {PUSH_TMP}"], out
    # the pushed history (fabric.yaml and all) is the pushing user's alone: not the app's, not anyone's
    rc, _, err = as_deploy(host, f"runuser -u nobody -- cat {APP.git_repo}/HEAD")
    assert rc != 0 and "Permission denied" in err, err


def test_a_push_deploys_the_pushed_commit(host, repo):
    sha = commit(repo, "greeting", greeting="Hello from a push!")
    res = repo("push", "production", "main", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"remote: {host.name}: ok      health http://127.0.0.1/" in res.stderr, res.stderr
    assert get(host.address) == "Hello from a push!\n"
    logged = last_logged(host)
    assert (logged["action"], logged["commit"], logged["via"], logged["pusher"]) == ("deploy", sha, "push", "deploy")
    assert logged["release"].endswith("-" + sha[:7])
    assert remote_main(repo) == sha
    releases = host.fab("-H", host.name, "releases")
    assert f"commit {sha[:12]} (via push)" in releases.stdout, releases.stdout


def test_a_push_whose_app_fails_at_import_is_rejected_and_the_old_release_serves(host, repo):
    live = remote_main(repo)
    (repo.path / "app.py").write_text((repo.path / "app.py").read_text() + "\nimport no_such_module_here\n")
    bad = commit(repo, "broken")
    res = repo("push", "production", "main", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "ModuleNotFoundError: No module named 'no_such_module_here'" in res.stderr, res.stderr
    assert "pre-receive hook declined" in res.stderr
    assert get(host.address) == "Hello from a push!\n"
    assert remote_main(repo) == live
    logged = last_logged(host)
    assert (logged["action"], logged["commit"]) == ("refused", bad)
    rc, out, _ = as_deploy(host, f"ls {PUSH_TMP} | grep -c {PUSH_WORK_PREFIX} || true")
    assert out.strip() == "0"  # the pushed tree is gone
    repo("reset", "-q", "--hard", "HEAD~1")


def refused_in_one_line(repo, message: str, fabric: str, needle: str) -> tuple[str, str]:
    """Push a commit with this fabric.yaml: rejected, the branch unchanged, one line naming the
    problem (the line and the commit returned), no traceback; the commit dropped again."""
    live = remote_main(repo)
    bad = commit(repo, message, fabric=fabric)
    res = repo("push", "production", "main", check=False)
    assert res.returncode == 1
    problem = [line for line in res.stderr.splitlines() if needle in line]
    assert len(problem) == 1 and "Traceback" not in res.stderr, res.stderr
    assert remote_main(repo) == live
    repo("reset", "-q", "--hard", "HEAD~1")
    return problem[0], bad


def test_a_bad_fabric_yaml_rejects_the_push_in_one_line(host, repo):
    problem, bad = refused_in_one_line(repo, "bad yaml", "app:\n  name: hello\n  workers: [2\n", "fabric.yaml of commit")
    assert f"fabric.yaml of commit {bad[:7]}, line" in problem and "; fix the YAML and push again" in problem


def test_settings_leading_out_of_the_pushed_tree_reject_the_push_in_one_line(host, repo):
    # ../.. of the tree on the host is a folder of the host: templates from there would be another user's
    problem, bad = refused_in_one_line(repo, "templates outside", "app:\n  name: hello\n  templates: ../../tpl\n",
                                       "leads out of the repository")
    assert f"app.templates of commit {bad[:7]}" in problem


def test_other_branches_are_stored_and_the_deploy_branch_cannot_be_deleted(host, repo):
    live = remote_main(repo)
    repo("checkout", "-q", "-b", "feature")
    sha = commit(repo, "feature work", greeting="Not deployed")
    res = repo("push", "production", "feature", check=False)
    assert res.returncode == 0 and "remote: " not in res.stderr, res.stderr
    assert repo("ls-remote", "production", "refs/heads/feature").stdout.split()[0] == sha
    assert get(host.address) == "Hello from a push!\n"
    gone = repo("push", "production", ":main", check=False)
    assert gone.returncode == 1 and "deleting it is refused" in gone.stderr, gone.stderr
    assert remote_main(repo) == live
    repo("checkout", "-q", "main")


def wait_for_holder(host, seconds: float = 120) -> str:
    """The deploy lock's holder once someone holds it (bounded wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rc, out, _ = as_deploy(host, f"cat {APP.lock_holder} 2>/dev/null || true")  # there while held
        if out.strip():
            return out
        time.sleep(0.3)
    raise AssertionError("no deploy took the lock")


def test_the_lock_is_shared_with_fab_deploy(host, repo):
    # a push holds it: fab deploy is refused, naming the push
    commit(repo, "slow release", greeting="Hello after a slow push",
           fabric="app:\n  name: hello\n  release_command: sleep 15\n")
    pushing = subprocess.Popen(["git", "push", "production", "main"], cwd=repo.path, env=repo.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "(git push)" in wait_for_holder(host)
        res = host.fab("-H", host.name, "deploy")
        assert res.returncode == 1
        assert "another deploy holds the lock: deploy on " in res.stdout + res.stderr
        assert "(git push) since" in res.stdout + res.stderr, res.stdout + res.stderr
    finally:
        _, err = pushing.communicate(timeout=600)
    assert pushing.returncode == 0, err
    assert get(host.address) == "Hello after a slow push\n"
    # fab deploy holds it: a push is refused, naming the deploy, and rejected
    deploying = subprocess.Popen([FAB, "-H", host.name, "deploy"], cwd=ROOT,
                                 env=host.env(FABRIC_APP_RELEASE_COMMAND="sleep 15"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "(git push)" not in wait_for_holder(host)
        sha = commit(repo, "while fab deploys", greeting="Hello from a refused push")
        res = repo("push", "production", "main", check=False)
        assert res.returncode == 1
        assert "another deploy holds the lock: " in res.stderr and "pre-receive hook declined" in res.stderr, res.stderr
        assert remote_main(repo) != sha
    finally:
        out, err = deploying.communicate(timeout=600)
    assert deploying.returncode == 0, out + err



def test_one_push_deploys_at_a_time(host, repo):
    # B, begun from the live commit, comes while A deploys: refused, A goes live and stays
    live = remote_main(repo)
    a = commit(repo, "push A", greeting="Hello from push A",
               fabric="app:\n  name: hello\n  release_command: sleep 10\n")
    repo("branch", "-f", "other", live)
    pushing = subprocess.Popen(["git", "push", "production", "main"], cwd=repo.path, env=repo.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "(git push)" in wait_for_holder(host)
        repo("checkout", "-q", "other")
        commit(repo, "push B", greeting="Hello from push B")
        res = repo("push", "production", "other:main", check=False)
        assert res.returncode == 1
        assert "another push of hello is deploying on this host; push again when it ends" in res.stderr, res.stderr
    finally:
        _, err = pushing.communicate(timeout=600)
        repo("checkout", "-q", "main")
    assert pushing.returncode == 0, err
    assert get(host.address) == "Hello from push A\n" and remote_main(repo) == a
