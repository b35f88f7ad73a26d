"""HTTPS with a real ACME CA: pebble on the sandbox bridge (its DNS, pebble-challtestsrv, names the
droplet), reached by the droplet's certbot through the droplet's proxy. Order matters: one droplet.

Every request goes to the droplet's address (10.231.0.x) or to pebble on the bridge address."""

import json
import socket
import ssl
import threading
import time
import urllib.request

import pytest

from provision.layout import CERTBOT_PROXY_ENV

from .conftest import Host, check_outcomes

pytestmark = pytest.mark.integration

APP = '''def app(environ, start_response):
    headers = [("Content-Type", "text/plain")]
    if environ["PATH_INFO"] == "/own":  # the app's own header wins over the kit's
        headers.append(("X-Frame-Options", "DENY"))
    start_response("200 OK", headers)
    return [b"hello over " + environ.get("HTTP_X_FORWARDED_PROTO", "?").encode() + b"\\n"]
'''
SECURITY = {"x-content-type-options": "nosniff", "referrer-policy": "strict-origin-when-cross-origin",
            "x-frame-options": "SAMEORIGIN"}
HSTS = "max-age=31536000"
LOAD_CLIENTS, LOAD_MAX, LOAD_SECONDS = 4, 1500, 60  # the renewal's load: bounded in requests and time


@pytest.fixture(scope="module")
def acme(sandbox):
    """pebble and its DNS, started for this module and stopped by PID after it."""
    yield sandbox.ensure_acme()
    sandbox.stop_acme()


@pytest.fixture(scope="module")
def site(droplet, sandbox, acme, tmp_path_factory):
    """The droplet, named in pebble's DNS, trusting pebble's listener (ca_bundle); the app's settings
    (tls on, against pebble) and pebble's root, the only CA the checks from here trust."""
    d = tmp_path_factory.mktemp("tls")
    name = f"{droplet.name}.tls.test"
    sandbox.acme_name(name, droplet.address)
    (d / "ca.pem").write_text(sandbox.extra_ca().read_text() + acme.listener_cert.read_text())
    inventory = d / "inventory.ini"
    inventory.write_text(sandbox.inventory().replace(f"ca_bundle={sandbox.extra_ca()}", f"ca_bundle={d / 'ca.pem'}"))
    ctx = ssl.create_default_context(cafile=str(acme.listener_cert))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    (d / "root.pem").write_bytes(opener.open(acme.roots, timeout=10).read())
    app = d / "app"
    (app / "staticfiles").mkdir(parents=True)
    (app / "app.py").write_text(APP)
    (app / "requirements.txt").write_text("")
    (app / "staticfiles/site.css").write_text("body {}\n")
    env = {"FABRIC_APP_SOURCE": str(app), "FABRIC_APP_TLS": "true", "FABRIC_APP_SERVER_NAME": name,
           "FABRIC_APP_ACME_DIRECTORY": acme.directory, "FABRIC_APP_ACME_EMAIL": "ops@example.com",
           "FABRIC_APP_STATIC": json.dumps({"/static/": "staticfiles"})}
    return Host(droplet.droplet, sandbox, inventory), name, env, d / "root.pem"


def https(address: str, name: str, root, path: str = "/") -> tuple[int, dict, bytes, dict]:
    """GET https://NAME/PATH from the droplet's address, trusting only ``root``: (status, headers
    (lower-case names, each with its values), body, the certificate)."""
    ctx = ssl.create_default_context(cafile=str(root))
    with socket.create_connection((address, 443), timeout=10) as s, ctx.wrap_socket(s, server_hostname=name) as t:
        t.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
        data = b""
        while chunk := t.recv(65536):
            data += chunk
        cert = t.getpeercert()
    return (*parse(data), cert)


def http(address: str, name: str, path: str = "/") -> tuple[int, dict, bytes]:
    with socket.create_connection((address, 80), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return parse(data)


def parse(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return int(lines[0].split()[1]), headers, body


def assert_secure_headers(headers: dict, hsts: bool, what: str) -> None:
    for k, v in SECURITY.items():
        assert headers.get(k) == [v], f"{what}: {k} {headers.get(k)}"
    assert headers.get("strict-transport-security") == ([HSTS] if hsts else None), what
    assert headers.get("server") == ["nginx"], f"{what}: {headers.get('server')}"


def test_first_deploy_gets_a_certificate_and_serves_https(site):
    host, name, env, root = site
    start = time.monotonic()
    res = host.fab("-H", host.name, "deploy", env=env)
    took = time.monotonic() - start
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"first TLS deploy: {took:.1f}s")
    assert f"{host.name}: changed certificate {name} (get from " in res.stdout
    assert f"{host.name}: changed https /etc/nginx/sites-available/hello (enable)" in res.stdout
    status, headers, body, cert = https(host.address, name, root)  # verified against pebble's root alone
    assert (status, body) == (200, b"hello over https\n")
    assert ("DNS", name) in cert["subjectAltName"]
    assert_secure_headers(headers, hsts=True, what="the app over https")
    assert "x-provision-upstream" not in headers  # for the host itself only


def test_http_redirects_to_https_but_the_challenges_and_the_hosts_own_checks(site):
    host, name, env, root = site
    status, headers, _ = http(host.address, name, "/some/path?q=1")
    assert (status, headers["location"]) == (301, [f"https://{name}/some/path?q=1"])
    assert_secure_headers(headers, hsts=False, what="the redirect")
    status, headers, body = http(host.address, name, "/.well-known/acme-challenge/none")
    assert status == 404 and b"nginx" in body and b"nginx/" not in body  # nginx's page, no version
    assert_secure_headers(headers, hsts=False, what="a challenge's 404")
    # the host's own requests over HTTP reach the app (health checks, the switch)
    probe = "import urllib.request as u; print(u.build_opener(u.ProxyHandler({})).open(u.Request(" \
            f"'http://127.0.0.1/', headers={{'Host': '{name}'}})).read().decode(), end='')"
    assert host.sh(f"python3 -c \"{probe}\"") == "hello over http\n"
    # certbot's webroot is root's: the app cannot plant a challenge answer, nor anything nginx serves
    assert host.sh("stat -c '%U %a' /var/lib/provision /var/lib/provision/acme").split() == ["root", "755"] * 2


def test_every_kind_of_response_has_the_security_headers_and_no_version(site):
    host, name, env, root = site
    status, headers, body, _ = https(host.address, name, root, "/static/site.css")
    assert (status, body) == (200, b"body {}\n")
    assert_secure_headers(headers, hsts=True, what="a static file")
    assert headers["cache-control"] == ["public, max-age=300"]
    status, headers, body, _ = https(host.address, name, root, "/static/missing.css")
    assert status == 404 and b"nginx/" not in body
    assert_secure_headers(headers, hsts=True, what="a missing static file")
    status, headers, _, _ = https(host.address, name, root, "/own")
    assert status == 200 and headers["x-frame-options"] == ["DENY"]  # the app's own, alone
    res = host.fab("-H", host.name, "maintenance.on", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        status, headers, body, _ = https(host.address, name, root)
        assert status == 503 and headers["cache-control"] == ["no-store"]
        assert_secure_headers(headers, hsts=True, what="the maintenance page")
        status, headers, _ = http(host.address, name, "/")
        assert status == 301  # to HTTPS first, in maintenance too
    finally:
        res = host.fab("-H", host.name, "maintenance.off", env=env)
        assert res.returncode == 0, res.stdout + res.stderr


def test_second_deploy_changes_nothing_and_does_not_call_certbot(site, tmp_path):
    host, name, env, root = site
    before = host.sh("stat -c '%n %Y' /etc/letsencrypt/live/hello/* /etc/nginx/sites-available/hello; "
                     "ls /etc/letsencrypt/archive/hello")
    res = host.fab("-H", host.name, "deploy", "-v", "--json", str(tmp_path / "summary.json"), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    [summary] = json.loads((tmp_path / "summary.json").read_text())
    assert summary == dict(summary, changed=0, failed=False, round_trips=1, changed_steps=[])
    assert f"{host.name}: ok      certificate {name}\n" in res.stdout and "certbot certonly" not in res.stdout
    assert host.sh("stat -c '%n %Y' /etc/letsencrypt/live/hello/* /etc/nginx/sites-available/hello; "
                   "ls /etc/letsencrypt/archive/hello") == before


def test_fab_check_passes_with_the_tls_checks(site):
    host, name, env, root = site
    res = host.fab("-H", host.name, "check", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    for check in ("test_certificate_covers_server_name_for_more_than_20_days", "test_http_redirects_to_https"):
        assert f"provision/checks/test_tls.py::{check}[{host.name}] PASSED" in res.stdout, res.stdout
    outcomes = check_outcomes(res.stdout)  # the smoke and sandboxing checks passed too; only bootstrap's skip
    assert len(outcomes["PASSED"]) >= 10 and not outcomes.keys() - {"PASSED", "SKIPPED"}, res.stdout


def test_a_renewal_under_load_loses_no_request(site):
    """certbot.timer's service renews (made due by the renewal config) while clients keep asking:
    the deploy hook reloads nginx gracefully, and every request gets its answer."""
    host, name, env, root = site
    old = https(host.address, name, root)[3]["serialNumber"]
    host.sh("sed -i 's/^#* *renew_before_expiry.*/renew_before_expiry = 3650 days/' /etc/letsencrypt/renewal/hello.conf")
    ok, failures, serials, stop = [0], [], set(), threading.Event()

    def client():
        for _ in range(LOAD_MAX):
            if stop.is_set():
                return
            try:
                status, _, body, cert = https(host.address, name, root)
                serials.add(cert["serialNumber"])
                if (status, body) == (200, b"hello over https\n"):
                    ok[0] += 1
                else:
                    failures.append(status)
            except OSError as e:
                failures.append(repr(e))

    clients = [threading.Thread(target=client) for _ in range(LOAD_CLIENTS)]
    for c in clients:
        c.start()
    try:
        time.sleep(1)
        start = time.monotonic()
        host.sh("systemctl start certbot.service")  # a oneshot: returns once certbot (and its hook) is done
        renewal = time.monotonic() - start
        deadline = time.monotonic() + LOAD_SECONDS
        while len(serials) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for c in clients:
            c.join(30)
    print(f"renewal under load: {renewal:.1f}s, {ok[0]} requests answered, {len(failures)} failed")
    assert failures == [] and ok[0] > 0
    new = https(host.address, name, root)[3]["serialNumber"]
    assert new != old and serials == {old, new}, "the renewed certificate is not served"
    assert CERTBOT_PROXY_ENV in host.sh("systemctl show -p EnvironmentFiles certbot.service")  # through the proxy
    res = host.fab("-H", host.name, "deploy", env=env)  # the renewed certificate is the deploy's too
    assert res.returncode == 0 and f"{host.name}: no changes" in res.stdout, res.stdout + res.stderr
