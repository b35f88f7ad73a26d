"""Built-in checks of HTTPS (app.tls), from the host itself to its own address (hostname -I's first) as a
visitor would come: over 127.0.0.1, nginx would not redirect (provision's own checks use HTTP there)."""

import json

import pytest

DAYS_LEFT = 20  # certbot.timer renews 30 days before expiry: fewer means renewals fail

PROBE = r"""
import json, os, socket, ssl, sys, tempfile, time
address, name, kind = sys.argv[1:4]
if kind == "certificate":
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the dates and names are checked here
    with socket.create_connection((address, 443), timeout=10) as s, ctx.wrap_socket(s, server_hostname=name) as t:
        der = t.getpeercert(True)
    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, ssl.DER_cert_to_PEM_cert(der).encode())
        os.close(fd)
        cert = ssl._ssl._test_decode_cert(path)
    finally:
        os.unlink(path)
    print(json.dumps({"names": sorted(v.lower() for k, v in cert.get("subjectAltName", ()) if k == "DNS"),
                      "days": (ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()) / 86400}))
else:
    with socket.create_connection((address, 80), timeout=10) as s:
        s.sendall(("GET /provision-check?tls=1 HTTP/1.0\r\nHost: %s\r\n\r\n" % name).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    print(json.dumps({"status": int(lines[0].split()[1]), "location": headers.get("location", "")}))
"""


@pytest.fixture
def tls(app):
    if not app["tls"]:
        pytest.skip("app.tls is off")
    return app


def probe(host, app, kind) -> dict:
    address = host.check_output("hostname -I").split()[0]
    res = host.run("python3 -c %s %s %s %s", PROBE, address, app["server_name"].split()[0], kind)
    assert res.rc == 0, res.stderr
    return json.loads(res.stdout)


def test_certificate_covers_server_name_for_more_than_20_days(host, tls):
    cert = probe(host, tls, "certificate")
    names = sorted({n.lower() for n in tls["server_name"].split()})
    assert cert["names"] == names, f"the certificate names {cert['names']}, not {names}"
    assert cert["days"] > DAYS_LEFT, (f"the certificate expires in {cert['days']:.1f} days; see "
                                      "`journalctl -u certbot.service` on the host")


def test_http_redirects_to_https(host, tls):
    answer = probe(host, tls, "redirect")
    name = tls["server_name"].split()[0]
    assert answer == {"status": 301, "location": f"https://{name}/provision-check?tls=1"}
