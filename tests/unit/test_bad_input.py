"""Mistakes a user can make, through the real `fab` command line.

Each stops with one line on stderr naming the problem and the fix, exit code 2,
no traceback, before any connection: HOST is a documentation address (RFC 5737)
that nothing answers, so a regression can never touch a real host.
Secrets never show in what `fab` prints.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).parent / "fab"
HOST = "root@192.0.2.1"
WSGI_INJECTION = 'app:f("+str(__import__("os").system("id"))+")'
# A task only these tests add to their copy of the fabfile: the settings a deploy would use.
SHOW_SETTINGS = '''
from fabric import task
from provision.hosts import jobs


@task
def show_settings(c):
    for job in jobs(c, {}):
        s = job.settings
        print(repr({"packages": s.packages, "linked_dirs": s.linked_dirs, "workers": s.workers, "extra": s.extra}))


ns.add_task(show_settings)
'''


@pytest.fixture
def project(tmp_path):
    shutil.copy(ROOT / "fabfile.py", tmp_path)
    shutil.copy(ROOT / "fabric.yaml", tmp_path)
    shutil.copytree(ROOT / "examples/hello", tmp_path / "examples/hello")
    shutil.copytree(ROOT / "provision/templates", tmp_path / "templates")
    with open(tmp_path / "fabfile.py", "a") as fh:
        fh.write(SHOW_SETTINGS)
    return tmp_path


def fab(project, *args, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    environ.update(env)
    return subprocess.run([str(FAB), *args], cwd=project, env=environ, capture_output=True, text=True, timeout=60)


def app_yaml(project, text):
    """fabric.yaml with ``text`` added under ``app:``."""
    (project / "fabric.yaml").write_text((project / "fabric.yaml").read_text()
                                         + "".join(f"  {line}\n" for line in text.splitlines()))


def one_line_error(res, *words) -> str:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    for w in words:
        assert w in lines[0]
    return lines[0]


def shown_settings(res) -> dict:
    assert res.returncode == 0, res.stderr
    return ast.literal_eval(res.stdout)


# -- 1, 2: validation --------------------------------------------------------
def test_wsgi_that_is_code_is_refused(project):
    app_yaml(project, f"wsgi: '{WSGI_INJECTION}'")
    one_line_error(fab(project, "-H", HOST, "deploy"), "app.wsgi", "module:callable")


def test_system_account_as_app_name_is_refused_before_any_connection(project):
    res = fab(project, "-H", HOST, "deploy", "--dry-run", FABRIC_APP_NAME="root")
    one_line_error(res, "app.name='root'", "system account", "choose another app name")


def test_name_with_trailing_newline_is_refused(project):
    one_line_error(fab(project, "-H", HOST, "deploy", FABRIC_APP_NAME="hello\n"), "app.name")


# -- 3: one line instead of a traceback ----------------------------------------
def test_invalid_yaml_names_the_file_and_line(project):
    (project / "fabric.yaml").write_text("app:\n  name: hello\n  workers: [\n")
    line = one_line_error(fab(project, "-H", HOST, "deploy"), "fabric.yaml", "line 4", "fix the YAML")
    assert line.startswith("error: ")


def test_fabric_variable_invoke_cannot_use(project):
    one_line_error(fab(project, "-H", HOST, "deploy", FABRIC_PORT="abc"), "FABRIC_PORT", "unset")


def test_config_value_of_the_wrong_shape(project):
    with open(project / "fabric.yaml", "a") as fh:
        fh.write("connect_kwargs: [1]\n")
    one_line_error(fab(project, "-H", HOST, "deploy"), "mapping", "fix the YAML")


@pytest.mark.parametrize("setting,key", [
    ("packages: 5", "app.packages"),
    ("linked_files: 5", "app.linked_files"),
    ("linked_dirs: 5", "app.linked_dirs"),
    ("packages: [[1]]", "app.packages"),
])
def test_lists_of_the_wrong_type(project, setting, key):
    app_yaml(project, setting)
    one_line_error(fab(project, "-H", HOST, "deploy"), key, "list")


def test_app_must_be_a_mapping(project):
    (project / "fabric.yaml").write_text("app: [1, 2]\n")
    one_line_error(fab(project, "-H", HOST, "deploy"), "`app` in fabric.yaml", "mapping")


def test_settings_from_the_environment(project):
    got = shown_settings(fab(project, "-H", HOST, "show-settings", FABRIC_APP_PACKAGES="curl",
                             FABRIC_APP_LINKED_DIRS="log,data", FABRIC_APP_WORKERS="4",
                             FABRIC_APP_VAR_REGION="fra1"))
    assert got == {"packages": ("curl",), "linked_dirs": ("log", "data"), "workers": 4, "extra": {"region": "fra1"}}


def test_settings_layers_env_over_inventory_over_yaml(project):
    app_yaml(project, "packages: [git]\nworkers: 3")
    (project / "inventory.ini").write_text("web1 host=192.0.2.1 workers=5 packages=vim\n")
    got = shown_settings(fab(project, "-H", "web1", "show-settings", FABRIC_APP_WORKERS="6"))
    assert got["packages"] == ("vim",) and got["workers"] == 6


def test_bad_number_from_the_environment(project):
    one_line_error(fab(project, "-H", HOST, "deploy", FABRIC_APP_WORKERS="abc"), "app.workers", "whole number")


def test_template_that_fails_while_rendering(project):
    conf = project / "templates/gunicorn.conf.py.j2"
    conf.write_text(conf.read_text() + "x = {{ workers / 0 }}\n")
    line = one_line_error(fab(project, "-H", HOST, "deploy"), "gunicorn.conf.py.j2", "division by zero")
    assert f":{len(conf.read_text().splitlines())}" in line


def commit_all(path):
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)


@pytest.mark.parametrize("tracked", [False, True])
def test_dangling_symlink_in_the_source(project, tracked):
    (project / "examples/hello/static").symlink_to("no/such/file")
    if tracked:
        commit_all(project)
    one_line_error(fab(project, "-H", HOST, "deploy"), "static", "remove it or point it at a file inside the app")


@pytest.mark.parametrize("tracked", [False, True])
def test_file_name_that_is_not_utf8(project, tracked):
    with open(os.path.join(os.fsencode(project / "examples/hello"), b"caf\xe9.txt"), "w") as fh:
        fh.write("x")
    if tracked:
        commit_all(project)
    one_line_error(fab(project, "-H", HOST, "deploy"), r"caf\xe9.txt", "rename")


def test_missing_key_file_from_the_command_line(project):
    one_line_error(fab(project, "-H", HOST, "-i", "/nonexistent", "deploy"), "/nonexistent", "key")


def test_missing_key_file_from_the_inventory(project):
    (project / "inventory.ini").write_text("web1 host=192.0.2.1 key=/nonexistent\n")
    one_line_error(fab(project, "-H", "web1", "deploy"), "/nonexistent", "key")


def test_default_port_out_of_range(project):
    with open(project / "fabric.yaml", "a") as fh:
        fh.write("port: 70000\n")
    one_line_error(fab(project, "-H", HOST, "deploy"), "70000", "1 to 65535")


# -- 4: secrets ----------------------------------------------------------------
def test_inventory_masks_secrets(project):
    (project / "inventory.ini").write_text(
        "web1 host=192.0.2.1 proxy=http://bob:s3cret@proxy:3128 var_api_token=tok-123 var_region=fra1\n")
    res = fab(project, "-H", "web1", "inventory")
    assert res.returncode == 0, res.stderr
    assert "s3cret" not in res.stdout and "tok-123" not in res.stdout
    assert "proxy=http://bob:****@proxy:3128" in res.stdout and "var_api_token=****" in res.stdout
    assert "var_region=fra1" in res.stdout


@pytest.mark.parametrize("proxy", ["http://bob:s3 cret@proxy:3128", "http://bob:s3cret@@proxy"])
def test_invalid_proxy_url_hides_the_password(project, proxy):
    app_yaml(project, f'proxy: "{proxy}"')
    line = one_line_error(fab(project, "-H", HOST, "deploy"), "app.proxy", "http://bob:****@proxy")
    assert "s3" not in line and "cret" not in line


def test_error_messages_mask_known_secrets(project):
    app_yaml(project, "var_api_token: tok-123\nhealth_path: tok-123")
    line = one_line_error(fab(project, "-H", HOST, "deploy"), "app.health_path", "****")
    assert "tok-123" not in line


def test_without_provisions_executor_the_fix_is_named(project):
    yaml = (project / "fabric.yaml").read_text()
    (project / "fabric.yaml").write_text(yaml.replace("tasks:\n  executor_class: provision.hosts.Executor\n", ""))
    one_line_error(fab(project, "-H", HOST, "deploy"), "executor_class: provision.hosts.Executor", "init")


def test_a_command_after_a_double_dash_is_refused_before_any_task(project):
    one_line_error(fab(project, "-H", HOST, "deploy", "--", "id"), "-- COMMAND", "ssh")


def test_run_takes_one_host_and_a_command(project):
    one_line_error(fab(project, "-H", f"{HOST},root@192.0.2.2", "run", "--", "id"), "run takes one host", "name one")
    one_line_error(fab(project, "-H", HOST, "run"), "nothing to run", "run -- COMMAND")
    one_line_error(fab(project, "-H", HOST, "deploy", "check", "--", "id"), "-- COMMAND")


def test_env_set_words_are_checked_before_any_connection_and_never_shown(project):
    line = one_line_error(fab(project, "-H", HOST, "env.set", "GOOD=hunter22", "1BAD=hunter22"),
                          "invalid env.set argument '1BAD=…'")
    assert "hunter22" not in line
    one_line_error(fab(project, "-H", HOST, "env.set"), "env.set needs NAME=VALUE")
    one_line_error(fab(project, "-H", HOST, "env.unset", "A=1"), "invalid env.unset argument")
    app_yaml(project, "env:\n  GREETING: [1, 2]")
    one_line_error(fab(project, "-H", HOST, "deploy"), "invalid setting app.env=", "not text")
