"""The app's dependencies, read locally: requirements files with their includes, hashes,
pyproject.toml, src/ layouts, asgi; and the virtualenv step that ships them."""

import hashlib
import subprocess
from pathlib import Path

import pytest
from pip._internal.network.session import PipSession
from pip._internal.req.req_file import parse_requirements

from provision import config as cfg
from provision import requirements as deps
from provision.app import venv_key, venv_step, release_configs
from provision.errors import ProvisionError
from provision.render import render

from .test_bad_input import HOST, fab, one_line_error, project  # noqa: F401 (project: a fixture)

ROOT = Path(__file__).resolve().parents[2]
GUNICORN_PIN = "gunicorn==27.0.1 \\\n    --hash=sha256:378b26b9a38adcf4592f28828233c1716acc55e833ea06bf48719782efaa0d10\n"


def app(tmp_path, files: dict[str, str]) -> Path:
    d = tmp_path / "app"
    for rel, text in {"app.py": "app = None\n", **files}.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def settings(source: Path, **over) -> cfg.Settings:
    return cfg.build(cfg.layer({"name": "shop", "source": str(source)}, {}, {}, over), source)


def one_line(match: str, fn, *args):
    with pytest.raises(ProvisionError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_pip_reads_lines_so_do_we():
    text = "# top\nflask>=3 # web\n\nrequests \\\n  >=2 \\\n  ; python_version>'3'\nurl#frag\n-r base.txt\n"
    assert deps.logical_lines(text) == [(2, "flask>=3"), (4, "requests   >=2   ; python_version>'3'"),
                                        (7, "url#frag"), (8, "-r base.txt")]


@pytest.mark.parametrize("line,found", [
    ("-r base.txt", ("-r", "base.txt")), ("-rbase.txt", ("-r", "base.txt")),
    ("--requirement base.txt", ("-r", "base.txt")), ("--requirement=base.txt", ("-r", "base.txt")),
    ("-c constraints.txt", ("-c", "constraints.txt")), ("--constraint=c.txt", ("-c", "c.txt")),
    ("-r 'my reqs.txt'", ("-r", "my reqs.txt")),
    ("flask", None), ("--hash=sha256:00", None), ("-e .", None), ("--require-hashes", None),
])
def test_includes_in_every_form_pip_takes(line, found):
    assert deps.include_of(line) == found


def test_included_files_ship_at_their_paths_and_key_the_virtualenv(tmp_path):
    src = app(tmp_path, {"requirements.txt": "-r reqs/base.txt\n-c constraints.txt\nflask\n",
                         "reqs/base.txt": "-r common.txt\nrequests\n", "reqs/common.txt": "-r ../requirements.txt\n",
                         "constraints.txt": "flask<4\n"})
    d = deps.load(src, "requirements.txt", asgi=False)
    assert [p for p, _ in d.files] == ["requirements.txt", "reqs/base.txt", "constraints.txt", "reqs/common.txt"]
    assert d.main == "requirements.txt" and d.added == ("gunicorn>=22",) and not d.hashed
    key = d.key("python3")
    (src / "reqs/common.txt").write_text("-r ../requirements.txt\nsix\n")  # a change two includes deep
    assert deps.load(src, "requirements.txt", asgi=False).key("python3") != key


def test_a_lone_requirements_file_keeps_the_key_it_always_had(tmp_path):
    src = app(tmp_path, {"requirements.txt": "flask\n"})
    old = hashlib.sha256(b"flask\n" + b"\0python3\0" + b"gunicorn>=22").hexdigest()[:16]
    assert venv_key(settings(src)) == old


@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:DeprecationWarning")  # pip's own import
def test_venv_step_writes_the_files_where_pip_finds_the_includes(tmp_path):
    src = app(tmp_path, {"requirements.txt": "-r reqs/base.txt\nflask\n", "reqs/base.txt": "-c ../c.txt\nsix\n",
                         "c.txt": "six<2\n"})
    s = settings(src)
    key = venv_key(s)
    cmds = venv_step(s, key).commands
    reqs = s.layout.venv_requirements(key)
    assert cmds[-3].endswith(f"-r {reqs}/requirements.txt 'gunicorn>=22'")
    assert f"mkdir -m 700 {reqs}" in cmds  # root's alone: an index URL in them may hold a password
    here = tmp_path / "host"
    writes = [c.replace(reqs, str(here)) for c in cmds if c.startswith("mkdir -")]
    subprocess.run(["bash", "-euc", "\n".join(writes)], check=True)
    found = {str(p.relative_to(here)): p.read_text() for p in here.rglob("*") if p.is_file()}
    assert found == {"requirements.txt": "-r reqs/base.txt\nflask\n", "reqs/base.txt": "-c ../c.txt\nsix\n",
                     "c.txt": "six<2\n"}
    parsed = parse_requirements(str(here / "requirements.txt"), session=PipSession(), constraint=False)
    assert sorted((r.requirement, r.constraint) for r in parsed) == [("flask", False), ("six", False), ("six<2", True)]


@pytest.mark.parametrize("files,match", [
    ({"requirements.txt": "-r ../outside.txt\n"}, r"requirements.txt, line 1: -r ../outside.txt leaves the app's "
                                                  "source .*; keep the file inside it"),
    ({"requirements.txt": "flask\n-r reqs/a.txt\n", "reqs/a.txt": "-c ../../x.txt\n"},
     r"reqs/a.txt, line 1: -c ../../x.txt leaves the app's source"),
    ({"requirements.txt": "-r base.txt\n"}, r"requirements.txt, line 1: -r base.txt: no such file .*/app/base.txt; "
                                            "create it or fix the path"),
    ({"requirements.txt": "-r https://example.com/r.txt\n"}, "download it into your app's source"),
    ({"requirements.txt": "-r /etc/r.txt\n"}, "absolute path means nothing on the host"),
])
def test_includes_outside_the_source_or_missing_are_one_line(tmp_path, files, match):
    src = app(tmp_path, files)
    one_line(match, deps.load, src, "requirements.txt", False)


def test_an_include_that_links_out_of_the_source_is_refused(tmp_path):
    src = app(tmp_path, {"requirements.txt": "-r base.txt\n"})
    (tmp_path / "elsewhere.txt").write_text("flask\n")
    (src / "base.txt").symlink_to(tmp_path / "elsewhere.txt")
    one_line("-r base.txt leads out of the app's source .* through a link", deps.load, src, "requirements.txt", False)


@pytest.mark.parametrize("files", [
    {"requirements.txt": GUNICORN_PIN + "six==1.17.0 --hash=sha256:4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274\n"},
    {"requirements.txt": "--require-hashes\n-r server.txt\n", "server.txt": "gunicorn==27.0.1\n"},
    {"requirements.txt": "-c pins.txt\ngunicorn\n", "pins.txt": GUNICORN_PIN},  # a hash in a constraints file counts
])
def test_hash_pinned_requirements_get_nothing_added(tmp_path, files):
    d = deps.load(app(tmp_path, files), "requirements.txt", asgi=False)
    assert d.hashed and d.added == ()
    s = settings(tmp_path / "app")
    assert "gunicorn" not in venv_step(s, venv_key(s)).commands[-3].split("requirements.txt", 1)[1]


@pytest.mark.parametrize("files,asgi,missing", [
    ({"requirements.txt": "six==1.17.0 --hash=sha256:00\n"}, False, "gunicorn"),
    ({"requirements.txt": "-c pins.txt\nsix==1 --hash=sha256:00\n", "pins.txt": GUNICORN_PIN}, False, "gunicorn"),
    ({"requirements.txt": GUNICORN_PIN}, True, "uvicorn"),
    ({"requirements.txt": "--require-hashes\nsix==1\n"}, True, "gunicorn and uvicorn"),
])
def test_hash_pinned_requirements_without_the_server_are_one_line(tmp_path, files, asgi, missing):
    msg = one_line(f"requirements.txt is hash-pinned \\(--hash\\), so provision adds no {missing} to it: "
                   f"pin {missing} there too", deps.load, app(tmp_path, files), "requirements.txt", asgi)
    assert ("websockets" in msg) == ("uvicorn" in missing)


def test_normalised_names_and_extras_count_as_pinned(tmp_path):
    files = {"requirements.txt": "Gunicorn==27.0.1 --hash=sha256:00\nUvicorn[standard]==0.54.0 --hash=sha256:00\n"}
    assert deps.load(app(tmp_path, files), "requirements.txt", asgi=True).added == ()


def test_asgi_adds_uvicorn_and_its_worker(tmp_path):
    src = app(tmp_path, {"requirements.txt": "fastapi\n"})
    s = settings(src, asgi="true")
    assert s.asgi and s.dependencies.added == ("gunicorn>=22", "uvicorn[standard]>=0.30")
    assert venv_key(s) != venv_key(settings(src))
    conf = render(ROOT / "provision/templates", "gunicorn.conf.py.j2", s.template_vars())
    assert 'worker_class = "uvicorn.workers.UvicornWorker"\n' in conf
    assert "worker_class" not in render(ROOT / "provision/templates", "gunicorn.conf.py.j2",
                                        settings(src).template_vars())


@pytest.mark.parametrize("value,expected", [(True, True), ("yes", True), ("1", True), ("false", False), ("", False)])
def test_asgi_from_yaml_inventory_or_environment(tmp_path, value, expected):
    assert settings(app(tmp_path, {"requirements.txt": ""}), asgi=value).asgi is expected


def test_asgi_that_is_not_a_boolean_is_one_line(tmp_path):
    src = app(tmp_path, {"requirements.txt": ""})
    one_line(r"invalid setting app.asgi='maybe': expected true or false", lambda: settings(src, asgi="maybe"))


PYPROJECT = """[project]
name = "shop"
version = "1"
dependencies = [
    "flask>=3",  # comments are TOML's
    "six ; python_version >= '3'",
]
"""


def test_pyproject_dependencies_without_requirements_txt(tmp_path):
    src = app(tmp_path, {"pyproject.toml": PYPROJECT, "src/shop/__init__.py": "app = None\n"})
    s = settings(src, wsgi="shop:app")
    assert s.requirements == src / "pyproject.toml"
    assert s.dependencies.files == (("pyproject-dependencies.txt", b"flask>=3\nsix ; python_version >= '3'\n"),)
    assert s.dependencies.added == ("gunicorn>=22",) and s.pythonpath == "src"
    conf = render(ROOT / "provision/templates", "gunicorn.conf.py.j2", s.template_vars())
    assert "pythonpath = 'src'\n" in conf
    # fab run, the release command and processes import it too: their working directory is the release
    assert release_configs(s)["env"] == b'PYTHONPATH="src"\n'
    assert release_configs(settings(src, wsgi="shop:app", env={"PYTHONPATH": "lib"}))["env"] == b'PYTHONPATH="lib"\n'
    # requirements.txt, when there is one, is what counts
    (src / "requirements.txt").write_text("django\n")
    assert settings(src, wsgi="shop:app").dependencies.files == (("requirements.txt", b"django\n"),)


def test_a_package_at_the_top_needs_no_pythonpath(tmp_path):
    src = app(tmp_path, {"pyproject.toml": PYPROJECT, "flaskr/__init__.py": "", "src/flaskr/__init__.py": ""})
    assert deps.pythonpath(src, "flaskr:create_app()") == ""
    assert deps.pythonpath(src, "app:app") == ""  # app.py at the top
    assert deps.pythonpath(src, "src_only.wsgi:app") == ""  # nowhere: maybe installed by the requirements
    (src / "src/mod.py").write_text("")
    assert deps.pythonpath(src, "mod:app") == "src"


@pytest.mark.parametrize("text,match", [
    ("[project\n", r"pyproject.toml: not valid TOML \(.*line 1.*\); fix it, or list your app's packages in requirements.txt"),
    ("[tool.poetry]\nname = 'x'\n", r"pyproject.toml has no \[project\] table and there is no requirements.txt"),
    ("[project]\nname='x'\ndynamic = ['dependencies']\n", "declares its dependencies dynamic"),
    ("[project]\ndependencies = 'flask'\n", "must be a list of strings"),
    ("[project]\ndependencies = ['--index-url=http://evil/']\n", "is not a requirement like"),
    ('[project]\ndependencies = ["flask\\n-r /etc/passwd"]\n', "is not a requirement like"),
])
def test_pyproject_mistakes_are_one_line(tmp_path, text, match):
    one_line(match, settings, app(tmp_path, {"pyproject.toml": text}))


def test_a_project_without_dependencies_gets_the_server(tmp_path):
    s = settings(app(tmp_path, {"pyproject.toml": "[project]\nname = 'x'\nversion = '1'\n"}))
    assert s.dependencies.files == (("pyproject-dependencies.txt", b""),) and s.dependencies.added == ("gunicorn>=22",)


def test_neither_requirements_nor_pyproject_is_one_line(tmp_path):
    one_line(r"no requirements.txt or pyproject.toml in .*/app: list your app's packages in requirements.txt "
             r"\(or \[project\] dependencies in pyproject.toml\), or set app.requirements", settings, app(tmp_path, {}))


def test_a_requirements_setting_is_never_replaced_by_pyproject(tmp_path):
    src = app(tmp_path, {"pyproject.toml": PYPROJECT, "reqs/prod.txt": "-r base.txt\n", "reqs/base.txt": "six\n"})
    one_line(r"app.requirements='prod.txt': no such file", lambda: settings(src, requirements="prod.txt"))
    assert [p for p, _ in settings(src, requirements="reqs/prod.txt").dependencies.files] == [
        "reqs/prod.txt", "reqs/base.txt"]
    (tmp_path / "r.txt").write_text("six\n")
    one_line(r"app.requirements='../r.txt': it leaves the app's source",
             lambda: settings(src, requirements="../r.txt"))


def test_through_fab_a_hash_pinned_file_without_gunicorn_stops_before_any_host(project):
    (project / "examples/hello/requirements.txt").write_text("flask==3.1.0 --hash=sha256:00\n")
    one_line_error(fab(project, "-H", HOST, "deploy"), "requirements.txt is hash-pinned", "pin gunicorn there too")


def test_init_says_nothing_of_requirements_for_a_pyproject_app(tmp_path):
    from provision import scaffold
    src = app(tmp_path, {"pyproject.toml": PYPROJECT})
    assert not [n for n in scaffold.plan(src, "shop").notes if "requirements" in n]
    (src / "pyproject.toml").unlink()
    assert [n for n in scaffold.plan(src, "shop").notes if "no requirements.txt or pyproject.toml" in n]
