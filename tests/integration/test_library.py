"""provision as a library: a user's project deploys with the kit installed from its wheel.

The kit is built into a wheel (pip's own ``pip wheel --no-build-isolation``, setuptools and wheel
from this venv, from a copy of the checkout so nothing is built inside it) and installed into a
fresh ``python -m venv`` with ``pip install --no-index --find-links``. Its dependencies come as
wheels repacked from the distributions installed in this test's own venv (the files each one's
RECORD lists below site-packages, with a new RECORD; scripts are left for pip to make again from
entry_points.txt): the very versions the kit's tests run with, no network, and pip still resolves
provision's declared dependencies from its wheel's metadata. Not ``--system-site-packages`` nor
PYTHONPATH: this venv has the kit editable-installed, and the fresh one must not see it.
Built once per test session (about 10 s).

Then, in a new directory holding a small Flask app: ``python -m provision init``, a distinct app
name in fabric.yaml, one template overridden from ``python -m provision template``, a check of
the project's own, and ``fab -H it-library deploy check`` with the fresh venv's ``fab``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.integration

APP_NAME = "libapp"
HEADER = "add_header X-Library-Test yes always;"
# Not kit code: build tools and what the fresh venv brings itself.
NOT_DEPENDENCIES = {"provision", "pip", "setuptools", "wheel"}
APP = '''\
from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "Hello from a library user!\\n"
'''
CHECK = '''\
def test_the_override_template_is_live(host, app):
    assert app["name"] == "libapp"
    assert "X-Library-Test" in host.file("/etc/nginx/sites-available/libapp").content_string
'''


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution: the files its RECORD lists below site-packages
    (not scripts, not bytecode, not what pip records about the install itself), a new RECORD."""
    tags = [line.split(":", 1)[1].strip().split("-") for line in dist.read_text("WHEEL").splitlines()
            if line.startswith("Tag:")]
    tag = "-".join(".".join(dict.fromkeys(t[i] for t in tags)) for i in range(3))  # py2.py3-none-any
    info = next(p.parts[0] for p in dist.files if p.parts[0].endswith(".dist-info"))
    name, version = info[:-len(".dist-info")].rsplit("-", 1)
    wheel = out / f"{name}-{version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w") as z:
        for rel in dist.files:
            if rel.parts[0] == ".." or "__pycache__" in rel.parts or \
                    (rel.parts[0] == info and rel.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            data = Path(dist.locate_file(rel)).read_bytes()
            z.writestr(rel.as_posix(), data)
            record.append(f"{rel.as_posix()},{_digest(data)},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def run(args: list, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="session")
def wheels(tmp_path_factory) -> Path:
    """provision's wheel and its dependencies' wheels, in one folder for --find-links."""
    out = tmp_path_factory.mktemp("wheels")
    src = tmp_path_factory.mktemp("src") / "provision"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".sandbox", ".bench", ".pytest_cache", "build", "*.egg-info", "__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", out, src])
    site = Path(sysconfig.get_paths()["purelib"])
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if dist.metadata["Name"].lower() not in NOT_DEPENDENCIES:
            repack(dist, out)
    return out


@pytest.fixture(scope="session")
def venv(tmp_path_factory, wheels) -> Path:
    """A fresh virtualenv with provision installed from its wheel, offline."""
    d = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", d])
    run([d / "bin/python", "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, "provision"],
        env=clean_env(d))
    return d


def clean_env(venv: Path, base: dict | None = None) -> dict:
    """The environment of a user who activated ``venv``: nothing of this test's venv."""
    env = {k: v for k, v in (base or os.environ).items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("PIP_")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(sys.executable).parent]
    return dict(env, VIRTUAL_ENV=str(venv), PATH=os.pathsep.join([str(venv / "bin"), *path]),
                PIP_CONFIG_FILE=os.devnull)


def site_packages(venv: Path) -> Path:
    [site] = venv.glob("lib/python*/site-packages")
    return site


def test_the_installed_kit_is_its_wheel_not_the_checkout(venv):
    site = site_packages(venv)
    where = run([venv / "bin/python", "-c", "import provision; print(provision.__file__)"], cwd=venv,
                env=clean_env(venv)).stdout.strip()
    assert Path(where) == site / "provision/__init__.py"
    assert not list(site.glob("__editable__*"))
    for f in [*site.glob("*.pth"), *site.glob("provision-*.dist-info/*")]:
        assert str(ROOT) not in f.read_text(errors="replace"), f
    # every file of the package: modules, templates, checks, remote programs
    kit = sorted(p.relative_to(ROOT) for p in (ROOT / "provision").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    assert {"provision/templates/nginx-site.conf.j2", "provision/checks/test_smoke.py",
            "provision/remote/switch.py"} <= {p.as_posix() for p in kit}
    missing = [str(p) for p in kit if not (site / p).is_file()]
    assert not missing, f"not in the wheel: {missing}"
    assert all((site / p).read_bytes() == (ROOT / p).read_bytes() for p in kit)


@pytest.fixture(scope="module")
def project(tmp_path_factory, venv) -> Path:
    """A user's Flask app after `python -m provision init`, one template overridden and a check."""
    root = tmp_path_factory.mktemp("projects") / "flaskshop"
    root.mkdir()
    (root / "app.py").write_text(APP)
    (root / "requirements.txt").write_text("flask>=3,<4\n")
    python = [venv / "bin/python", "-m", "provision"]
    init = run([*python, "init"], cwd=root, env=clean_env(venv))
    assert "wrote fabfile.py, fabric.yaml, inventory.ini (app.name flaskshop, app.wsgi app:app)" in init.stdout
    yaml = (root / "fabric.yaml").read_text()
    assert "\n  name: flaskshop\n" in yaml
    (root / "fabric.yaml").write_text(yaml.replace("\n  name: flaskshop\n", f"\n  name: {APP_NAME}\n"))
    site = run([*python, "template", "nginx-site.conf.j2"], cwd=root, env=clean_env(venv)).stdout
    assert site.count("    location / {\n") == 1
    (root / "templates").mkdir()
    (root / "templates/nginx-site.conf.j2").write_text(
        site.replace("    location / {\n", f"    location / {{\n        {HEADER}\n"))
    (root / "checks").mkdir()
    (root / "checks/test_library.py").write_text(CHECK)
    return root


def test_a_users_project_deploys_with_the_installed_kit(droplet, venv, project):
    res = subprocess.run([venv / "bin/fab", "-H", droplet.name, "deploy", "check"], cwd=project,
                         env=clean_env(venv, droplet.env()), capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert re.search(rf"^{droplet.name} +\d+ +\d+ +0 ", res.stdout, re.M), out  # deploy's summary: none failed
    assert re.search(r"^=+ \d+ passed(, \d+ skipped)? in ", res.stdout, re.M) and not re.search(r"\d+ failed", out), out  # check
    assert "\ntest_smoke.py::test_http_through_nginx_answers_200[" in res.stdout  # the kit's checks
    assert "checks/test_library.py::test_the_override_template_is_live" in res.stdout  # the project's own
    assert "test_hello" not in out  # the kit's example app's check is not the project's
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{droplet.address}/", timeout=10) as r:
        assert r.status == 200
        assert r.read().decode() == "Hello from a library user!\n"
        assert r.headers["X-Library-Test"] == "yes"
    assert droplet.sh(f"systemctl is-active {APP_NAME}@a {APP_NAME}@b || true").split().count("active") == 1
    # the deploy's own files stay home: the release holds the app (and its checks), nothing else
    shipped = droplet.sh(f"cd /srv/{APP_NAME}/current && find . -path ./.provision -prune -o -type f -print "
                         "-o -type l -print | sort").split()
    assert shipped == ["./.env", "./.venv", "./app.py", "./checks/test_library.py", "./log", "./requirements.txt",
                       "./uploads"], shipped
