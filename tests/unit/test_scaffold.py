"""`python -m provision init` and `python -m provision template`: what they write and print."""

import subprocess
import sys
from pathlib import Path

import pytest
from fabric import Config

from provision import config as cfg
from provision import scaffold
from provision.errors import ProvisionError
from provision.render import KIT_TEMPLATES, NAMES

FAB = str(Path(sys.executable).with_name("fab"))
FLASK = "from flask import Flask\n\napp = Flask(__name__)\n"
FACTORY = "from flask import Flask\n\n\ndef create_app():\n    return Flask(__name__)\n"
DJANGO_WSGI = ("import os\nfrom django.core.wsgi import get_wsgi_application\n\n"
               "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.settings')\n"
               "application = get_wsgi_application()\n")


def project(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def provision(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "provision", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def settings_of(root: Path) -> cfg.Settings:
    """The settings `fab` would build from the project's fabric.yaml (read by Fabric itself)."""
    c = Config(project_location=str(root))
    c.load_project()
    assert c.tasks.executor_class == "provision.hosts.Executor"
    return cfg.build(cfg.layer(dict(c.app), {}, {}, {}), root)


@pytest.mark.parametrize("directory, name", [
    ("hello", "hello"), ("My Flask.App", "my-flask-app"), ("2048_game", "game"), ("Café", "cafe"),
    ("web--shop_", "web--shop"), ("a" * 40, "a" * 31), ("x" * 30 + "-yz", "x" * 30)])
def test_app_name_from_the_directory(directory, name):
    assert scaffold.app_name(directory) == name
    assert cfg.name_problem(name) is None


@pytest.mark.parametrize("directory", ["2048", "---", "nginx", "www-data", "systemd-x", "日本"])
def test_no_app_name_from_the_directory_says_how_to_name_it(directory):
    with pytest.raises(ProvisionError, match=r"--name NAME") as e:
        scaffold.app_name(directory)
    assert repr(directory) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("files, wsgi", [
    ({"app.py": FLASK}, "app:app"),
    ({"app.py": "from myapp import app\n"}, "app:app"),
    ({"app.py": "app: object = object()\n"}, "app:app"),
    ({"app.py": FACTORY}, "app:create_app()"),
    ({"app.py": FLASK + FACTORY}, "app:app"),
    ({"manage.py": "", "mysite/__init__.py": "", "mysite/wsgi.py": DJANGO_WSGI}, "mysite.wsgi:application"),
])
def test_wsgi_guessed_from_the_layout(tmp_path, files, wsgi):
    assert scaffold.guess_wsgi(project(tmp_path, files)) == (wsgi, None)
    assert cfg.WSGI_RE.fullmatch(wsgi)


@pytest.mark.parametrize("files, why", [
    ({}, "no app.py"),
    ({"app.py": "def main():\n    app = 1\n"}, "no app.py"),  # not at the top level
    ({"app.py": "app = (\n"}, "no app.py"),  # not Python: not guessed, not run
    ({"my-site/wsgi.py": DJANGO_WSGI}, "no app.py"),  # not an importable package name
    ({"mysite/wsgi.py": "import os\n"}, "no app.py"),
    ({"one/wsgi.py": DJANGO_WSGI, "two/wsgi.py": DJANGO_WSGI}, "several Django projects (one/wsgi.py, two/wsgi.py)"),
])
def test_wsgi_not_guessed_says_why(tmp_path, files, why):
    wsgi, why_not = scaffold.guess_wsgi(project(tmp_path, files))
    assert wsgi is None and why in why_not


@pytest.mark.parametrize("name", ["on", "yes", "null", "n", "true"])
def test_names_yaml_would_misread_are_quoted(tmp_path, name):
    (tmp_path / "requirements.txt").write_text("flask\n")
    for f, text in scaffold.plan(tmp_path, name).files.items():
        (tmp_path / f).write_text(text)
    assert settings_of(tmp_path).name == name


def test_init_in_a_flask_project(tmp_path):
    root = project(tmp_path / "Shop", {"app.py": FLASK, "requirements.txt": "flask\n"})
    res = provision(root, "init")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "wrote fabfile.py, fabric.yaml, inventory.ini (app.name shop, app.wsgi app:app)" in res.stdout
    assert "fab -H HOST deploy" in res.stdout and "note:" not in res.stdout
    assert (root / "fabfile.py").read_text() == "from provision.tasks import ns  # noqa: F401  (the tasks: `fab --list`)\n"
    assert all(line.startswith("#") or not line.strip() for line in (root / "inventory.ini").read_text().splitlines())
    s = settings_of(root)
    assert (s.name, s.wsgi, s.source, s.templates) == ("shop", "app:app", root, root / "templates")
    # the fabfile imports, and fab finds the tasks through it
    listed = subprocess.run([FAB, "--list"], cwd=root, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "deploy" in listed.stdout
    # the inventory parses, with no host in it
    inv = subprocess.run([FAB, "-H", "root@203.0.113.10", "inventory"], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert inv.returncode == 0 and inv.stdout.startswith("root@203.0.113.10"), inv.stdout + inv.stderr


def test_init_in_a_django_project(tmp_path):
    root = project(tmp_path / "mysite", {"manage.py": "", "requirements.txt": "django\n", "mysite/__init__.py": "",
                                         "mysite/wsgi.py": DJANGO_WSGI})
    res = provision(root, "init")
    assert res.returncode == 0, res.stderr
    assert "(app.name mysite, app.wsgi mysite.wsgi:application)" in res.stdout
    assert settings_of(root).wsgi == "mysite.wsgi:application"


def test_init_with_nothing_guessable_writes_a_placeholder_and_says_so(tmp_path):
    root = project(tmp_path / "service", {"main.py": "print('hi')\n"})
    res = provision(root, "init", "--name", "svc")
    assert res.returncode == 0, res.stderr
    assert "(app.name svc, app.wsgi not set)" in res.stdout
    assert "note: app.wsgi not guessed" in res.stdout and "note: no requirements.txt" in res.stdout
    assert "  # wsgi: myapp:app  # module:callable" in (root / "fabric.yaml").read_text()
    (root / "requirements.txt").write_text("")
    assert (settings_of(root).name, settings_of(root).wsgi) == ("svc", cfg.DEFAULTS["wsgi"])


@pytest.mark.parametrize("present", scaffold.FILES)
def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path, present):
    root = project(tmp_path / "shop", {"app.py": FLASK, present: "mine\n"})
    res = provision(root, "init")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr == f"error: {present} already exists in {root}; run init in a directory without them, or move " \
                         "them away\n"
    assert sorted(p.name for p in root.iterdir()) == sorted(["app.py", present])
    assert (root / present).read_text() == "mine\n"


def test_init_names_every_file_in_the_way_and_a_dangling_link(tmp_path):
    root = project(tmp_path / "shop", {"fabfile.py": ""})
    (root / "inventory.ini").symlink_to(tmp_path / "nowhere")
    res = provision(root, "init")
    assert res.returncode == 2 and res.stderr.startswith("error: fabfile.py, inventory.ini already exist in ")
    assert not (root / "fabric.yaml").exists()


@pytest.mark.parametrize("args, message", [
    (["init"], "cannot name the app after the directory '2048'"),
    (["init", "--name", "Shop"], "invalid app name 'Shop': use lowercase letters"),
    (["init", "--name", "root"], "invalid app name 'root': that is a system account"),
])
def test_init_without_a_valid_name_writes_nothing(tmp_path, args, message):
    root = project(tmp_path / "2048", {"app.py": FLASK})
    res = provision(root, *args)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(f"error: {message}") and res.stderr.count("\n") == 1
    assert [p.name for p in root.iterdir()] == ["app.py"]


def test_template_prints_the_kits_template_or_lists_them(tmp_path):
    for name in NAMES:
        res = provision(tmp_path, "template", name)
        assert res.returncode == 0 and res.stdout == (KIT_TEMPLATES / name).read_text()
    res = provision(tmp_path, "template")
    assert res.returncode == 0 and res.stdout.split() == list(NAMES)
    res = provision(tmp_path, "template", "nginx.conf")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: no template 'nginx.conf'; the templates are {', '.join(NAMES)}\n"
    assert list(tmp_path.iterdir()) == []


def test_fab_template_task(tmp_path):
    root = project(tmp_path / "shop", {"app.py": FLASK})
    provision(root, "init")
    listed = subprocess.run([FAB, "--list"], cwd=root, capture_output=True, text=True, timeout=60)
    assert "  template " in listed.stdout
    res = subprocess.run([FAB, "template", "--name", "gunicorn.conf.py.j2"], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == (KIT_TEMPLATES / "gunicorn.conf.py.j2").read_text()
    res = subprocess.run([FAB, "template", "--name", "x"], cwd=root, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: no template 'x'")


def test_help_and_unknown_commands(tmp_path):
    res = provision(tmp_path, "--help")
    assert res.returncode == 0 and "init" in res.stdout and "template" in res.stdout
    res = provision(tmp_path, "deploy")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("error: argument COMMAND: invalid choice: 'deploy' (choose from 'init', 'template'); "
                          "see `python -m provision --help`\n")
    res = provision(tmp_path, "init", "--force")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--force" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_init_that_cannot_write_says_so_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import builtins

    from provision.__main__ import main

    real_open = builtins.open

    def open_(path, mode="r", *a, **kw):  # the third file fails, as a full disk would
        if str(path).endswith("inventory.ini") and "x" in mode:
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "open", open_)
    assert main(["init", "--name", "shop"]) == 2
    assert list(tmp_path.iterdir()) == []
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith("inventory.ini: No space left on device; nothing was written")
