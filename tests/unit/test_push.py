"""Push-to-deploy's pure parts: the hook (run with a fake git and program), URLs, the settings a
host records and layers, the code sent, and the local transport with a real bash."""

import base64
import io
import json
import os
import subprocess
import sys
import signal
import tarfile
import time

import pytest

from provision import push
from provision.errors import ProvisionError, StepFailed
from provision.local import Local
from provision.receive import project_app

SHA = "3" * 40


@pytest.fixture
def hooked(tmp_path):
    """The hook for app hello (branch main), with a fake git (its archive: the commit's name) and
    a fake program that records its arguments and stdin, exiting with $PROGRAM_RC."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "git").write_text('#!/bin/bash\ncase "$1" in\n'
                              '  archive) [ -n "${ARCHIVE_FAILS:-}" ] && { echo "fatal: bad object" >&2; exit 128; }\n'
                              '           echo "tar of ${@: -1}" ;;\n'
                              '  rev-parse) [ -n "${BRANCH_NOW:-}" ] || exit 1; echo "$BRANCH_NOW" ;;\n'
                              '  *) exit 1 ;;\nesac\n')
    prog = tmp_path / "receive"
    prog.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/calls\ncat >> {tmp_path}/calls\n'
                    'echo "deploying..."\nexit ${PROGRAM_RC:-0}\n')
    hook = tmp_path / "pre-receive"
    hook.write_text(push.hook("hello", "main", sudo=False, program_path=str(prog)))
    for f in (bin_ / "git", prog, hook):
        f.chmod(0o755)

    def run(lines: str, rc: int = 0, **env_):
        env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", PROGRAM_RC=str(rc), **env_)
        r = subprocess.run([str(hook)], input=lines, env=env, capture_output=True, text=True, timeout=10)
        calls = tmp_path / "calls"
        out = calls.read_text() if calls.exists() else ""
        if calls.exists():
            calls.unlink()
        return r, out
    return run


def test_a_push_to_the_deploy_branch_runs_the_program_with_the_commits_tree(hooked):
    r, calls = hooked(f"{'1' * 40} {SHA} refs/heads/main\n")
    assert r.returncode == 0, r.stderr
    assert calls == f"--app hello --commit {SHA} --branch main --old {'1' * 40}\ntar of {SHA}\n"
    assert "deploying..." in r.stdout  # the program's lines reach the pusher


def test_a_failed_deploy_rejects_the_push(hooked):
    r, calls = hooked(f"{'1' * 40} {SHA} refs/heads/main\n", rc=1)
    assert r.returncode == 1 and calls


def test_other_branches_are_stored_without_a_deploy(hooked):
    r, calls = hooked(f"{'0' * 40} {SHA} refs/heads/feature\n{SHA} {'0' * 40} refs/heads/old\n"
                      f"{'0' * 40} {SHA} refs/tags/v1\n")
    assert r.returncode == 0 and calls == ""


def test_deleting_the_deploy_branch_is_refused(hooked):
    r, calls = hooked(f"{SHA} {'0' * 40} refs/heads/main\n")
    assert r.returncode == 1 and calls == ""
    assert "deleting it is refused" in r.stderr


def test_the_branch_moved_since_the_push_began_is_refused_before_any_deploy(hooked):
    # B2: another push landed meanwhile (the branch is no longer the old value this push saw)
    r, calls = hooked(f"{'1' * 40} {SHA} refs/heads/main\n", BRANCH_NOW="2" * 40)
    assert r.returncode == 1 and calls == ""
    assert "main moved on the host (to 2222222) while you pushed; fetch and push again" in r.stderr
    r, calls = hooked(f"{'1' * 40} {SHA} refs/heads/main\n", BRANCH_NOW="1" * 40)
    assert r.returncode == 0 and calls
    r, calls = hooked(f"{'0' * 40} {SHA} refs/heads/main\n")  # the first push: no branch yet
    assert r.returncode == 0 and calls
    r, calls = hooked(f"{'0' * 40} {SHA} refs/heads/main\n", BRANCH_NOW="2" * 40)  # created meanwhile
    assert r.returncode == 1 and calls == ""


def test_a_failed_git_archive_rejects_the_push_in_one_line(hooked):
    r, calls = hooked(f"{'1' * 40} {SHA} refs/heads/main\n", ARCHIVE_FAILS="1")
    assert r.returncode == 1
    assert "provision: git archive of 3333333 failed on the host; push refused" in r.stderr


def sudo_hook(tmp_path, sudo_body: str):
    """The sudo variant of the hook, with a fake sudo (``sudo_body``) and git, run for real."""
    bin_ = tmp_path / "sbin"
    bin_.mkdir()
    (bin_ / "git").write_text('#!/bin/bash\n[ "$1" = archive ] && echo "tar of ${@: -1}"\n[ "$1" = archive ]\n')
    (bin_ / "sudo").write_text(sudo_body)
    prog = tmp_path / "receive"
    prog.write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/calls\ncat >> {tmp_path}/calls\n')
    hook = tmp_path / "pre-receive"
    hook.write_text(push.hook("hello", "main", sudo=True, program_path=str(prog)))
    for f in (bin_ / "git", bin_ / "sudo", prog, hook):
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")
    return subprocess.run([str(hook)], input=f"{'1' * 40} {SHA} refs/heads/main\n", env=env, capture_output=True,
                          text=True, timeout=10)


def test_the_sudo_hook_runs_the_program_through_sudo_n(tmp_path):
    r = sudo_hook(tmp_path, f'#!/bin/bash\nprintf "%s\\n" "$*" >> {tmp_path}/sudo-calls\n[ "$1" = -n ] || exit 1\nshift\n"$@"\n')
    assert r.returncode == 0, r.stderr
    sudo_calls = (tmp_path / "sudo-calls").read_text().splitlines()
    assert sudo_calls == ["-n true", f"-n {tmp_path}/receive --app hello --commit {SHA} --branch main --old {'1' * 40}"]
    assert (tmp_path / "calls").read_text().endswith(f"tar of {SHA}\n")


def test_without_passwordless_sudo_the_hook_says_so_in_one_line(tmp_path):
    r = sudo_hook(tmp_path, '#!/bin/bash\necho "sudo: a password is required" >&2\nexit 1\n')
    assert r.returncode == 1 and not (tmp_path / "calls").exists()
    assert r.stderr.strip().splitlines() == [
        f"provision: {os.environ.get('USER') or __import__('getpass').getuser()} cannot run sudo without a password "
        "on this host; give it passwordless sudo (NOPASSWD, as fab bootstrap does) or push as root"]


def test_the_hook_runs_the_program_through_sudo_unless_root():
    assert f"| sudo -n {push.PUSH_PROGRAM} --app hello" in push.hook("hello", "main", sudo=True)
    assert f"| {push.PUSH_PROGRAM} --app hello" in push.hook("hello", "main", sudo=False)
    assert "refs/heads/production" in push.hook("hello", "production", sudo=False)


def test_remote_url_and_the_lines_that_add_it():
    assert push.remote_url("deploy", "10.231.0.5", 22, "/var/lib/provision/git/hello.git") == \
        "ssh://deploy@10.231.0.5:22/var/lib/provision/git/hello.git"
    assert push.remote_url("root", "2001:db8::1", 2222, "/r.git") == "ssh://root@[2001:db8::1]:2222/r.git"
    hint = push.remote_hint("ssh://root@h:22/r.git", "/keys/id ed")
    assert hint.splitlines()[0] == "git remote add production ssh://root@h:22/r.git"
    assert "GIT_SSH_COMMAND='ssh -i /keys/id ed'" in hint and hint.endswith("git push production main")
    assert "sshCommand" not in push.remote_hint("ssh://root@h:22/r.git", None)


def test_the_record_keeps_the_hosts_own_settings_without_the_connections(tmp_path):
    from provision.config import build
    (tmp_path / "requirements.txt").write_text("flask\n")
    s = build({"name": "hello"}, tmp_path)
    rec = push.record(s, "web1", {"host": "10.0.0.1", "user": "deploy", "key": "~/k", "known_hosts": "kh",
                                  "workers": "4", "proxy": "http://p:3128", "ca_bundle": "/laptop/ca.pem",
                                  "deploy_keys": "~/.ssh/id.pub"}, "PEM")
    assert rec == {"app": "hello", "label": "web1", "branch": "main", "ca_bundle": "PEM",
                   "vars": {"workers": "4", "proxy": "http://p:3128"}}


def test_on_the_host_recorded_vars_beat_the_pushed_fabric_yaml_and_the_ca_is_the_recorded_one():
    rec = {"app": "hello", "vars": {"workers": "4", "proxy": "http://p:3128"}}
    raw = push.host_raw({"name": "hello", "workers": 2, "threads": 8, "ca_bundle": "/laptop/ca.pem",
                         "deploy_keys": ["~/.ssh/id.pub"]}, rec, "/var/tmp/x/ca.pem")
    assert raw == {"name": "hello", "workers": "4", "threads": 8, "proxy": "http://p:3128",
                   "ca_bundle": "/var/tmp/x/ca.pem"}
    assert push.host_raw({"name": "hello", "ca_bundle": "certs/ca.pem"}, {"vars": {}}, None)["ca_bundle"] == \
        "certs/ca.pem"  # the repository's own file


def test_fabric_yaml_of_the_pushed_tree(tmp_path):
    with pytest.raises(ProvisionError, match="commit abc1234 has no fabric.yaml"):
        project_app(tmp_path, "abc1234")
    (tmp_path / "fabric.yaml").write_text("app:\n  name: hello\n  workers: [1\n")
    with pytest.raises(ProvisionError, match=r"^fabric.yaml of commit abc1234, line \d+: .*; fix the YAML") as e:
        project_app(tmp_path, "abc1234")
    assert "\n" not in str(e.value)
    (tmp_path / "fabric.yaml").write_text("app: hello\n")
    with pytest.raises(ProvisionError, match="must be a mapping"):
        project_app(tmp_path, "abc1234")
    (tmp_path / "fabric.yaml").write_text("tasks: {}\napp:\n  name: hello\n  workers: 3\n")
    assert project_app(tmp_path, "abc1234") == {"name": "hello", "workers": 3}


def test_provisions_code_goes_whole_and_the_same_bytes_twice():
    files = push.package_files()
    assert "provision/receive.py" in files and "provision/remote/lock.sh" in files
    assert "provision/templates/nginx-site.conf.j2" in files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    packed = push.tarball(files)
    assert packed == push.tarball(dict(files))
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        assert tar.extractfile("provision/push.py").read() == files["provision/push.py"]
    assert push.digest(files) != push.digest({**files, "provision/x.py": b""})


def test_dependencies_are_pinned_to_the_local_versions_with_tomli_where_tomllib_is_missing():
    from importlib.metadata import PackageNotFoundError, version
    pins = push.pins()
    assert pins[:-1] == tuple(f"{n}=={version(n)}" for n in push.HOST_DEPENDENCIES)
    try:
        tomli = version("tomli")
    except PackageNotFoundError:
        tomli = push.TOMLI_VERSION
    assert pins[-1] == f'tomli=={tomli}; python_version < "3.11"'  # pip reads the marker with the host's python


BLOCKER = """
import sys
allowed = set(sys.stdlib_module_names) - {"tomllib"} | {"provision", *HOST}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the host)", name=name)
sys.meta_path.insert(0, Block())
import provision.receive, provision.app, provision.local, provision.lock
print("ok")
"""


def test_receive_imports_with_only_the_hosts_dependencies_and_no_tomllib():
    # a Python 3.10 host: no tomllib; the host's virtualenv: HOST_DEPENDENCIES only (tomli when needed)
    from pathlib import Path
    root = Path(push.__file__).resolve().parent.parent
    code = f"HOST = {push.HOST_DEPENDENCIES!r}\n" + BLOCKER
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_setup_records_settings_root_only_and_the_hook_as_root(tmp_path):
    from provision.config import build
    from provision.steps import File
    (tmp_path / "requirements.txt").write_text("flask\n")
    s = build({"name": "hello", "git_branch": "prod"}, tmp_path)
    rec = push.record(s, "web1", {}, None)
    steps = push.setup_steps(s, "deploy", rec, {"provision/__init__.py": b""})
    files = {st.path: st for st in steps if isinstance(st, File)}
    settings = files["/etc/provision/push/hello.json"]
    assert settings.mode == 0o600 and settings.owner == "root" and settings.sensitive
    assert json.loads(settings.content) == rec
    hook = next(st for st in steps if st.name == "hook /var/lib/provision/git/hello.git/hooks/pre-receive")
    packed = hook.commands[0].split("<<'__PROVISION_EOF__'\n")[1].split("__PROVISION_EOF__")[0]
    assert base64.b64decode(packed) == push.hook("hello", "prod", sudo=True).encode()
    assert files[push.PUSH_PROGRAM].content.startswith(b"#!/opt/provision/venv/bin/python3 -I\n")
    repo = next(st for st in steps if st.name.startswith("repository"))
    assert "chown -R -h deploy: /var/lib/provision/git/hello.git && chmod 700 /var/lib/provision/git/hello.git" \
        in repo.commands[1]
    assert "--shared=0700" in repo.commands[0] and "'deploy 700'" in repo.unless
    names = [st.name for st in steps]
    # the program is checked to import once everything is there; the push folder is root's alone
    assert names.index("provision imports on the host") > names.index(f"file {push.PUSH_PROGRAM}")
    tmp = next(st for st in steps if st.name == f"directory {push.PUSH_TMP}")
    assert push.PUSH_TMP == "/var/lib/provision/push-tmp" and tmp.mode == 0o700 and tmp.owner == "root"


def run_command_step(step) -> str:
    """A Command step run here as the runner would: 'unchanged' when ``unless`` holds, else its
    commands (stopping at the first failure), 'changed'."""
    if subprocess.run(["bash", "-c", step.unless], capture_output=True).returncode == 0:
        return "unchanged"
    r = subprocess.run(["bash", "-ec", "\n".join(step.commands)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return "changed"


@pytest.fixture
def git_root(monkeypatch):
    """A stand-in for /var/lib/provision/git that other users can reach (the repository's owner runs git)."""
    import shutil
    import tempfile
    from provision import layout
    if os.geteuid() != 0 or subprocess.run(["id", "nobody"], capture_output=True).returncode:
        pytest.skip("needs root and a user nobody")
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o755)
    monkeypatch.setattr(layout, "GIT_ROOT", d)
    yield d
    shutil.rmtree(d)


def repo_steps(owner: str, tmp_path):
    from provision.config import build
    (tmp_path / "requirements.txt").write_text("flask\n")
    s = build({"name": "hello"}, tmp_path)
    steps = push.setup_steps(s, owner, push.record(s, "web1", {}, None), {"provision/__init__.py": b""})
    return [st for st in steps if st.name.startswith(("repository", "hook "))]


def test_the_repository_step_for_real_its_mode_a_link_in_its_place_and_an_owner_change(git_root, tmp_path):
    repo = f"{git_root}/hello.git"
    os.symlink("/etc", repo)  # a link in the repository's place is replaced, never followed
    steps = repo_steps("nobody", tmp_path)
    assert [run_command_step(st) for st in steps] == ["changed", "unchanged"]  # the hook came with the repository
    assert not os.path.islink(repo)
    st = os.stat(repo)
    assert (st.st_uid, st.st_mode & 0o777) == (pwd_uid("nobody"), 0o700)  # the pushing user's alone
    hooks = os.stat(f"{repo}/hooks")
    assert hooks.st_uid == 0 and os.stat(f"{repo}/hooks/pre-receive").st_mode & 0o777 == 0o755
    assert subprocess.run(["git", "--git-dir", repo, "config", "core.sharedRepository"], capture_output=True,
                          text=True).stdout.strip() == "0700"
    assert [run_command_step(st) for st in steps] == ["unchanged", "unchanged"]
    # the login user changes (root now): the repository changes hands, its hooks stay root's
    steps = repo_steps("root", tmp_path)
    assert [run_command_step(st) for st in steps] == ["changed", "changed"]  # root's hook: no sudo
    assert os.stat(repo).st_uid == 0 and "sudo -n" not in open(f"{repo}/hooks/pre-receive").read()
    assert [run_command_step(st) for st in steps] == ["unchanged", "unchanged"]


def test_a_hooks_folder_swapped_for_a_link_is_never_written_through(git_root, tmp_path):
    repo = f"{git_root}/hello.git"
    steps = repo_steps("nobody", tmp_path)
    [run_command_step(st) for st in steps]
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.rename(f"{repo}/hooks", f"{repo}/hooks.old")
    os.symlink(target, f"{repo}/hooks")  # what the login user may do in its repository
    r = subprocess.run(["bash", "-ec", "\n".join(steps[1].commands)], capture_output=True, text=True)
    assert r.returncode == 1 and "is a link or not owned by root" in r.stderr
    assert list(target.iterdir()) == []
    assert [run_command_step(st) for st in steps] == ["changed", "changed"]  # setup again: a real folder
    assert not os.path.islink(f"{repo}/hooks") and list(target.iterdir()) == []


def pwd_uid(user: str) -> int:
    import pwd
    return pwd.getpwnam(user).pw_uid


def test_git_branch_is_checked(tmp_path):
    from provision.config import build
    (tmp_path / "requirements.txt").write_text("flask\n")
    assert build({"name": "hello"}, tmp_path).git_branch == "main"
    for bad in ("-x", "a..b", "a b", "main.lock", "x/"):
        with pytest.raises(ProvisionError, match="app.git_branch"):
            build({"name": "hello", "git_branch": bad}, tmp_path)


def test_local_runs_bash_with_stdin_then_the_stream_and_sees_lines_as_they_come():
    local, lines, sent = Local("here"), [], []
    rc, out, err = local.exec("cat; echo oops >&2; exit 3", b"one\n", then=io.BytesIO(b"two\nthree"),
                              on_line=lines.append, on_sent=sent.append)
    assert (rc, out, err) == (3, "one\ntwo\nthree", "oops\n")
    assert lines == ["one", "two"] and sent == [9] and local.round_trips == 1
    assert local.sudo == ("" if os.geteuid() == 0 else "sudo -n ")
    local.close()


def test_local_lines_arrive_before_the_command_ends():
    seen = []
    t0 = time.monotonic()
    Local("here").exec("echo first; sleep 1; echo second", on_line=lambda line: seen.append((line, time.monotonic() - t0)))
    assert [s[0] for s in seen] == ["first", "second"] and seen[1][1] - seen[0][1] > 0.5  # the first line came before the sleep


def test_local_times_out_and_kills_what_the_command_started(tmp_path):
    # a compound command: bash does not exec sleep, whose copy holds stdout open
    marker = tmp_path / "done"
    t0 = time.monotonic()
    with pytest.raises(StepFailed, match="timed out after 1s"):
        Local("here").exec(f"sleep 4; echo done > {marker}", timeout=1)
    assert time.monotonic() - t0 < 3
    time.sleep(4)
    assert not marker.exists()  # the rest of the command never ran


def tree_tar(files: dict[str, bytes], path):
    """A pushed tree as the hook pipes it (a file: tar reads the program's stdin)."""
    with tarfile.open(path, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return open(path, "rb")


def test_a_pushed_tree_naming_another_app_is_refused_before_anything_runs(tmp_path):
    from provision.output import Printer
    from provision.receive import deploy
    out = io.StringIO()
    tar = tree_tar({"fabric.yaml": b"app:\n  name: other\n", "app.py": b"app = None\n", "requirements.txt": b"flask\n"}, tmp_path / "t.tar")
    with pytest.raises(ProvisionError, match="names the app 'other', but this repository deploys 'hello'"):
        deploy({"app": "hello", "vars": {}}, tar, SHA, "main", "deploy", tmp_path, Printer(out))
    assert out.getvalue() == ""


def test_recorded_settings_that_are_wrong_stop_the_push_in_one_line(tmp_path):
    from provision.output import Printer
    from provision.receive import deploy
    tar = tree_tar({"fabric.yaml": b"app:\n  name: hello\n", "app.py": b"app = None\n", "requirements.txt": b"flask\n"}, tmp_path / "t.tar")
    with pytest.raises(ProvisionError, match="app.workers"):
        deploy({"app": "hello", "vars": {"workers": "many"}}, tar, SHA, "main", "deploy", tmp_path,
               Printer(io.StringIO()))


def tree_tar_with(path, files: dict[str, bytes], links: dict[str, str]):
    """A pushed tree holding symlinks too."""
    with tarfile.open(path, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return open(path, "rb")


APP_FILES = {"app.py": b"app = None\n", "requirements.txt": b"flask\n"}


@pytest.mark.parametrize("fabric, links, problem", [
    (b"app:\n  name: hello\n  templates: ../../tpl\n", {}, "app.templates of commit 3333333 leads out of the repository"),
    (b"app:\n  name: hello\n  source: site\n  include: [../../../shared]\n", {}, "app.include of commit 3333333 leads out"),
    (b"app:\n  name: hello\n  source: ../..\n", {}, "app.source of commit 3333333 leads out"),
    (b"app:\n  name: hello\n  ca_bundle: ../../ca.pem\n", {}, "app.ca_bundle of commit 3333333 leads out"),
    (b"app:\n  name: hello\n  checks: ../../checks\n", {}, "app.checks of commit 3333333 leads out"),
    (None, {"fabric.yaml": "/SHARED/fabric.yaml"}, "fabric.yaml is a link leading out of the repository"),
    (b"app:\n  name: hello\n", {"templates": "/SHARED/tpl"}, "templates is a link leading out of the repository"),
])
def test_a_pushed_tree_leading_out_of_itself_is_refused_before_anything_runs(tmp_path, fabric, links, problem):
    # S1: ../.. of the tree is a folder of the host (any user may have planted files there)
    from provision.output import Printer
    from provision.receive import deploy
    planted = tmp_path / "push"  # ../.. of the tree: where the pushes' folders are (once, /var/tmp)
    shared = planted / "shared"
    for d in ("tpl", "shared", "checks", "shared/tpl"):
        (planted / d).mkdir(parents=True, exist_ok=True)
    (planted / "ca.pem").write_text("PEM\n")
    (shared / "fabric.yaml").write_text("app:\n  name: hello\n")
    (shared / "x.py").write_text("")
    work = planted / "work"
    work.mkdir()
    files = dict(APP_FILES, **({"fabric.yaml": fabric} if fabric else {}), **{"site/app.py": b"app = None\n",
                                                                              "site/requirements.txt": b"flask\n"})
    links = {k: v.replace("/SHARED", str(shared)) for k, v in links.items()}
    out = io.StringIO()
    with pytest.raises(ProvisionError, match=problem):
        deploy({"app": "hello", "vars": {}}, tree_tar_with(tmp_path / "t.tar", files, links), SHA, "main", "deploy",
               work, Printer(out))
    assert out.getvalue() == ""


@pytest.fixture
def received(tmp_path, monkeypatch):
    """receive.main with its host folders in tmp_path, root's, and a fake deploy that records
    what it saw; returns (run, seen)."""
    from provision import layout, receive
    monkeypatch.setattr(layout, "PUSH_SETTINGS", str(tmp_path / "etc"))
    monkeypatch.setattr(receive, "PUSH_TMP", str(tmp_path / "push-tmp"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hello.json").write_text(json.dumps({"app": "hello", "vars": {}, "label": "web1"}))
    for k in ("PATH", "XDG_CACHE_HOME", "GIT_CEILING_DIRECTORIES"):
        monkeypatch.setenv(k, os.environ.get(k, ""))
    monkeypatch.chdir(tmp_path)
    seen = {}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}

    def fake_deploy(behave):
        def deploy(rec, tar, sha, branch, pusher, work, printer):
            seen.update(work=work, exists=work.is_dir(), cwd=os.getcwd(), path=os.environ["PATH"],
                        git={k: v for k, v in os.environ.items() if k.startswith("GIT_") and k != "GIT_CEILING_DIRECTORIES"})
            return behave()
        return deploy

    def run(behave=lambda: 0, argv=("--app", "hello", "--commit", SHA, "--branch", "main", "--old", "1" * 40)):
        monkeypatch.setattr(receive, "deploy", fake_deploy(behave))
        (tmp_path / "push-tmp" / "hello.landed").unlink(missing_ok=True)  # each run a push of its own
        try:
            return receive.main(list(argv))
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
    yield run, seen


def test_receive_runs_only_as_root(received, monkeypatch, capsys):
    run, seen = received
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run() == 2 and not seen
    assert "runs as root" in capsys.readouterr().err


def test_receive_drops_gits_environment_and_leaves_the_repository(received, monkeypatch, tmp_path):
    # S3: the hook's environment (the quarantine, GIT_DIR=.) and cwd (the bare repository) never reach root's steps
    run, seen = received
    for k, v in {"GIT_DIR": ".", "GIT_QUARANTINE_PATH": "/r/objects/q", "GIT_OBJECT_DIRECTORY": "/r/objects/q",
                 "GIT_ALTERNATE_OBJECT_DIRECTORIES": "/r/objects", "GIT_PUSH_OPTION_COUNT": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", f"{tmp_path}/evil:/usr/bin")
    assert run() == 0
    assert seen["git"] == {} and seen["cwd"] == "/" and seen["path"] == receive_safe_path()


def receive_safe_path():
    from provision.receive import SAFE_PATH
    return SAFE_PATH


def test_receive_removes_its_folder_on_success_failure_and_signals(received, tmp_path):
    run, seen = received
    assert run() == 0 and seen["exists"] and not seen["work"].exists()
    assert run(lambda: 1) == 1 and not seen["work"].exists()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(SystemExit) as e:
            run(lambda: os.kill(os.getpid(), sig) or time.sleep(5))
        assert e.value.code == 128 + sig and not seen["work"].exists()
    assert oct(os.stat(tmp_path / "push-tmp").st_mode & 0o777) == "0o700"


def test_receive_reports_unexpected_errors_and_bad_settings_in_one_line(received, tmp_path, capsys):
    # B5: no traceback, whatever happens
    run, seen = received
    assert run(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device"))) == 1
    err = capsys.readouterr().err
    assert err == "error: the push's deploy failed unexpectedly: OSError: [Errno 28] No space left on device\n"
    for bad in ("[1, 2]", '{"vars": {}}', '{"app": "hello", "vars": [1]}'):
        (tmp_path / "etc" / "hello.json").write_text(bad)
        assert run() == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_a_push_removes_the_folders_of_pushes_that_died(tmp_path):
    from provision.receive import work_folder
    base = tmp_path / "push-tmp"
    base.mkdir(mode=0o700)
    old = time.time() - 2 * 3600
    dead, running, fresh = (base / f"provision-push-{n}-x" for n in (99999999, os.getpid(), 99999998))
    for d, t in ((dead, old), (running, old), (fresh, time.time())):
        (d / "tree").mkdir(parents=True)
        os.utime(d, (t, t))
    new = work_folder(str(base))
    assert new.parent == base and new.name.startswith(f"provision-push-{os.getpid()}-")
    assert not dead.exists() and running.exists() and fresh.exists()
    os.chmod(base, 0o755)  # not root's alone: refused
    with pytest.raises(ProvisionError, match="must be a folder of root's alone"):
        work_folder(str(base))


def test_a_push_that_began_before_the_previous_one_landed_is_refused_under_its_lock(tmp_path, monkeypatch):
    # B2: A deployed and its receive exited; git has not yet moved main to A when B (begun at X) checks
    from provision import receive
    base = str(tmp_path)
    x, a, b = "1" * 40, "a" * 40, "b" * 40
    with receive.one_push("hello", "main", x, base) as landed:  # A
        with pytest.raises(ProvisionError, match="another push of hello is deploying on this host") as e:
            with receive.one_push("hello", "main", x, base):  # B, while A runs
                pass
        assert e.value.code == 1
        landed(a)
    with pytest.raises(ProvisionError, match=r"^main moved on the host \(to aaaaaaa\) while you pushed; fetch and push "
                                             r"again$") as e:
        with receive.one_push("hello", "main", x, base):  # B, after A, before git names A
            pass
    assert e.value.code == 1
    with receive.one_push("hello", "main", a, base) as landed:  # B fetched and pushed again: it began at A
        landed(b)
    old = time.time() - 2 * receive.PUSH_LANDING_SECONDS  # A's ref update failed long ago: no longer holds pushes
    os.utime(tmp_path / "hello.landed", (old, old))
    with receive.one_push("hello", "main", x, base):
        pass
    with receive.one_push("hello", "main", "", base):  # an older hook passes no --old
        pass


def test_receive_records_the_commit_a_push_deployed(received, tmp_path):
    run, seen = received
    assert run(lambda: 1) == 1 and not (tmp_path / "push-tmp" / "hello.landed").exists()
    assert run() == 0 and (tmp_path / "push-tmp" / "hello.landed").read_text() == SHA + "\n"
