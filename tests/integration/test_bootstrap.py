"""`fab -H root@ADDRESS bootstrap` on a root-only droplet: failures put the host back and keep it
reachable, then a bootstrap that succeeds (root and password logins refused, the deploy user in,
a firewall), a re-run that changes nothing, a deploy and `fab check` as the deploy user, and a
firewall change nobody confirms undone by the timer on the host. Order matters: one droplet.

Traffic goes to the droplet's own address only; every wait is bounded."""

import base64
import re
import socket
import time
import urllib.request

import paramiko
import pytest

from provision import bootstrap as boot
from provision import config as cfg
from provision.cli.bootstrap import Bootstrap, operator_keys
from provision.errors import AuthFailed, ProvisionError, Unreachable
from provision.hosts import Job
from provision.inventory import Target
from provision.output import Printer
from provision.runner import run_steps
from provision.ssh import connect

from .conftest import ROOT, check_outcomes

pytestmark = pytest.mark.integration

TIMES: dict[str, float] = {}


def login(droplet, user: str):
    return connect(droplet.address, user, 22, str(droplet.sandbox.key), str(droplet.sandbox.known_hosts))


def as_deploy(droplet, command: str) -> str:
    remote = login(droplet, "deploy")
    try:
        rc, out, err = remote.exec(f"sudo -n {command}", timeout=60)
    finally:
        remote.close()
    assert rc == 0, f"`{command}` as deploy failed ({rc}): {err}"
    return out


def bootstrap(droplet, *args: str):
    t0 = time.monotonic()
    res = droplet.fab("-H", f"root@{droplet.address}", "bootstrap", *args)
    return res, time.monotonic() - t0


def untouched(droplet) -> None:
    """What a failed bootstrap leaves: no deploy user, none of its files, root still logs in."""
    rc, _, _ = droplet.run("id deploy")
    assert rc != 0, "the deploy user was left behind"
    assert droplet.sh(f"ls {boot.SSHD_DROPIN} {boot.SUDOERS_FILE} 2>/dev/null || true") == ""
    assert droplet.sh("sshd -T | grep -E '^(permitrootlogin|passwordauthentication) '") == \
        "permitrootlogin without-password\npasswordauthentication yes\n"  # Debian's defaults


def test_a_broken_sshd_config_puts_everything_back_and_root_still_logs_in(droplet):
    droplet.sh("echo 'NoSuchOption yes' > /etc/ssh/sshd_config.d/10-broken.conf")
    try:
        res, _ = bootstrap(droplet)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "FAILED  sshd config" in res.stdout and "Bad configuration option" in res.stdout, res.stdout
        [line] = res.stderr.strip().splitlines()
        assert "sshd's config did not pass" in line and "the host is as it was before" in line, line
        assert "Traceback" not in res.stderr
    finally:
        droplet.sh("rm -f /etc/ssh/sshd_config.d/10-broken.conf")
    untouched(droplet)


def test_a_login_refused_after_sshd_reloads_puts_everything_back(droplet):
    # valid, and not loaded yet: sshd reads it when bootstrap reloads it, and then refuses deploy
    droplet.sh("echo 'DenyUsers deploy' > /etc/ssh/sshd_config.d/10-deny.conf")
    try:
        res, _ = bootstrap(droplet)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "ok      a fresh login as deploy has sudo" in res.stdout  # before root's login went
        [line] = res.stderr.strip().splitlines()
        assert "after sshd reloaded, a fresh login as deploy with sudo failed" in line, line
        assert "the host is as it was before" in line, line
    finally:
        droplet.sh("rm -f /etc/ssh/sshd_config.d/10-deny.conf && systemctl reload ssh")
    logs_in_again(droplet)
    untouched(droplet)


def test_a_match_block_letting_root_in_is_seen_and_everything_put_back(droplet):
    """`sshd -T` without -C does not apply Match blocks: this one would undo the drop-in for root."""
    droplet.sh("cp /etc/ssh/sshd_config /etc/ssh/sshd_config.bt && printf 'Match User root\\n    PermitRootLogin yes\\n'"
               " >> /etc/ssh/sshd_config")
    try:
        res, _ = bootstrap(droplet)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "sshd would still use permitrootlogin yes for root" in res.stdout, res.stdout
        [line] = res.stderr.strip().splitlines()
        assert "sshd's config did not pass" in line and "the host is as it was before" in line, line
    finally:
        droplet.sh("mv -f /etc/ssh/sshd_config.bt /etc/ssh/sshd_config")
    untouched(droplet)


def test_bootstrap_turns_root_and_passwords_off_and_lets_deploy_in(droplet):
    res, TIMES["fresh"] = bootstrap(droplet)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "ok      a fresh login as deploy has sudo" in out
    assert "ok      after sshd reloaded, a fresh login as deploy has sudo" in out
    assert "ok      after sshd reloaded, a fresh login as root is refused" in out
    assert "ok      a fresh login through the firewall confirmed it" in out
    assert f"host={droplet.address} user=deploy key=" in out  # the inventory line to use
    with pytest.raises(AuthFailed):
        login(droplet, "root").close()
    assert as_deploy(droplet, "id -u") == "0\n"
    as_deploy(droplet, "sh -c 'echo deploy:pw-for-a-test | chpasswd'")
    transport = paramiko.Transport((droplet.address, 22))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as e:  # not even offered
            transport.auth_password("deploy", "pw-for-a-test")
        assert e.value.allowed_types == ["publickey"]
    finally:
        transport.close()
    assert boot.FIREWALL_REVERT not in as_deploy(droplet, "systemctl list-timers --all --no-legend")


def test_a_second_bootstrap_as_root_goes_on_as_deploy_and_changes_nothing(droplet):
    res, TIMES["re-run"] = bootstrap(droplet, "-v")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "root's login is refused (bootstrapped already): going on as deploy" in res.stdout
    assert "no changes, nothing restarted" in res.stdout
    assert ": changed " not in res.stdout
    print(f"bootstrap: fresh {TIMES.get('fresh', 0):.1f}s, re-run {TIMES['re-run']:.1f}s")


def logs_in_again(droplet, seconds: float = 15) -> None:
    """Returns once root logs in over SSH again: sshd re-executes itself on reload, and a TCP
    connection accepted just before that is reset before its banner (seen under load)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            droplet.run("true")
            return
        except Unreachable:
            assert time.monotonic() < deadline, "root cannot log in again after sshd reloaded"
            time.sleep(0.2)


def reachable(address: str, port: int, timeout: float = 3) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def test_only_ssh_80_443_and_open_ports_are_let_in(droplet):
    for port in (443, 8081):
        as_deploy(droplet, f"systemd-run --unit=bt-listen-{port} python3 -m http.server {port}")
    try:
        deadline = time.monotonic() + 10
        while not as_deploy(droplet, "ss -Htln 'sport = :8081'").strip():
            assert time.monotonic() < deadline, "the test listener did not start"
            time.sleep(0.2)
        assert as_deploy(droplet, "python3 -c \"import urllib.request as u; print(u.urlopen("
                                  "'http://127.0.0.1:8081/', timeout=5).status)\"") == "200\n"  # it listens
        assert reachable(droplet.address, 443)
        assert not reachable(droplet.address, 8081)  # dropped: the connection times out
    finally:
        for port in (443, 8081):
            as_deploy(droplet, f"systemctl stop bt-listen-{port}")


def write_inventory(droplet, tmp_path, **extra: str):
    sb = droplet.sandbox
    inv = tmp_path / "inventory.ini"
    inv.write_text(f"[boot]\n{droplet.name} host={droplet.address} user=deploy key={sb.key}"
                   + "".join(f" {k}={v}" for k, v in extra.items())
                   + f"\n[boot:vars]\nknown_hosts={sb.known_hosts}\nproxy={sb.proxy_url}\nca_bundle={sb.extra_ca()}\n")
    return {"FABRIC_INVENTORY": str(inv)}


PROTOCOLS = "/etc/protocols"


def like_a_real_host(droplet) -> None:
    """Debian's /etc/protocols (netbase, on every real host; not on a minbase droplet, and this
    machine's is netbase's): with it, `nft -j` names the protocols it prints by number without."""
    with open(PROTOCOLS, "rb") as fh:
        data = base64.b64encode(fh.read()).decode()
    as_deploy(droplet, f"sh -c 'test -s {PROTOCOLS} || echo {data} | base64 -d > {PROTOCOLS}'")
    assert '"ipv6-icmp"' in as_deploy(droplet, f"nft -j list table {boot.FIREWALL_TABLE}")


def test_deploy_and_check_as_the_deploy_user(droplet, tmp_path):
    like_a_real_host(droplet)
    env = write_inventory(droplet, tmp_path)
    res = droplet.fab("-H", droplet.name, "deploy", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{droplet.address}/", timeout=10) as r:  # port 80 through the firewall
        assert r.read().decode() == "Hello from provision!\n"
    check = droplet.fab("-H", droplet.name, "check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    outcomes = check_outcomes(check.stdout)
    assert {"test_sshd_refuses_root_and_password_logins", "test_firewall_active_letting_in_only_the_expected_ports",
            "test_unattended_upgrades_enabled", "test_every_unit_of_the_app_is_sandboxed"} <= outcomes["PASSED"]
    assert not outcomes.keys() - {"PASSED", "SKIPPED"}, check.stdout


def test_check_fails_when_the_firewall_lets_in_a_port_not_listed(droplet, tmp_path):
    env = write_inventory(droplet, tmp_path, open_ports="8081")
    check = droplet.fab("-H", droplet.name, "check", env=env)
    assert check.returncode != 0
    assert "FAILED provision/checks/test_bootstrap.py::test_firewall_active" in check.stdout, check.stdout
    res = droplet.fab("-H", droplet.name, "bootstrap", env=env)  # lets it in
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tcp dport { 22, 80, 443, 8081 } accept" in as_deploy(droplet, f"nft list table {boot.FIREWALL_TABLE}")
    assert droplet.fab("-H", droplet.name, "check", env=env).returncode == 0
    res = droplet.fab("-H", droplet.name, "bootstrap", env=write_inventory(droplet, tmp_path))  # and out again
    assert res.returncode == 0, res.stdout + res.stderr


def job_for(droplet) -> Job:
    sb = droplet.sandbox
    settings = cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, {}), ROOT)
    return Job(Target(droplet.name, droplet.address, "deploy", 22, str(sb.key), str(sb.known_hosts)), settings)


def test_a_firewall_that_shuts_ssh_out_is_undone_at_once(droplet):
    """Through bootstrap's own path, with rules that let in port 80 only: the fresh login fails, the
    connection still open undoes it."""
    job = job_for(droplet)
    b = Bootstrap(job, None, Printer(), operator_keys(job))
    with pytest.raises(ProvisionError) as e:
        b.run(ports={"tcp": [80], "udp": []})
    b.remote.close()
    assert "a fresh login through the new firewall failed" in str(e.value) and "the firewall is undone" in str(e.value)
    assert as_deploy(droplet, f"nft list table {boot.FIREWALL_TABLE}").count("dport { 22, 80, 443 }") == 1


def test_a_firewall_change_nobody_confirms_is_undone_by_the_timer(droplet):
    """Rules that shut SSH out, loaded with the pending revert armed, and no confirmation (the
    client went away): SSH comes back by itself, with the rules confirmed before."""
    remote = login(droplet, "deploy")
    try:
        steps = boot.firewall_steps(job_for(droplet).settings, (22,), seconds=20, ports={"tcp": [80], "udp": []})
        r = run_steps(remote, steps, printer=Printer())
        assert not r.error, r.error
        # the connection still open (established) sees the revert pending
        rc, timers, err = remote.exec("sudo -n systemctl list-timers --all --no-legend", timeout=30)
        assert rc == 0 and f"{boot.FIREWALL_REVERT}.timer" in timers, timers + err
        rc, table, _ = remote.exec(f"sudo -n nft list table {boot.FIREWALL_TABLE}", timeout=30)
        assert "tcp dport 80 accept" in table, table
    finally:
        remote.close()
    t0 = time.monotonic()
    while not reachable(droplet.address, 22, timeout=1):  # shut out until the timer fires
        assert time.monotonic() - t0 < 60, "the revert timer did not fire"
        time.sleep(0.5)
    table = as_deploy(droplet, f"nft list table {boot.FIREWALL_TABLE}")
    assert "tcp dport 80 accept" not in table and table.count("dport { 22, 80, 443 }") == 1, table
    assert re.search(r"no changes", droplet.fab("-H", f"root@{droplet.address}", "bootstrap").stdout)
