"""fab ship's pure decisions: dirty trees, paths in the export, tests found, the test command line,
the test virtualenv's key, what a test run says; and the test_command setting."""

from pathlib import Path

import pytest

from provision import config as cfg
from provision import ship
from provision.errors import ProvisionError

ROOT = Path(__file__).resolve().parents[2]


def test_the_paths_of_a_dirty_tree_come_from_git_status_porcelain_z():
    out = b" M app.py\0?? new file.txt\0R  new.py\0old.py\0A  added.py\0 D gone.py\0"
    assert ship.dirty_paths(out) == ["app.py", "new file.txt", "new.py", "added.py", "gone.py"]
    assert ship.dirty_paths(b"") == []


def test_a_dirty_tree_is_refused_in_one_line_naming_three_paths_and_the_override():
    line = ship.dirty_refusal(["a.py", "b.py", "c.py", "d.py", "e.py"], Path("/src/app"))
    assert "\n" not in line and "a.py, b.py, c.py and 2 more" in line and "d.py" not in line
    assert "--allow-dirty" in line and "/src/app" in line


def test_paths_of_the_repository_map_into_its_export(tmp_path):
    repo, tree = tmp_path / "repo", tmp_path / "export"
    (repo / "apps/web").mkdir(parents=True)
    assert ship.in_tree(repo / "apps/web", repo, tree) == tree / "apps/web"
    assert ship.in_tree(repo / "apps/web/../../fabric.yaml", repo, tree) == tree / "fabric.yaml"
    (tmp_path / "link").symlink_to(repo)  # the checkout reached through a link: the same place
    assert ship.in_tree(tmp_path / "link/apps/web", repo, tree) == tree / "apps/web"
    assert ship.in_tree(repo, repo, tree) == tree
    assert ship.in_tree(tmp_path / "elsewhere", repo, tree) is None


def text_of(files: dict):
    return lambda name: files[name]


@pytest.mark.parametrize("files, found", [
    (["app.py", "tests/test_app.py"], "tests/"),
    (["app.py", "pkg/test/helpers.py"], "pkg/test/"),
    (["app.py", "test_app.py"], "test_app.py"),
    (["app.py", "pkg/views_test.py"], "pkg/views_test.py"),
    (["app.py", "pytest.ini"], "pytest.ini"),
    (["app.py", "requirements.txt"], None),
    (["app.py", "testing.py", "contest_app.py", "latest/x.py"], None),
    (["app.py", "checks/test_hello.py"], None),  # the smoke checks are fab check's, against a host
])
def test_an_app_has_tests_when_it_has_a_tests_folder_test_files_or_pytest_config(files, found):
    assert ship.has_tests(files, text_of({}), leave_out="checks") == found


def test_shared_config_files_count_only_with_a_pytest_section():
    plain = {"pyproject.toml": "[project]\nname = 'x'\n", "setup.cfg": "[metadata]\nname = x\n", "tox.ini": "[tox]\n"}
    assert ship.has_tests(list(plain), text_of(plain)) is None
    for name, section in (("pyproject.toml", "[tool.pytest.ini_options]"), ("setup.cfg", "[tool:pytest]"),
                          ("tox.ini", "[pytest]")):
        assert ship.has_tests(["app.py", name], text_of({name: f"[x]\n{section}\naddopts = -q\n"})) == name


def test_the_default_command_leaves_the_smoke_checks_out():
    assert ship.default_command(None) == "python -m pytest"
    assert ship.default_command("checks") == "python -m pytest --ignore=checks"
    assert ship.default_command("my checks") == "python -m pytest --ignore='my checks'"


@pytest.mark.parametrize("command", ["pytest", "python -m pytest -x", "py.test", ".venv/bin/pytest tests",
                                     "coverage run -m pytest", "python3 -m pytest --ignore=checks"])
def test_pytest_commands_are_recognised(command):
    assert ship.is_pytest(command)


@pytest.mark.parametrize("command", ["make test", "python -m unittest", "tox", "./run-pytests.sh", "echo 'unbalanced"])
def test_other_commands_are_not_pytest(command):
    assert not ship.is_pytest(command)


def test_junit_is_asked_of_pytest_with_its_absolute_path():
    assert ship.command_line("python -m pytest", "/ci/report.xml") == "python -m pytest --junitxml=/ci/report.xml"
    assert ship.command_line("pytest -x", "/ci/my report.xml") == "pytest -x --junitxml='/ci/my report.xml'"
    assert ship.command_line("pytest -x", None) == "pytest -x"


def test_another_command_takes_the_report_where_it_says_junit():
    assert ship.command_line("make test REPORT={junit}", "/ci/r.xml") == "make test REPORT=/ci/r.xml"
    assert ship.command_line("pytest --junitxml={junit} && flake8", "/ci/r x.xml") == \
        "pytest --junitxml='/ci/r x.xml' && flake8"
    assert ship.command_line("make test REPORT={junit}", None) == "make test REPORT=/dev/null"


@pytest.mark.parametrize("command, why", [("make test", "not pytest's"), ("python -m unittest", "not pytest's"),
                                          ("pytest && flake8", "more than one command"),
                                          ("pytest | tee log", "more than one command")])
def test_junit_for_a_command_that_cannot_take_it_is_one_line(command, why):
    with pytest.raises(ProvisionError) as e:
        ship.command_line(command, "/ci/r.xml")
    assert why in str(e.value) and "{junit}" in str(e.value) and e.value.code == 2


def test_the_test_virtualenv_s_key_follows_its_requirements_python_and_additions():
    files = [("requirements.txt", b"flask\n"), ("requirements-dev.txt", b"-r requirements.txt\npytest\n")]
    key = ship.venv_key(files, "CPython 3.11.7 /usr/bin/python3.11")
    assert key == ship.venv_key(list(files), "CPython 3.11.7 /usr/bin/python3.11") and len(key) == 16
    assert key != ship.venv_key(files, "CPython 3.12.1 /usr/bin/python3.12")
    assert key != ship.venv_key(files, "CPython 3.11.7 /usr/bin/python3.11", ("pytest",))
    assert key != ship.venv_key([files[0], ("requirements-dev.txt", b"-r requirements.txt\npytest<9\n")],
                                "CPython 3.11.7 /usr/bin/python3.11")
    assert key != ship.venv_key([files[0], ("requirements-test.txt", files[1][1])], "CPython 3.11.7 /usr/bin/python3.11")


def test_requirement_names_tell_whether_pytest_is_there():
    names = ship.requirement_names([("requirements.txt", b"Flask>=3 # web\n-r base.txt\n--hash=sha256:00\n"),
                                    ("dev.txt", b"PyTest[testing]==8.0 \\\n  --hash=sha256:ab\n")])
    assert names == {"flask", "pytest"}


def test_pytest_s_closing_line_counts_the_tests():
    assert ship.pytest_count("....\n==== 3 passed, 1 skipped in 0.12s ====\n") == 4
    assert ship.pytest_count("= 1 failed, 2 passed, 1 error in 1.50s =\n") == 4
    assert ship.pytest_count("no tests ran in 0.01s\n") is None
    assert ship.pytest_count("test_x.py 2 passed earlier\nOK\n") is None


def test_the_origin_says_commit_tests_and_ship():
    o = ship.ship_origin("a" * 40, "passed", 2.345, "python -m pytest", 3, False)
    assert o == {"commit": "a" * 40, "via": "ship",
                 "tests": {"result": "passed", "seconds": 2.35, "command": "python -m pytest", "count": 3}}
    assert ship.ship_origin("a" * 40, "none", 0, "", None, True)["dirty"] is True


def build(**over):
    return cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, over), ROOT)


def test_test_command_is_one_line_of_shell_and_blank_is_the_default():
    assert build().test_command == ""
    assert build(test_command="  pytest -x  ").test_command == "pytest -x"
    assert build(test_command="   ").test_command == ""  # the default: it never turns the tests off
    for bad in (["pytest"], "pytest\nrm -rf /", 3):
        with pytest.raises(ProvisionError) as e:
            build(test_command=bad)
        assert "app.test_command" in str(e.value) and "\n" not in str(e.value)


def test_test_virtualenvs_unused_for_a_month_and_builds_never_published_are_pruned(tmp_path):
    import os
    from provision.cli.ship import KEEP_DAYS, prune
    now = 1_000_000_000.0
    for name, age in (("old.1", KEEP_DAYS + 1), ("new.1", 1), ("killed.1", 2), ("building.1", 0.5)):
        (tmp_path / name / "bin").mkdir(parents=True)
        os.utime(tmp_path / name, (now - age * 86400,) * 2)
    (tmp_path / "old").symlink_to("old.1")
    (tmp_path / "new").symlink_to("new.1")
    (tmp_path / "gone").symlink_to("gone.1")  # its folder removed by hand
    prune(tmp_path, now)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["building.1", "new", "new.1"]


@pytest.mark.parametrize("example", ["github-actions.yml", "gitlab-ci.yml"])
def test_the_ci_examples_call_ship_with_options_it_has(example):
    from invoke.util import yaml
    from provision.tasks import ship as ship_task
    text = (ROOT / "docs/ci" / example).read_text()
    yaml.safe_load(text)
    lines = [line.strip().lstrip("- ").removeprefix("run: ") for line in text.splitlines() if "fab -H" in line]
    assert lines and all(line.startswith("fab -H web1 ship") for line in lines)
    options = {f"--{a.name.replace('_', '-')}" for a in ship_task.get_arguments()}
    for line in lines:
        assert {w for w in line.split() if w.startswith("--")} <= options


def test_the_tests_run_with_the_virtualenv_first_their_output_shown_and_their_status_kept(tmp_path, capsys):
    from provision.cli.ship import run_tests
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text("#!/bin/sh\necho venv-python \"$@\"\n")
    (venv / "bin/python").chmod(0o755)
    code, seconds, tail = run_tests("python -m pytest; echo \"in $VIRTUAL_ENV at $(pwd)\"; exit 3", tmp_path, venv)
    assert code == 3 and seconds >= 0
    assert tail == f"venv-python -m pytest\nin {venv} at {tmp_path}\n" == capsys.readouterr().out


def test_what_the_tests_leave_running_is_stopped_when_they_end(tmp_path):
    import os
    import time
    from provision.cli.ship import run_tests
    t0 = time.monotonic()
    code, _, _ = run_tests("sleep 60 & echo $! > pid", tmp_path, tmp_path)  # the sleep holds their output open
    assert code == 0 and time.monotonic() - t0 < 30
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # reaped by init: a moment at most
            os.kill(pid, 0)
            time.sleep(0.1)


def test_django_s_tests_py_counts_and_manage_py_runs_them_unless_pytest_is_configured():
    assert ship.has_tests(["manage.py", "polls/tests.py"], text_of({})) == "polls/tests.py"
    assert ship.default_command(None, django=True) == "python manage.py test"
    assert ship.pytest_config(["manage.py", "pytest.ini"], text_of({})) == "pytest.ini"
    assert ship.pytest_config(["manage.py", "setup.cfg"], text_of({"setup.cfg": "[metadata]\n"})) is None


def test_tests_above_the_app_are_found_from_its_folder_up_to_the_root():
    files = {"pyproject.toml": "[tool.pytest.ini_options]\n", "apps/conftest.py": ""}
    assert ship.tests_above([("apps", ["api/", "web/"]), ("", ["apps/", "README"])], text_of(files)) is None
    assert ship.tests_above([("apps", ["api/", "tests/"]), ("", ["apps/"])], text_of(files)) == "apps/tests/"
    assert ship.tests_above([("apps", ["api/"]), ("", ["apps/", "pyproject.toml"])], text_of(files)) == "pyproject.toml"
    assert ship.tests_above([("", ["apps/", "test_all.py"])], text_of(files)) == "test_all.py"


@pytest.mark.parametrize("command, shown", [
    ("DATABASE_URL=postgres://u:hunter2@db/t API_TOKEN=abc pytest", "DATABASE_URL=postgres://u:****@db/t API_TOKEN=**** pytest"),
    ("export SECRET_KEY='a b' && DB_PASSWORD=\"x y\" pytest", "export SECRET_KEY=**** && DB_PASSWORD=**** pytest"),
    ("pytest --db=mysql://root:pw@localhost/x", "pytest --db=mysql://root:****@localhost/x"),
    ("DEBUG=1 TOKENS_DIR=/tmp pytest -k 'not slow'", "DEBUG=1 TOKENS_DIR=**** pytest -k 'not slow'"),
    ("python -m pytest", "python -m pytest")])
def test_secrets_in_a_test_command_are_masked(command, shown):
    assert ship.masked_command(command) == shown


def test_only_secrets_long_enough_not_to_garble_the_output_are_masked_in_every_line():
    assert ship.remembered_secrets("USE_AUTH=1 DB=postgres://u:hunter2@db/t API_KEY=abcd pytest") == ["hunter2", "abcd"]


@pytest.mark.parametrize("command", ['pytest --junitxml="{junit}"', "make test REPORT='{junit}'",
                                     'sh -c "pytest --junitxml={junit}"'])
def test_junit_inside_quotes_is_refused_as_the_path_is_quoted_for_the_shell_already(command):
    with pytest.raises(ProvisionError) as e:
        ship.command_line(command, "/ci/my report.xml")
    assert "inside quotes" in str(e.value) and "\n" not in str(e.value) and e.value.code == 2
    assert ship.command_line("echo 'a' {junit} \"b\"", "/ci/my report.xml") == "echo 'a' '/ci/my report.xml' \"b\""


def test_the_ci_examples_cache_by_python_version_read_only_and_every_requirements_file():
    from invoke.util import yaml
    github = yaml.safe_load((ROOT / "docs/ci/github-actions.yml").read_text())
    assert github["permissions"] == {"contents": "read"}
    steps = github["jobs"]["ship"]["steps"]
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    key = next(s for s in steps if s.get("uses", "").startswith("actions/cache"))["with"]["key"]
    assert f"steps.{python['id']}.outputs.python-version" in key and "**/requirements*.txt" in key
    gitlab = yaml.safe_load((ROOT / "docs/ci/gitlab-ci.yml").read_text())["ship"]["cache"]["key"]
    assert gitlab != {"files": ["requirements.txt"]} and "$CI_JOB_IMAGE" in str(gitlab)


def test_the_readme_s_exit_code_table_has_every_code_fab_ship_promises():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Exit codes"):]
    codes = {line.split("|")[1].strip() for line in table.splitlines()[:20] if line.startswith("| ")}
    assert {"0", "1", "2", "3", "130"} <= codes


def test_a_repository_git_refuses_is_reported_with_git_s_own_reason(tmp_path, monkeypatch):
    import subprocess
    from provision.cli.ship import repository
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    os_chown = __import__("os").chown
    os_chown(tmp_path, 12345, 12345)  # another user's checkout, as in a CI container: git refuses it
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))
    with pytest.raises(ProvisionError) as e:
        repository(tmp_path)
    assert "dubious ownership" in str(e.value) and "safe.directory" in str(e.value) and "\n" not in str(e.value)
    assert "not in a git repository" not in str(e.value)
    with pytest.raises(ProvisionError) as e:
        repository(tmp_path.parent)
    assert "not in a git repository" in str(e.value)
