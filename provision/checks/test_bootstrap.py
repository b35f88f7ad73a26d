"""Built-in checks of a host `fab bootstrap` made safe. They apply where its marker is (written
last by a bootstrap that succeeded); any other host skips them, saying so."""

import json

import pytest

from provision.bootstrap import HARDENED, WEB_PORTS, open_ports_of, sshd_match
from provision.layout import BOOTSTRAP_MARKER, FIREWALL_TABLE, FIREWALL_UNIT, UPGRADES_TIMER


@pytest.fixture
def bootstrapped(host) -> dict:
    marker = host.file(BOOTSTRAP_MARKER)
    if not marker.exists:
        pytest.skip(f"not bootstrapped (no {BOOTSTRAP_MARKER}): `fab bootstrap` makes a host safe")
    return json.loads(marker.content_string)


def sshd_config(host, user: str = "") -> dict[str, list[str]]:
    """sshd's effective config (`sshd -T`; with ``user``, for a login as that user: its Match blocks
    applied): each key's values."""
    out: dict[str, list[str]] = {}
    for line in host.check_output("sshd -T" + (f" -C {sshd_match(user)}" if user else "")).splitlines():
        key, _, value = line.partition(" ")
        out.setdefault(key.lower(), []).append(value)
    return out


def test_sshd_refuses_root_and_password_logins(host, bootstrapped):
    for user in ("root", bootstrapped["deploy_user"]):  # a Match block may set them again
        config = sshd_config(host, user)
        wrong = {k: config.get(k.lower()) for k, v in HARDENED if config.get(k.lower()) != [v]}
        assert not wrong, f"sshd -T -C {sshd_match(user)} has {wrong}: fab bootstrap again"


def test_firewall_active_letting_in_only_the_expected_ports(host, app, bootstrapped):
    unit = host.service(FIREWALL_UNIT)
    assert unit.is_enabled and unit.is_running, FIREWALL_UNIT
    policy, ports = open_ports_of(json.loads(host.check_output(f"nft -j list table {FIREWALL_TABLE}")))
    assert policy == "drop"
    ssh = {int(p) for p in sshd_config(host).get("port", [])} | set(bootstrapped["ssh_ports"])
    expected = {f"{p}/tcp" for p in ssh | set(WEB_PORTS)} | set(app["open_ports"])
    assert ports == expected, f"the firewall lets in {sorted(ports)}, expected {sorted(expected)}: fab bootstrap again"


def test_unattended_upgrades_enabled(host, app, bootstrapped):
    if not app["unattended_upgrades"]:
        pytest.skip("unattended_upgrades is false: provision leaves upgrades as the host has them")
    assert host.package("unattended-upgrades").is_installed
    values = host.check_output("apt-config shell U APT::Periodic::Unattended-Upgrade L "
                               "APT::Periodic::Update-Package-Lists")
    assert values.split() == ["U='1'", "L='1'"], values
    assert host.service(UPGRADES_TIMER).is_enabled
