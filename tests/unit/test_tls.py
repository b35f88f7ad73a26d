"""HTTPS (app.tls), nginx's headers and server_tokens: settings, the rendered site with and without a
certificate, and the first deploy and the next ones as planned from the certificate's fact."""

import base64
import hashlib
import json
import re
import shlex
import subprocess
import time

import pytest

from provision import remote
from provision.app import Deploy, rendered
from provision.errors import ProvisionError
from provision.layout import (ACME_WEBROOT, CERTBOT_DROPIN, CERTBOT_PROXY_ENV, CERTBOT_RELOAD_HOOK, Layout)
from provision.nginx import servers
from provision.source import scan
from provision.steps import plan
from provision.tls import certificate_fact

from .test_app import fresh_facts, settings

NAME = "example.com"
LET = "https://acme-v02.api.letsencrypt.org/directory"
SECURITY = ("X-Content-Type-Options", "Referrer-Policy", "X-Frame-Options")


def tls(**over):
    return settings(**{"tls": True, "server_name": f"{NAME} www.{NAME}", **over})


# -- settings


@pytest.mark.parametrize("server_name, why", [
    ("_", "not _ (any name)"),
    ("10.0.0.5", "10.0.0.5 is an IP address"),
    ("example.com 10.0.0.5", "10.0.0.5 is an IP address"),
    ("*.example.com example.com", "*.example.com is a wildcard"),
    (".example.com", ".example.com is a wildcard"),
])
def test_tls_needs_host_names_and_says_which_fix(server_name, why):
    with pytest.raises(ProvisionError) as e:
        settings(tls=True, server_name=server_name)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"invalid setting app.server_name={server_name!r}: ")
    assert why in msg and "(e.g. server_name: example.com www.example.com)" in msg
    assert settings(tls=False, server_name=server_name).tls is False  # without tls, any server_name


@pytest.mark.parametrize("key, value, expected", [
    ("acme_directory", "http://ca.example/dir", "expected the https:// URL of an ACME CA's directory"),
    ("acme_email", "ops at example.com", "expected one e-mail address"),
    ("client_max_body_size", "10 MB", "expected an nginx size"),
    ("tls", "maybe", "expected true or false"),
])
def test_bad_tls_and_nginx_settings_are_one_line(key, value, expected):
    with pytest.raises(ProvisionError) as e:
        tls(**{key: value})
    assert str(e.value).startswith(f"invalid setting app.{key}=") and expected in str(e.value)


def test_defaults_are_lets_encrypt_no_email_and_10m():
    s = settings()
    assert (s.tls, s.acme_directory, s.acme_email, s.client_max_body_size) == (False, LET, "", "10m")
    assert "client_max_body_size 25m;" in rendered(settings(client_max_body_size="25m"), "nginx-site.conf.j2").decode()


# -- the rendered site


def site(s, https=None) -> str:
    return rendered(s, "nginx-site.conf.j2", https=https).decode()


def locations(text: str) -> dict[str, str]:
    """Each location block's text, by its name (the kit's template nests none)."""
    return {m.group(1).strip(): m.group(2) for m in re.finditer(r"\n    location ([^{]+)\{(.*?)\n    \}", text, re.S)}


def server_level(text: str) -> str:
    return re.sub(r"\n    location [^{]+\{.*?\n    \}", "", text.split("\nserver {", 1)[1], flags=re.S)


@pytest.mark.parametrize("s, https", [
    (settings(static={"/static/": "static"}), False),
    (tls(static={"/static/": "static"}), False),  # before the certificate
    (tls(static={"/static/": "static"}), True),
])
def test_every_response_gets_the_security_headers_and_no_version(s, https):
    text = site(s, https)
    assert "\n    server_tokens off;\n" in server_level(text)
    blocks = {"server": server_level(text), **{k: v for k, v in locations(text).items() if "add_header" in v}}
    # a location with an add_header of its own drops the server's: each repeats them
    assert set(blocks) >= {"server", "@provision_maintenance_hello", "@provision_maintenance_hello_default",
                           "/static/", "/"}
    for where, block in blocks.items():
        for header in SECURITY:
            assert re.search(rf"add_header {header} \$provision_\w+_hello always;", block), (where, header)
        assert ("Strict-Transport-Security" in block) == https, where
    # the app's own header wins: the kit's value only where the upstream sent none
    assert 'map $upstream_http_x_frame_options $provision_frame_hello {\n    "" "SAMEORIGIN";\n    default "";' in text
    if https:
        assert 'map $scheme$upstream_http_strict_transport_security $provision_hsts_hello {\n    https "max-age=31536000";' in text


def test_without_tls_the_site_has_no_https_nor_challenges():
    text = site(settings())
    assert "443" not in text and "acme-challenge" not in text and "return 301" not in text
    assert [sorted(sv.ports) for sv in servers(text)] == [["80"]]


def test_before_the_certificate_the_site_serves_the_challenges_over_http_only():
    text = site(tls(), https=False)
    assert "443" not in text and "ssl_certificate" not in text and "return 301" not in text
    assert locations(text)["^~ /.well-known/acme-challenge/"].strip().splitlines()[0] == f"root {ACME_WEBROOT};"
    # served in maintenance too (renewals must not fail then): the 503 comes after the exemption
    assert text.index("acme-challenge/\") {\n        set $provision_maintenance_hello \"\";") < text.index("return 503;")


def test_with_the_certificate_http_goes_to_https_but_challenges_and_the_hosts_own_requests():
    text = site(tls(), https=True)
    lay = Layout("hello")
    assert f"    ssl_certificate {lay.certificate};\n    ssl_certificate_key {lay.certificate_key};\n" in text
    assert [sorted(sv.ports) for sv in servers(text)] == [["443", "80"]]
    top = server_level(text)
    order = [top.index(s) for s in (
        'if ($scheme = http) {\n        set $provision_redirect_hello 1;',
        'if ($provision_local_hello) {\n        set $provision_redirect_hello "";',
        'if ($uri ~ "^/\\.well-known/acme-challenge/") {\n        set $provision_maintenance_hello "";\n'
        '        set $provision_redirect_hello "";',
        'if ($provision_redirect_hello) {\n        return 301 https://$host$request_uri;',
        'if ($provision_maintenance_hello) {\n        return 503;')]
    assert order == sorted(order)


# -- planning: the first deploy, and the next


def deploy_steps(s):
    src = scan(s.source)
    return Deploy(s, src, src.release_id(0)).steps(src.release_id(0))


def cert(names=(NAME, f"www.{NAME}"), server=LET):
    return {"names": sorted(names), "not_after": 2e9, "server": server}


def planned_changes(s, found=None):
    steps = deploy_steps(s)
    return {p.step.name: p.change for p in plan(steps, fresh_facts(steps, found)) if p.change}


def test_first_deploy_serves_the_challenges_gets_the_certificate_then_turns_https_on():
    s = tls(proxy="http://10.0.0.1:3128")
    steps = deploy_steps(s)
    planned = plan(steps, fresh_facts(steps))
    names = [p.step.name for p in planned if p.change]
    site_file = "/etc/nginx/sites-available/hello"
    order = [names.index(n) for n in (
        "packages python3-venv python3-pip-whl nginx certbot", f"directory {ACME_WEBROOT}", "service certbot.timer",
        f"file {site_file}", "service nginx", f"certificate {NAME}", f"https {site_file}", "health http://127.0.0.1/")]
    assert order == sorted(order)
    by = {p.step.name: p.change for p in planned}
    # nginx first loads the site without HTTPS (no certificate to load yet) ...
    first = next(c for c in by[f"file {site_file}"].commands if "base64 -d" in c)
    assert hashlib.sha256(rendered(s, "nginx-site.conf.j2", https=False)).hexdigest() in _written(first)
    # ... certbot answers the challenge from root's webroot, through the proxy the script exports ...
    [certbot] = by[f"certificate {NAME}"].commands
    assert shlex.split(certbot) == [
        "certbot", "certonly", "--non-interactive", "--agree-tos", "--register-unsafely-without-email",
        "--server", LET, "--webroot", "--webroot-path", ACME_WEBROOT, "--cert-name", "hello",
        "--domains", f"{NAME},www.{NAME}", "--force-renewal"]
    # ... then the site with HTTPS, tested by nginx (put back if refused), and a graceful reload
    https = by[f"https {site_file}"].commands
    assert hashlib.sha256(rendered(s, "nginx-site.conf.j2")).hexdigest() in _written(next(c for c in https if "base64 -d" in c))
    assert any("nginx -t -q 2>&1" in c and "mv" in c for c in https)
    assert https[-2] == "nginx -t -q" and json.loads(shlex.split(https[-1])[-1])["action"] == "reload"
    # renewals: the hook reloads nginx; certbot.service reaches the CA through the proxy, from a root-only file
    assert by[f"file {CERTBOT_RELOAD_HOOK}"].commands[-2] == f"chmod 755 {CERTBOT_RELOAD_HOOK}.provision-tmp"
    env = next(c for c in by[f"file {CERTBOT_PROXY_ENV}"].commands if "base64 -d" in c)
    assert "https_proxy=http://10.0.0.1:3128\n" in _written_text(env)
    assert f"chmod 600 {CERTBOT_PROXY_ENV}.provision-tmp" in by[f"file {CERTBOT_PROXY_ENV}"].commands
    assert f"EnvironmentFile={CERTBOT_PROXY_ENV}\n" in _written_text(
        next(c for c in by[f"file {CERTBOT_DROPIN}"].commands if "base64 -d" in c))


def _written_text(command: str) -> str:
    return base64.b64decode(command.split("\n", 1)[1].rsplit("__PROVISION_EOF__", 1)[0]).decode()


def _written(command: str) -> str:
    return hashlib.sha256(_written_text(command).encode()).hexdigest()


def test_with_the_certificate_a_deploy_writes_the_https_site_and_never_calls_certbot():
    s = tls()
    changes = planned_changes(s, {certificate_fact(s.layout): cert()})
    assert f"certificate {NAME}" not in changes and "https /etc/nginx/sites-available/hello" not in changes
    site_write = next(c for c in changes["file /etc/nginx/sites-available/hello"].commands if "base64 -d" in c)
    assert _written(site_write) == hashlib.sha256(rendered(s, "nginx-site.conf.j2")).hexdigest()
    assert not any("certbot certonly" in c for ch in changes.values() for c in ch.commands)


@pytest.mark.parametrize("have, why", [
    (cert(names=(NAME,)), "other names"),
    (cert(server="https://acme-staging-v02.api.letsencrypt.org/directory"), "another CA"),
])
def test_a_certificate_for_other_names_or_from_another_ca_is_replaced_and_reloaded(have, why):
    s = tls()
    change = planned_changes(s, {certificate_fact(s.layout): have})[f"certificate {NAME}"]
    assert change.summary == f"replace ({why}) for {NAME}, www.{NAME}"
    assert change.commands[0].startswith("certbot certonly ") and change.commands[-2] == "nginx -t -q"
    assert json.loads(shlex.split(change.commands[-1])[-1])["action"] == "reload"


def test_the_email_registers_the_account_and_no_proxy_means_no_dropin():
    s = tls(acme_email="ops@example.com")
    changes = planned_changes(s, {("file", CERTBOT_DROPIN): {"type": "file"}})
    assert "--email ops@example.com --no-eff-email" in changes[f"certificate {NAME}"].commands[0]
    assert changes[f"absent {CERTBOT_DROPIN}"].commands == [f"rm -rf {CERTBOT_DROPIN}"]
    assert changes["systemctl daemon-reload (certbot)"].commands == ["systemctl daemon-reload"]


def test_without_tls_no_certbot_nor_its_steps():
    names = [s.name for s in deploy_steps(settings())]
    assert not [n for n in names if "certbot" in n or "certificate" in n or n.startswith("https ")]


def test_the_certificate_fact_reads_a_lineage_on_the_host(tmp_path):
    """remote/facts.py's certificate fact, run here on a certificate made with openssl."""
    key, pem = tmp_path / "k.pem", tmp_path / "fullchain.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "90", "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME},DNS:WWW.{NAME}",
                    "-keyout", str(key), "-out", str(pem)], check=True, capture_output=True)
    conf = tmp_path / "hello.conf"
    conf.write_text(f"version = 2.1.0\n[renewalparams]\nserver = {LET}\nauthenticator = webroot\n")
    fact = ("certificate", json.dumps([str(pem), str(conf)]))
    missing = ("certificate", json.dumps([str(tmp_path / "none.pem"), str(conf)]))
    out = subprocess.run(remote.python("facts.py", [fact, missing]), shell=True, capture_output=True, text=True,
                         check=True).stdout
    got, none = json.loads(out)["facts"]
    assert none is None
    assert got["names"] == [NAME, f"www.{NAME}"] and got["server"] == LET
    assert 89 < (got["not_after"] - time.time()) / 86400 < 91
