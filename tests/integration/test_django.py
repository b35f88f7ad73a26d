"""A Django site from `django-admin startproject` (tests/apps/djsite), deployed from its own
repository through settings and tasks only: the secret key from `fab env.set`, SQLite in a linked
dir, migrate and collectstatic as the release command, /static/ served by nginx, a user created
with `fab run`, still there after a code change deploy."""

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).with_name("fab"))
SETTINGS = """\
  health_path: /admin/login/
  linked_dirs: [data]
  release_command: python manage.py migrate --noinput && python manage.py collectstatic --noinput
  static:
    /static/: staticfiles
  env:
    DJANGO_DEBUG: "0"
"""
SECRET = "dj-test-secret-9f3b2c1a7e"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("django") / "djsite"
    shutil.copytree(ROOT / "tests/apps/djsite", root)
    init = subprocess.run([sys.executable, "-m", "provision", "init"], cwd=root, capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    assert "app.wsgi mysite.wsgi:application" in init.stdout  # guessed from mysite/wsgi.py
    with open(root / "fabric.yaml", "a") as fh:
        fh.write(SETTINGS)
    return root


def fab(droplet, project, *args, timeout=600):
    return subprocess.run([FAB, "-H", droplet.name, *args], cwd=project, env=droplet.env(), capture_output=True,
                          text=True, timeout=timeout)


def get(address: str, path: str):
    with OPENER.open(f"http://{address}{path}", timeout=10) as r:
        return r.status, r.headers, r.read()


def test_a_startproject_site_deploys_through_settings_and_tasks(droplet, project):
    res = fab(droplet, project, "env.set", f"SECRET_KEY={SECRET}")  # before the first deploy
    assert res.returncode == 0, res.stdout + res.stderr
    t0 = time.monotonic()
    res = fab(droplet, project, "deploy")
    fresh = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Applying auth.0001_initial" in res.stdout  # the release command's output is shown
    assert SECRET not in res.stdout + res.stderr
    status, _, body = get(droplet.address, "/admin/login/")
    assert status == 200 and b"Django" in body
    status, headers, body = get(droplet.address, "/static/admin/css/base.css")
    assert status == 200 and b"body" in body
    assert "X-Provision-Upstream" not in headers  # nginx served it from the release, not gunicorn
    # the secret is in no file others can read, and in no process list
    found = droplet.sh(f"grep -rlsF {SECRET} /etc /srv /run /var/log /tmp | xargs -r stat -c '%a %U %n' || true")
    for line in found.splitlines():
        mode, owner, path = line.split(" ", 2)
        assert owner == "root" and int(mode, 8) & 0o077 == 0, line
    print(f"\ndjango fresh deploy: {fresh:.2f}s")


def test_a_user_made_with_fab_run_outlives_a_code_change_deploy(droplet, project):
    make = ("from django.contrib.auth.models import User; "
            "User.objects.create_user('alice', password='wonderland-42')")
    res = fab(droplet, project, "run", "--", "python", "manage.py", "shell", "-c", make)
    assert res.returncode == 0, res.stdout + res.stderr
    urls = project / "mysite/urls.py"
    urls.write_text(urls.read_text() + "\n# a code change\n")
    t0 = time.monotonic()
    res = fab(droplet, project, "deploy")
    change = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    ask = "from django.contrib.auth.models import User; print(User.objects.filter(username='alice').count())"
    res = fab(droplet, project, "run", "--", "python", "manage.py", "shell", "-c", ask)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "1", res.stdout + res.stderr
    res = fab(droplet, project, "run", "--", "python", "-c", "raise SystemExit(7)")
    assert res.returncode == 7
    print(f"\ndjango code-change deploy: {change:.2f}s")
