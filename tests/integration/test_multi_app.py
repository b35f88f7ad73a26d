"""Several apps on one host: a second app never breaks the first, and no app takes over an account
provision did not make. Order matters: one droplet."""

import shutil
import urllib.request

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.integration

# Every entry under /etc and /srv (type, mode, owner, link target), and the content of every file
CHECKSUM = ("find /etc /srv -xdev -printf '%p %y %m %u %g %l\\n' | sort | sha256sum; "
            "find /etc /srv -xdev -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum")
SECOND_SITE = "cat /etc/nginx/sites-available/second; readlink /etc/nginx/sites-enabled/second"


def get(address: str, host: str = "") -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://{address}/", headers={"Host": host} if host else {})
    with opener.open(request, timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def one_line(res) -> str:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    [line] = res.stderr.strip().splitlines()
    return line


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """A copy of examples/hello with another greeting."""
    d = tmp_path_factory.mktemp("app") / "second"
    shutil.copytree(ROOT / "examples/hello", d)
    app = d / "app.py"
    app.write_text(app.read_text().replace("Hello from provision!", "Hello from second!"))
    return d


@pytest.fixture
def bad_templates(tmp_path):
    """The templates, with a site nginx refuses (an unknown directive)."""
    for t in (ROOT / "provision/templates").iterdir():
        shutil.copy(t, tmp_path / t.name)
    site = tmp_path / "nginx-site.conf.j2"
    text = site.read_text()
    assert "client_max_body_size {{ client_max_body_size }};" in text
    site.write_text(text.replace("client_max_body_size {{ client_max_body_size }};", "no_such_directive on;"))
    return tmp_path


def deploy_second(droplet, second, **env):
    return droplet.fab("-H", droplet.name, "deploy", "--source", str(second),
                       env={"FABRIC_APP_NAME": "second", **env})


def test_first_app_is_the_default_server(droplet):
    res = droplet.fab("-H", droplet.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address) == "Hello from provision!\n"


def test_second_default_server_is_refused_naming_the_first_and_changes_nothing(droplet, second):
    before = droplet.sh(CHECKSUM)
    res = deploy_second(droplet, second)
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_line(res)
    assert "app second" in line and "/etc/nginx/sites-enabled/hello" in line and "server_name" in line, line
    dry = droplet.fab("-H", droplet.name, "deploy", "--dry-run", "--source", str(second),
                      env={"FABRIC_APP_NAME": "second"})
    assert dry.returncode == 2 and one_line(dry) == line
    assert f"{droplet.name}: dry run stopped, nothing was touched" in dry.stdout
    assert droplet.sh(CHECKSUM) == before
    assert get(droplet.address) == "Hello from provision!\n"


def test_second_app_with_a_server_name_serves_beside_the_first(droplet, second):
    res = deploy_second(droplet, second, FABRIC_APP_SERVER_NAME="second.test")
    assert res.returncode == 0, res.stdout + res.stderr
    for _ in range(2):  # before and after nginx restarts from its files, as after a reboot
        assert get(droplet.address, "second.test") == "Hello from second!\n"
        assert get(droplet.address) == get(droplet.address, "other.test") == "Hello from provision!\n"
        droplet.sh("nginx -t -q && systemctl restart nginx")


def test_first_app_still_deploys_without_changes(droplet):
    res = droplet.fab("-H", droplet.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{droplet.name}: no changes, nothing restarted" in res.stdout


def test_a_site_nginx_refuses_is_put_back(droplet, second, bad_templates):
    before = droplet.sh(SECOND_SITE)
    res = deploy_second(droplet, second, FABRIC_APP_SERVER_NAME="second.test",
                        FABRIC_APP_TEMPLATES=str(bad_templates))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED  file /etc/nginx/sites-available/second" in res.stdout
    assert 'unknown directive "no_such_directive"' in res.stdout  # nginx's own message
    assert droplet.sh(SECOND_SITE) == before
    droplet.sh("nginx -t -q && systemctl restart nginx")
    assert get(droplet.address, "second.test") == "Hello from second!\n"


def test_a_new_site_nginx_refuses_is_removed(droplet, second, bad_templates):
    droplet.sh("rm /etc/nginx/sites-enabled/second /etc/nginx/sites-available/second")
    res = deploy_second(droplet, second, FABRIC_APP_SERVER_NAME="second.test",
                        FABRIC_APP_TEMPLATES=str(bad_templates))
    assert res.returncode == 1, res.stdout + res.stderr
    assert droplet.sh("ls -A /etc/nginx/sites-enabled /etc/nginx/sites-available").split() == [
        "/etc/nginx/sites-available:", "default", "hello", "/etc/nginx/sites-enabled:", "hello"]
    droplet.sh("nginx -t -q")
    res = deploy_second(droplet, second, FABRIC_APP_SERVER_NAME="second.test")
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address, "second.test") == "Hello from second!\n"


def test_an_account_provision_did_not_make_is_refused(droplet):
    droplet.sh("useradd alice")
    before = droplet.sh("getent passwd alice; getent group alice; " + CHECKSUM)
    res = droplet.fab("-H", droplet.name, "deploy", env={"FABRIC_APP_NAME": "alice"})
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_line(res)
    assert "account alice" in line and "app name" in line, line
    assert droplet.sh("getent passwd alice; getent group alice; " + CHECKSUM) == before
