"""The app's nginx site beside the other sites enabled on the host: clashes are refused while
planning; a site nginx refuses is put back, by a real local bash with a fake nginx on PATH."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from provision import config as cfg
from provision import remote
from provision.app import rendered
from provision.errors import ProvisionError
from provision.layout import Layout
from provision.nginx import Site
from provision.script import build_script, parse_report
from provision.facts import Facts
from provision.steps import Planned

ROOT = Path(__file__).resolve().parents[2]
FACTS_PY = remote.source("facts.py")
UNMANAGED = """# written by hand
server {
    listen 80 default_server;  # the old catch-all
    server_name _;
    root /var/www/html;
}
"""


def site(name: str, server_name: str = "_") -> str:
    """The site provision writes for an app, from the real template."""
    s = cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, {"name": name, "server_name": server_name}), ROOT)
    return rendered(s, "nginx-site.conf.j2").decode()


def plan_beside(enabled: dict, server_name: str = "_"):
    step = Site(Layout("second"), site("second", server_name).encode())
    return step.plan(Facts({("file", step.path): None, ("file", step.link): None,
                            ("files", "/etc/nginx/sites-enabled"): enabled}), set())


def test_a_second_default_server_is_refused_naming_the_other_app():
    with pytest.raises(ProvisionError) as e:
        plan_beside({"hello": site("hello")})
    assert str(e.value) == ("app second and app hello (/etc/nginx/sites-enabled/hello) are both nginx's default "
                            "server for port 80; give one of them a server_name (app.server_name)")


def test_a_server_name_another_site_serves_on_the_same_port_is_refused():
    with pytest.raises(ProvisionError, match=r"^app second and app hello \(/etc/nginx/sites-enabled/hello\) both "
                                             r"serve www.example.com on port 80; give one of them another server_name"):
        plan_beside({"hello": site("hello", "example.com WWW.example.com")}, "www.example.com")


def test_a_site_provision_did_not_write_counts_too():
    with pytest.raises(ProvisionError, match=r"^app second and /etc/nginx/sites-enabled/legacy \(not deployed by "
                                             r"provision\) are both nginx's default server for port 80"):
        plan_beside({"legacy": UNMANAGED})


def test_sites_that_can_serve_together_are_enabled():
    enabled = {
        "hello": site("hello"),  # the default server; second has a name of its own
        "other-port": UNMANAGED.replace("listen 80", "listen [::]:8080")
        + "server { server_name second.test; listen 127.0.0.1:8080; }\n",
        "commented": "server {\n    listen 80;\n    server_name old.test;  # server_name second.test;\n}\n",
        "second": site("second"),  # its own old version
        "default": UNMANAGED,  # Debian's welcome site: removed before this step
        "dangling": None,
    }
    change = plan_beside(enabled, "second.test")
    assert change.summary == "create, enable"
    with pytest.raises(ProvisionError, match="/commented .* both serve second.test on port 80"):
        plan_beside(dict(enabled, commented=enabled["commented"].replace("# server_name", "server_name")), "second.test")


# -- applying, by a real bash on this machine ---------------------------------
NGINX = """#!/bin/bash
# the fake nginx: refuses an unknown directive in any enabled site
if grep -ls no_such_directive "$CONF"/sites-enabled/*; then
  echo 'nginx: [emerg] unknown directive "no_such_directive"' >&2; exit 1
fi
"""


@pytest.fixture
def conf(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nginx", NGINX), ("chown", "#!/bin/sh\n")):  # chown: these tests need not be root
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    conf = tmp_path / "nginx"
    (conf / "sites-available").mkdir(parents=True)
    (conf / "sites-enabled").mkdir()
    return conf


def apply(conf: Path, content: str):
    """Gather the facts of a Site with the real fact gatherer, plan it and run its change."""
    step = Site(Layout("second", nginx_dir=str(conf)), content.encode())
    keys = step.facts()
    gathered = subprocess.run([sys.executable, "-c", FACTS_PY, json.dumps(keys)], capture_output=True, text=True,
                              check=True)
    facts = Facts({tuple(k): v for k, v in zip(keys, json.loads(gathered.stdout)["facts"])})
    script = build_script([Planned(step, step.plan(facts, set()))])
    script = script.replace("export LC_ALL=C PATH=", f"export LC_ALL=C PATH={conf.parent / 'bin'}:", 1)
    res = subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, CONF=str(conf)))
    return res.returncode, parse_report(res.stdout)


def listing(conf: Path) -> dict:
    out = {}
    for d in ("sites-available", "sites-enabled"):
        for p in sorted((conf / d).iterdir()):
            out[f"{d}/{p.name}"] = os.readlink(p) if p.is_symlink() else p.read_text()
    return out


def test_a_site_nginx_accepts_is_written_and_enabled(conf):
    rc, report = apply(conf, "server { server_name second.test; }\n")
    assert rc == 0, report.output
    assert listing(conf) == {"sites-available/second": "server { server_name second.test; }\n",
                             "sites-enabled/second": str(conf / "sites-available/second")}


def test_a_changed_site_nginx_refuses_is_put_back(conf):
    (conf / "sites-available/second").write_text("server { server_name second.test; }\n")
    (conf / "sites-enabled/second").symlink_to("../sites-available/second")  # a link of another spelling
    before = listing(conf)
    rc, report = apply(conf, "server { no_such_directive on; }\n")
    assert rc == 1
    assert 'unknown directive "no_such_directive"' in report.output  # nginx's own message
    assert listing(conf) == before  # nothing left behind either


def test_a_new_site_nginx_refuses_is_removed(conf):
    rc, report = apply(conf, "server { no_such_directive on; }\n")
    assert rc == 1 and 'unknown directive "no_such_directive"' in report.output
    assert listing(conf) == {}
