"""The app's nginx site beside the other sites enabled on the host: clashes are refused while
planning."""

from pathlib import Path

import pytest

from provision import config as cfg
from provision.app import rendered
from provision.errors import ProvisionError
from provision.nginx import Site
from provision.steps import Facts

ROOT = Path(__file__).resolve().parents[2]
UNMANAGED = """# written by hand
server {
    listen 80 default_server;  # the old catch-all
    server_name _;
    root /var/www/html;
}
"""


def site(name: str, server_name: str = "_") -> str:
    """The site provision writes for an app, from the real template."""
    s = cfg.build(cfg.layer(dict(cfg.DEFAULTS), {}, {}, {"name": name, "server_name": server_name}), ROOT)
    return rendered(s, "nginx-site.conf.j2").decode()


def plan_beside(enabled: dict, server_name: str = "_"):
    step = Site("second", site("second", server_name).encode())
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

