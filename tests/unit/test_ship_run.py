"""fab ship through the real `fab` command line, up to the deploy: a task only these tests add to
their copy of the fabfile runs `fab ship` with the deploy replaced by one that prints what it was
given (each host's user, site config, origin and the release's files), so no host is needed. The
app's repository is the project itself (fabfile, fabric.yaml, inventory and templates committed
beside the app), as a real app's is."""

import json
import os
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).parent / "fab"
SHIP_CAPTURE = '''
from fabric import task


@task
def ship_capture(c, allow_dirty=False, junit=None):
    """fab ship, its deploy replaced by a print of what it would deploy."""
    import json
    import os
    import signal
    import time
    from provision.cli import ship as shipping
    from provision.cli.apply import plan_hosts

    def deploy(c, flags, *, plans=None, origin=None, source=None, **kw):
        if plans is None:  # planned again, from the working tree
            plans, _ = plan_hosts(c, flags, source=source, origin=origin)
        print("DEPLOY " + json.dumps({
            "users": [job.target.user for job, _, _ in plans],
            "sites": [steps.site.decode() for _, steps, _ in plans],
            "origin": plans[0][1].origin,
            "files": sorted(plans[0][1].release.files)}))

        if os.environ.get("SHIP_SIGNAL"):  # a hangup, or a CI's cancel, during the deploy
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ["SHIP_SIGNAL"]))
            time.sleep(30)

    shipping.run_apply = deploy
    shipping.run_ship(c, {}, allow_dirty=allow_dirty, junit=junit)


ns.add_task(ship_capture)
'''
APP = "def app(environ, start_response):\\n    start_response('200 OK', [])\\n    return [b'hi']\\n"


def git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def commit(repo, **files: str) -> str:
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "change")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the test virtualenvs: one, for the empty requirements


@pytest.fixture
def repo(tmp_path):
    """An app's repository, its deploy files beside it: ``app/`` the app (no requirements)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "fabfile.py", root)
    with open(root / "fabfile.py", "a") as fh:
        fh.write(SHIP_CAPTURE)
    shutil.copytree(ROOT / "provision/templates", root / "templates")
    (root / "fabric.yaml").write_text((ROOT / "fabric.yaml").read_text().split("\napp:")[0] +
                                      "\napp:\n  name: hello\n  source: app\n  wsgi: wsgi:app\n")
    (root / "inventory.ini").write_text("web1 host=192.0.2.1 user=deploy\n")
    git(root, "init", "-q", "-b", "main")
    commit(root, **{"app/wsgi.py": APP, "app/requirements.txt": ""})
    return root


def ship(repo, cache, *args, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    environ.update(XDG_CACHE_HOME=str(cache), TMPDIR=str(repo.parent), **env)
    return subprocess.run([str(FAB), "-H", "web1", "ship-capture", *args], cwd=repo, env=environ,
                          capture_output=True, text=True, timeout=300)


def deployed(res) -> dict:
    lines = [line for line in res.stdout.splitlines() if line.startswith("DEPLOY ")]
    assert res.returncode == 0 and len(lines) == 1, res.stdout + res.stderr
    return json.loads(lines[0].removeprefix("DEPLOY "))


def leftovers(repo) -> list[str]:
    return [p.name for p in repo.parent.iterdir() if p.name.startswith("provision-ship-")]


def test_the_deploy_is_the_plan_checked_before_the_tests_whatever_they_change_in_the_working_tree(repo, cache):
    commit(repo, **{"fabric.yaml": (repo / "fabric.yaml").read_text() + f"  test_command: >-\n    "
                    f"sed -i s/user=deploy/user=intruder/ {repo}/inventory.ini &&\n    "
                    f"echo '{{{{ no_such_variable }}}}' > {repo}/templates/nginx-site.conf.j2\n"})
    got = deployed(ship(repo, cache))
    assert got["users"] == ["deploy"]
    assert "server_name" in got["sites"][0] and "no_such_variable" not in got["sites"][0]
    assert got["origin"]["tests"]["result"] == "passed" and got["origin"]["via"] == "ship"
    assert not leftovers(repo)


def test_export_attributes_neither_hide_the_tests_nor_change_the_release(repo, cache):
    commit(repo, **{".gitattributes": "app/tests export-ignore\napp/NOTES export-ignore\napp/VERSION export-subst\n",
                    "app/NOTES": "kept\n", "app/VERSION": "$Format:%H$\n",
                    "fabric.yaml": (repo / "fabric.yaml").read_text() + "  test_command: sh tests/run.sh\n",
                    "app/tests/run.sh": "grep -q Format: VERSION\n"})
    got = deployed(ship(repo, cache))
    assert {"NOTES", "VERSION", "tests/run.sh"} <= set(got["files"])
    commit(repo, **{"app/tests/run.sh": "echo the test fails; exit 1\n"})
    res = ship(repo, cache)
    assert res.returncode == 1 and "the test fails" in res.stdout and "DEPLOY" not in res.stdout, res.stdout + res.stderr


def test_a_submodule_is_shipped_at_its_commit_and_one_not_checked_out_is_refused(repo, cache, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    git(lib, "init", "-q", "-b", "main")
    commit(lib, **{"helpers.py": "X = 1\n"})
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "app/lib")
    commit(repo, **{"fabric.yaml": (repo / "fabric.yaml").read_text() + "  test_command: test -f lib/helpers.py\n"})
    commit(lib, **{"helpers.py": "X = 2\n", "later.py": ""})  # the submodule moved on: its recorded commit ships
    got = deployed(ship(repo, cache))
    assert "lib/helpers.py" in got["files"] and "lib/later.py" not in got["files"]
    (repo / "app/wsgi.py").write_text(APP + "# changed\n")
    res = ship(repo, cache, "--allow-dirty")  # its tracked files as they are, the submodule's too
    git(repo, "checkout", "app/wsgi.py")
    assert "lib/helpers.py" in deployed(res)["files"]
    git(repo, "submodule", "deinit", "-q", "-f", "app/lib")
    res = ship(repo, cache)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stdout + res.stderr
    assert "submodule app/lib" in res.stderr and "git submodule update --init" in res.stderr


LIB = {"app/libsrc/pyproject.toml": '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                                    '[project]\nname = "mylib"\nversion = "0"\n[tool.setuptools]\npy-modules = ["mylib"]\n',
       "fabric.yaml": None, "app/requirements.txt": None}


def with_lib(repo, requirement: str, value: int) -> dict:
    return {**LIB, "app/libsrc/mylib.py": f"VALUE = {value}\n", "app/requirements.txt": requirement + "\n",
            "fabric.yaml": (repo / "fabric.yaml").read_text().split("  test_command")[0] +
            "  test_command: python -c 'import mylib; print(\"VALUE\", mylib.VALUE)'\n"}


@pytest.mark.parametrize("requirement", ["./libsrc", "-e ./libsrc"])
def test_requirements_from_a_local_folder_are_tested_as_committed_every_time(repo, cache, requirement):
    for value in (1, 2):
        commit(repo, **with_lib(repo, requirement, value))
        res = ship(repo, cache)
        got = deployed(res)
        assert f"VALUE {value}" in res.stdout and "not cached" in res.stdout
        assert not [f for f in got["files"] if "egg-info" in f or f.startswith("libsrc/build")]  # pip wrote not there
    assert not leftovers(repo)


@pytest.mark.parametrize("line, local", [
    ("flask>=3", False), ("https://example.com/pkg-1.0.tar.gz", False), ("pkg @ https://example.com/p.whl", False),
    ("--index-url https://pypi.example/simple", False), ("-r base.txt", False), ("Django==5.0; python_version>'3'", False),
    ("--requirement=reqs/base.txt", False), ("-c constraints/pins.txt", False),
    (".", True), ("./mylib", True), ("libs/mylib", True), ("-e ./pkg", True), ("--editable=../x", True),
    ("mylib @ file:///src/mylib", True), ("git+https://github.com/o/r@main#egg=r", True),
    ("r @ git+https://github.com/o/r", True), ("-f ./wheels", True), ("~/src/lib", True)])
def test_requirements_a_cached_virtualenv_would_keep_stale_are_found(line, local):
    from provision import ship as pure
    found = pure.uncached([("requirements.txt", b"flask\n"), ("dev.txt", f"{line}  # why\n".encode())])
    assert found == (f"dev.txt: {line}" if local else None)


def test_tests_outside_the_app_s_folder_are_refused_rather_than_skipped(repo, cache):
    commit(repo, **{"tests/test_app.py": "def test_fails():\n    assert False\n",
                    "pyproject.toml": "[tool.pytest.ini_options]\ntestpaths = ['tests']\n"})
    res = ship(repo, cache)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stdout + res.stderr
    assert "tests found at tests/" in res.stderr and "app.test_command" in res.stderr and "DEPLOY" not in res.stdout


def test_django_s_tests_py_is_run_with_manage_py_test(repo, cache):
    commit(repo, **{"app/manage.py": "import sys\nprint('DJANGO', sys.argv[1:])\nsys.exit(1)\n",
                    "app/polls/tests.py": "", "app/polls/__init__.py": ""})
    res = ship(repo, cache)
    assert res.returncode == 1 and "DJANGO ['test']" in res.stdout and "DEPLOY" not in res.stdout, res.stdout + res.stderr
    assert "error: tests failed (exit 1 after" in res.stderr and "python manage.py test" in res.stderr


@pytest.mark.parametrize("when, signal", [("tests", "HUP"), ("deploy", "HUP"), ("deploy", "TERM")])
def test_a_hangup_or_sigterm_stops_what_the_tests_started_and_removes_the_export(repo, cache, when, signal):
    pid = repo.parent / "pid"
    command = f"sleep 60 & echo $! > {pid}; " + (f"kill -{signal} $PPID; wait" if when == "tests" else "true")
    commit(repo, **{"fabric.yaml": (repo / "fabric.yaml").read_text() + f"  test_command: {command}\n"})
    res = ship(repo, cache, **({"SHIP_SIGNAL": signal} if when == "deploy" else {}))
    assert res.returncode == 130 and res.stderr.strip() == "interrupted", res.stdout + res.stderr
    assert not leftovers(repo)
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(int(pid.read_text()), 0)
            time.sleep(0.1)


SECRET_COMMAND = "DATABASE_URL=postgres://u:hunter2@db/t API_TOKEN='abc 1' DEBUG=1 sh -c 'echo ran; exit {}'"


def test_secrets_in_the_test_command_reach_neither_output_nor_the_release_s_record(repo, cache):
    commit(repo, **{"fabric.yaml": (repo / "fabric.yaml").read_text() + "  test_command: >-\n    "
                    + SECRET_COMMAND.format(0) + "\n"})
    res = ship(repo, cache)
    got = deployed(res)
    assert "hunter2" not in res.stdout + res.stderr and "abc 1" not in res.stdout + res.stderr
    assert got["origin"]["tests"]["command"] == ("DATABASE_URL=postgres://u:****@db/t API_TOKEN=**** DEBUG=1 "
                                                 "sh -c 'echo ran; exit 0'")
    commit(repo, **{"fabric.yaml": (repo / "fabric.yaml").read_text().replace("exit 0", "exit 1")})
    res = ship(repo, cache)
    assert res.returncode == 1 and "ran" in res.stdout and "API_TOKEN=****" in res.stderr
    assert "hunter2" not in res.stdout + res.stderr and "abc 1" not in res.stdout + res.stderr


def test_a_cache_folder_that_cannot_be_made_is_one_line_naming_xdg_cache_home(repo, tmp_path):
    commit(repo, **{"fabric.yaml": (repo / "fabric.yaml").read_text() + "  test_command: 'true'\n"})
    (tmp_path / "a-file").write_text("")
    res = ship(repo, tmp_path / "a-file")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stdout + res.stderr
    assert "XDG_CACHE_HOME" in res.stderr and "Traceback" not in res.stderr
    assert not leftovers(repo)


def test_the_junit_report_inside_the_repository_does_not_make_the_next_ship_dirty(repo, cache):
    commit(repo, **{"fabric.yaml": (repo / "fabric.yaml").read_text() + "  test_command: echo '<testsuites/>' > {junit}\n"})
    for _ in range(2):
        got = deployed(ship(repo, cache, "--junit", "report.xml"))
        assert (repo / "report.xml").read_text() == "<testsuites/>\n" and "report.xml" not in got["files"]
