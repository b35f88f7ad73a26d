import pytest

from provision.errors import ProvisionError
from provision.inventory import Inventory

TEXT = """
# comment
bastion host=198.51.100.9

[web]
web1 host=203.0.113.10 user=deploy key=~/.ssh/web workers=4
web2 host=203.0.113.11 port=2222

[db]
db1 host=203.0.113.20

[web:vars]
server_name=example.com
workers=2

[prod:children]
web
db

[prod:vars]
server_name=prod.example.com
proxy="http://proxy:3128"
"""


@pytest.fixture
def inv():
    return Inventory().parse(TEXT)


def test_alias_with_host_vars_over_group_vars(inv):
    [t] = inv.resolve("web1")
    assert (t.host, t.user, t.port, t.key) == ("203.0.113.10", "deploy", 22, "~/.ssh/web")
    assert t.vars == {"workers": "4", "server_name": "example.com", "proxy": "http://proxy:3128"}


def test_inner_group_vars_beat_parent_group_vars(inv):
    [t] = inv.resolve("web2")
    assert t.port == 2222 and t.vars["server_name"] == "example.com"
    [d] = inv.resolve("db1")
    assert d.vars["server_name"] == "prod.example.com"


def test_groups_children_and_comma_lists(inv):
    assert [t.alias for t in inv.resolve("prod")] == ["web1", "web2", "db1"]
    assert [t.alias for t in inv.resolve("db1, bastion")] == ["db1", "bastion"]
    assert [t.alias for t in inv.resolve("all")] == ["bastion", "web1", "web2", "db1"]


def test_direct_addresses(inv):
    [t] = inv.resolve("admin@192.0.2.7:2200")
    assert (t.user, t.host, t.port) == ("admin", "192.0.2.7", 2200)
    [t] = inv.resolve("deploy@203.0.113.10")  # a known address keeps its inventory vars
    assert t.alias == "web1" and t.user == "deploy" and t.vars["workers"] == "4"


@pytest.mark.parametrize("selection,message", [
    ("nosuch", "unknown host or group 'nosuch'"),
    ("", "no hosts selected"),
    ("web,web1", "selected twice"),
    ("root@1.2.3.4:99999", "out of range"),
])
def test_bad_selections(inv, selection, message):
    with pytest.raises(ProvisionError, match=message):
        inv.resolve(selection)


@pytest.mark.parametrize("item", ["web1.example.com\n", "deploy@web1.example.com\n", "web1.example.com:22\n"])
def test_addresses_match_whole(inv, item):
    with pytest.raises(ProvisionError, match="cannot read host"):
        inv._direct(item, "root", 22)


@pytest.mark.parametrize("port", [70000, 0, "abc"])
def test_default_port_is_checked(inv, port):
    with pytest.raises(ProvisionError, match="default port.*use a number from 1 to 65535"):
        inv.resolve("192.0.2.1", default_port=port)


@pytest.mark.parametrize("text,message", [
    ("[web\nweb1", "malformed section header"),
    ("[web:vars]\njust-a-word", "malformed variable"),
    ("web1 host=1.2.3.4 port=0", "out of range"),
    ("web1 'unclosed", "fix the quoting"),
    ("[web]\nweb1\nweb1", "listed twice"),
])
def test_malformed_inventory_names_the_line(text, message):
    with pytest.raises(ProvisionError, match=message) as e:
        Inventory().parse(text, "inv.ini")
    assert "inv.ini:" in str(e.value)


def test_group_loops_are_reported():
    inv = Inventory().parse("[a:children]\nb\n[b:children]\na\n")
    with pytest.raises(ProvisionError, match="contains itself"):
        inv.resolve("a")
