"""fab bootstrap's phases decide from recorded facts (no SSH), and its settings are validated locally."""

import json
import subprocess
from pathlib import Path

import pytest

from provision import bootstrap as boot
from provision import config as cfg
from provision.cli.bootstrap import Bootstrap, operator_keys
from provision.errors import AuthFailed, ProvisionError
from provision.facts import Facts
from provision.hosts import Job
from provision.inventory import Target
from provision.layout import FIREWALL_RULES, FIREWALL_UNIT, SSHD_DROPIN, SUDOERS_FILE
from provision.output import Printer
from provision.steps import Absent, Command, File, plan

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests operator@laptop"
HARDENED = {"ok": True, "config": {"permitrootlogin": ["no"], "passwordauthentication": ["no"],
                                   "kbdinteractiveauthentication": ["no"], "x11forwarding": ["no"], "port": ["22"]}}


def settings(**over):
    return cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, over), ROOT)


def facts_for(steps, answers=None, default=None):
    """Facts answering every step's question with ``default``, but for ``answers``."""
    keys = {tuple(f) for s in steps for f in s.facts()}
    return Facts({**{k: default for k in keys}, **{tuple(k): v for k, v in (answers or {}).items()}})


# -- settings

@pytest.mark.parametrize("value,message", [
    ("hello", "the app's own user runs the app and must never have sudo"),
    ("root", "that is a system account"),
    ("Deploy", "use lowercase letters"),
])
def test_deploy_user_is_never_the_app_or_a_system_account(value, message):
    with pytest.raises(ProvisionError) as e:
        settings(deploy_user=value)
    assert str(e.value).startswith(f"invalid setting app.deploy_user={value!r}: ") and message in str(e.value)


def test_open_ports_are_port_slash_protocol_from_yaml_numbers_or_inventory_text():
    assert settings(open_ports=[8443, "51820/udp", "8443/tcp"]).open_ports == ("8443/tcp", "51820/udp")
    assert settings(open_ports="8443, 9000/UDP").open_ports == ("8443/tcp", "9000/udp")
    for bad in ("70000", "22/icmp", "http"):
        with pytest.raises(ProvisionError, match=r"app.open_ports=.*expected a port from 1 to 65535"):
            settings(open_ports=[bad])


def test_deploy_keys_are_public_key_files_never_private_ones(tmp_path):
    pub = tmp_path / "ops.pub"
    pub.write_text(f"# the team\n{KEY}\n{KEY}\n")
    assert settings(deploy_keys=[str(pub)]).deploy_keys == (KEY,)
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ProvisionError, match="not an SSH public key file"):
        settings(deploy_keys=[str(private)])
    with pytest.raises(ProvisionError, match="cannot read"):
        settings(deploy_keys=[str(tmp_path / "missing.pub")])


def test_operator_keys_come_from_the_connection_key_else_a_clear_line(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    job = Job(Target("web1", "10.0.0.1", key=str(key)), settings())
    [line] = operator_keys(job)
    assert line == " ".join((tmp_path / "id_ed25519.pub").read_text().split()[:2])
    assert operator_keys(Job(Target("web1", "10.0.0.1", key=str(key)), settings(deploy_keys=[str(key) + ".pub"])))
    with pytest.raises(ProvisionError, match="no public key to give deploy; pass -i KEY"):
        operator_keys(Job(Target("web1", "10.0.0.1"), settings()))


# -- 1. account

def test_a_fresh_host_gets_the_deploy_user_its_key_and_sudo_checked_by_visudo():
    steps = boot.account_steps(settings(), (KEY,), None, None)
    planned = plan(steps, facts_for(steps, {("package", "sudo"): True}))
    changes = {p.step.name: p.change.commands for p in planned if p.change}
    assert changes["login user deploy"] == ["useradd --create-home --user-group --shell /bin/bash deploy"]
    keys = next(s for s in steps if isinstance(s, File) and s.path == "/home/deploy/.ssh/authorized_keys")
    assert keys.content == f"{KEY}\n".encode() and (keys.owner, keys.mode) == ("deploy", 0o600)
    sudo = next(s for s in steps if isinstance(s, File) and s.path == SUDOERS_FILE)
    assert sudo.content.endswith(b"\ndeploy ALL=(ALL:ALL) NOPASSWD: ALL\n") and sudo.mode == 0o440
    assert changes["sudoers valid"] == [f"visudo -cq -f {SUDOERS_FILE}"]
    assert changes["packages sudo nftables unattended-upgrades"][-1].endswith(" nftables unattended-upgrades")


def test_an_existing_account_keeps_its_home_and_other_keys():
    user = {"uid": 1000, "home": "/srv/ops", "shell": "/bin/bash", "group": "staff"}
    other = "ssh-rsa AAAAB3NzaOther colleague"
    f = Facts({("content", "/srv/ops/.ssh/authorized_keys"): other + "\n"})
    steps = boot.account_steps(settings(unattended_upgrades=False), (KEY,), f, user)
    keys = next(s for s in steps if isinstance(s, File) and s.path.endswith("authorized_keys"))
    assert keys.path == "/srv/ops/.ssh/authorized_keys" and keys.group == "staff"
    assert keys.content == f"{other}\n{KEY}\n".encode()
    assert boot.authorized_keys(f"{KEY}\n", (KEY.replace("operator@laptop", "other comment"),)) == f"{KEY}\n".encode()
    assert "unattended-upgrades" not in boot.packages(settings(unattended_upgrades=False))


@pytest.mark.parametrize("shell,expected", [("/bin/bash", None), ("/usr/sbin/nologin", ["usermod --shell /bin/bash deploy"])])
def test_login_user_lets_an_existing_account_log_in(shell, expected):
    step = boot.LoginUser("deploy")
    change = step.plan(Facts({("user", "deploy"): {"home": "/home/deploy", "shell": shell, "group": "deploy"}}), set())
    assert (change and change.commands) == expected


@pytest.mark.parametrize("fact,why", [
    ({"uid": 1001, "home": "/srv/shop", "shell": "/bin/sh", "group": "shop"}, "a provision app's user (home /srv/shop)"),
    ({"uid": 998, "home": "/var/lib/ops", "shell": "/bin/bash", "group": "ops"}, "a system account (uid 998 below 1000)"),
    ({"uid": 1002, "home": "/home/x", "shell": "/usr/sbin/nologin", "group": "x"}, "refuses logins (shell /usr/sbin/nologin)"),
])
def test_an_existing_system_or_app_account_is_refused_as_the_deploy_user_unless_bootstrap_made_it(fact, why):
    line = boot.unfit_deploy_user("shop", fact, None, None)
    assert line.startswith("app.deploy_user='shop' is ") and why in line and "\n" not in line
    assert "set app.deploy_user to a new name" in line
    marker = boot.marker(settings(deploy_user="shop"), (22,)).decode()
    assert boot.unfit_deploy_user("shop", fact, marker, None) is None
    assert boot.unfit_deploy_user("shop", fact, None, boot.sudoers("shop").decode()) is None
    assert boot.unfit_deploy_user("shop", fact, marker.replace("shop", "other"), "shop ALL=(ALL) ALL\n") == line
    person = {"uid": 1000, "home": "/home/ops", "shell": "/bin/bash", "group": "ops"}
    assert boot.unfit_deploy_user("ops", person, None, None) is None and boot.unfit_deploy_user("new", None, None, None) is None


class FakeRemote:
    sudo, label = "", "web1"

    def exec(self, command, timeout=None):
        return 0, "", ""


def test_bootstrap_refuses_an_unfit_deploy_user_before_changing_anything(monkeypatch):
    from provision.cli import bootstrap as cli
    b = Bootstrap(Job(Target("web1", "10.0.0.1"), settings(deploy_user="shop")), None, Printer(), (KEY,))
    b.login = lambda: FakeRemote()
    shop = {"uid": 1001, "home": "/srv/shop", "shell": "/bin/bash", "group": "shop"}
    monkeypatch.setattr(cli, "gather", lambda remote, keys: Facts({**{tuple(k): None for k in keys},
                                                                  ("user", "shop"): shop}))
    applied = []
    b.apply = lambda phase, dry_run=False: applied.append(phase.title)
    for dry_run in (False, True):
        with pytest.raises(ProvisionError, match=r"^web1: app.deploy_user='shop' is a provision app's user"):
            b.run(dry_run=dry_run)
    assert applied == []


# -- 2. sshd

def test_the_sshd_dropin_sorts_first_and_turns_root_and_passwords_off():
    assert SSHD_DROPIN.startswith("/etc/ssh/sshd_config.d/")
    assert SSHD_DROPIN.rsplit("/", 1)[1] < "50-cloud-init.conf"  # cloud-init's, which may turn passwords on
    text = boot.sshd_dropin().decode()
    for line in ("PermitRootLogin no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "X11Forwarding no"):
        assert f"\n{line}\n" in text


def sshd_facts(root=HARDENED, deploy=HARDENED):
    return Facts({("sshd", "root"): root, ("sshd", "deploy"): deploy})


def test_sshd_is_tested_checked_and_reloaded_only_when_its_effective_config_differs_or_the_dropin_changed():
    step = boot.SshdHardened(("deploy",))
    assert step.facts() == [("sshd", "root"), ("sshd", "deploy")]
    assert step.plan(sshd_facts(), set()) is None
    password = dict(HARDENED, config=dict(HARDENED["config"], passwordauthentication=["yes"]))
    for facts, notified in ((sshd_facts(), {"sshd"}), (sshd_facts({"ok": False, "error": "Bad configuration option"}), set()),
                            (sshd_facts(deploy=password), set())):
        cmds = step.plan(facts, notified).commands
        assert cmds.index("sshd -t") < cmds.index(boot.ssh_reload()) == len(cmds) - 1
        assert any("grep -qx 'passwordauthentication no'" in c and "include sshd_config.d/*.conf" in c for c in cmds)


def test_sshd_is_checked_as_root_and_the_deploy_user_log_in_so_a_match_block_cannot_undo_it():
    """`Match User root` / `Match all` with PermitRootLogin yes: plain `sshd -T` does not show it."""
    step = boot.SshdHardened(("deploy",))
    match_root = dict(HARDENED, config=dict(HARDENED["config"], permitrootlogin=["yes"]))
    cmds = step.plan(sshd_facts(root=match_root), set()).commands
    for user in ("root", "deploy"):
        assert f"effective=$(sshd -T -C user={user},host=localhost,addr=127.0.0.1)" in cmds
    assert "effective=$(sshd -T)" not in cmds and any("a Match block" in c for c in cmds)
    assert [st for st in boot.sshd_steps("ops") if isinstance(st, boot.SshdHardened)][0].logins() == ("root", "ops")


def test_after_sshd_reloads_a_fresh_login_as_root_must_be_refused():
    b = Bootstrap(Job(Target("web1", "10.0.0.1"), settings()), None, Printer(), (KEY,))
    b.connect = Connections({"root"})
    assert b.root_still_logs_in() is None and b.connect.tried == ["root"]

    class Conn:
        closed = False

        def close(self):
            self.closed = True

    class Root:
        conn = Conn()

        def close(self):
            self.conn.close()
    b.connect = lambda user: Root()
    why = b.root_still_logs_in()
    assert why.startswith("after sshd reloaded, root still logs in (a Match block") and Root.conn.closed


def test_sshd_reloads_only_where_ssh_service_runs_as_ubuntu_with_ssh_socket_may_not():
    """Ubuntu 22.10+ may start ssh.service from ssh.socket on the first connection: when it is not
    running there is nothing to reload (the next connection starts it with the new config); a
    reload of a stopped unit would fail. Debian and Ubuntu both name it ssh.service."""
    assert boot.ssh_reload() == "if systemctl is-active --quiet ssh.service; then systemctl reload ssh.service; fi"
    broken = {"ok": False, "error": "x"}
    assert boot.PRIVSEP in boot.SshdHardened(("deploy",)).plan(sshd_facts(broken, broken), set()).commands


# -- 3. firewall

def test_ssh_ports_are_sshds_and_the_connections():
    fact = {"ok": True, "config": {"port": ["22", "2222"], "listenaddress": ["0.0.0.0:2222", "[::]:2200"]}}
    assert boot.ssh_ports(fact, 22) == (22, 2200, 2222)
    assert boot.ssh_ports({"ok": False, "error": "x"}, 4022) == (4022,)
    assert boot.ssh_ports(None, None) == (22,)


def test_the_rules_are_provisions_own_table_only_dropping_what_is_not_let_in():
    ports = boot.allowed(settings(open_ports=["8443", "51820/udp"]), (22,))
    assert ports == {"tcp": [22, 80, 443, 8443], "udp": [51820]}
    text = boot.firewall_rules(ports).decode()
    assert "flush" not in text and text.count("table inet provision") == 3  # made, emptied, filled: atomically
    assert "policy drop;" in text and "ct state established,related accept" in text
    assert "meta l4proto { 1, 58 } accept" in text  # ICMP and ICMPv6 (neighbour discovery)
    assert "tcp dport { 22, 80, 443, 8443 } accept\n" in text and "udp dport { 51820 } accept\n" in text
    assert "udp dport" not in boot.firewall_rules(boot.allowed(settings(), (22,))).decode().replace("dport 546", "")
    unit = boot.firewall_unit().decode()
    assert f"ExecStart=/usr/sbin/nft -f {FIREWALL_RULES}" in unit and "After=nftables.service" in unit


def test_the_revert_is_armed_before_the_rules_change_and_only_then():
    steps = boot.firewall_steps(settings(), (22,), seconds=45)
    arm, rules, unit = steps[1], steps[2], steps[3]
    same = {("file", rules.path): {"type": "file", "sha256": rules.sha256},
            ("file", unit.path): {"type": "file", "sha256": unit.sha256},
            ("service", FIREWALL_UNIT): {"loaded": True, "active": True, "enabled": True}}
    assert arm.plan(Facts(same), set()) is None
    for changed in ({("file", rules.path): None}, {("service", FIREWALL_UNIT): None}):
        cmds = arm.plan(Facts({**same, **changed}), set()).commands
        assert cmds[-1].startswith("systemd-run --quiet --collect --unit=provision-firewall-revert --on-active=45 ")
    planned = plan(steps, facts_for(steps, {("file", "/etc/provision"): {"type": "dir", "mode": 0o755,
                                                                         "owner": "root", "group": "root"}}))
    names = [p.step.name for p in planned if p.change]
    assert names == ["firewall revert timer", f"file {FIREWALL_RULES}", f"file {unit.path}",
                     f"service {FIREWALL_UNIT}"]
    service = planned[-1].change.commands
    assert service.index(f"/usr/sbin/nft -c -f {FIREWALL_RULES}") < service.index(f"systemctl reload-or-restart {FIREWALL_UNIT}")


def test_confirming_needs_the_new_rules_still_loaded():
    cmd = boot.confirm_command(b"rules")
    assert cmd.startswith("systemctl stop provision-firewall-revert.timer && systemctl is-active --quiet ")
    assert "sha256sum -c --status" in cmd and cmd.endswith(f"rm -f {FIREWALL_RULES}.pending {FIREWALL_RULES}.previous")
    assert "cp -p /etc/provision/firewall.nft.previous /etc/provision/firewall.nft" in boot.revert_script()


@pytest.fixture
def fake_host(tmp_path, monkeypatch):
    """The firewall's files under tmp_path; systemctl and nft only log what they are asked."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    for tool in ("systemctl", "nft"):
        (bin_ / tool).write_text(f"#!/bin/sh\necho {tool} \"$*\" >> {log}\n")
        (bin_ / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    rules = tmp_path / "firewall.nft"
    monkeypatch.setattr(boot, "FIREWALL_RULES", str(rules))
    monkeypatch.setattr(boot, "FIREWALL_PREVIOUS", f"{rules}.previous")
    monkeypatch.setattr(boot, "FIREWALL_PENDING", f"{rules}.pending")
    monkeypatch.setattr(boot, "NFT", str(bin_ / "nft"))

    def sh(cmd):
        subprocess.run(["/bin/sh", "-c", cmd], check=True)
        return log.read_text() if log.exists() else ""
    return rules, log, sh


def test_a_second_revert_after_the_timer_fired_changes_nothing(fake_host):
    """The timer fires, then the fresh login's confirm fails and the open connection reverts again:
    the rules confirmed before stay (the second revert must not delete the whole table)."""
    rules, log, sh = fake_host
    rules.write_text("old\n")
    sh(boot.arm_commands(60)[1])  # armed: the previous rules kept
    rules.write_text("new\n")
    assert "reload-or-restart" in sh(boot.revert_script())  # the timer fires
    assert rules.read_text() == "old\n"
    log.unlink()
    assert sh(boot.revert_now()) == f"systemctl stop {boot.FIREWALL_REVERT}.timer\n" \
        f"systemctl reset-failed {boot.FIREWALL_REVERT}.service {boot.FIREWALL_REVERT}.timer\n"
    assert rules.read_text() == "old\n"


def test_a_second_revert_of_a_first_firewall_changes_nothing_either(fake_host):
    rules, log, sh = fake_host
    sh(boot.arm_commands(60)[1])  # no firewall before
    rules.write_text("new\n")
    assert "delete table inet provision" in sh(boot.revert_script()) and not rules.exists()
    log.unlink()
    assert "delete" not in sh(boot.revert_now()) and "disable" not in log.read_text()


NFT = {"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"chain": {"family": "inet", "table": "provision", "name": "input", "hook": "input", "policy": "drop"}},
    {"rule": {"expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                       {"accept": None}]}},
    {"rule": {"expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"drop": None}]}},
    {"rule": {"expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}, {"accept": None}]}},
    {"rule": {"expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": [1, 58]}}},
                       {"accept": None}]}},
    {"rule": {"expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                                  "right": {"prefix": {"addr": "fe80::", "len": 10}}}},
                       {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 546}},
                       {"accept": None}]}},
    {"rule": {"expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                  "right": {"set": [22, 80, 443]}}}, {"accept": None}]}},
]}


def test_open_ports_of_reads_what_the_table_lets_in_beside_its_own_rules():
    assert boot.open_ports_of(NFT) == ("drop", {"22/tcp", "80/tcp", "443/tcp"})
    more = json.loads(json.dumps(NFT))
    more["nftables"] += [
        {"rule": {"expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                      "right": "10.0.0.5"}},
                           {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                      "right": {"set": [{"range": [5000, 5010]}]}}}, {"accept": None}]}},
        {"rule": {"expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}},
                           {"accept": None}]}},
    ]
    more["nftables"][1]["chain"]["policy"] = "accept"
    assert boot.open_ports_of(more) == ("accept", {"22/tcp", "80/tcp", "443/tcp", "5000-5010/tcp", "*"})


def test_open_ports_of_reads_icmp_by_name_as_nft_prints_it_where_etc_protocols_is():
    """Debian's netbase (on every real host) makes `nft -j` print `meta l4proto { 1, 58 }` by name."""
    named = json.loads(json.dumps(NFT).replace('{"set": [1, 58]}', '{"set": ["icmp", "ipv6-icmp"]}'))
    assert named != NFT
    assert boot.open_ports_of(named) == ("drop", {"22/tcp", "80/tcp", "443/tcp"})
    other = json.loads(json.dumps(NFT).replace('{"set": [1, 58]}', '{"set": ["icmp", "tcp"]}'))
    assert "*" in boot.open_ports_of(other)[1]  # any other protocol let in is still counted


# -- phases put back what they changed

def test_undo_restores_files_as_they_were_and_removes_a_user_the_phase_made():
    s = settings()
    phase = boot.Phase("account", lambda f: boot.account_steps(s, (KEY,), f, None), undo_after=[Command("x", ("true",))])
    assert phase.undo() == []  # never planned: nothing to put back
    old_sudoers = {"type": "file", "mode": 0o400, "owner": "root", "group": "root", "sha256": "x"}
    steps = phase.make(None)
    phase.target(facts_for(steps + [boot.LoginUser("deploy")], {
        ("file", SUDOERS_FILE): old_sudoers, ("content", SUDOERS_FILE): "old ALL=(ALL) ALL\n",
        ("content", "/home/deploy/.ssh/authorized_keys"): None}))
    undo = phase.undo()
    assert [type(st).__name__ for st in undo] == ["File", "Absent", "Command", "Command"]
    assert (undo[0].path, undo[0].content, undo[0].mode) == (SUDOERS_FILE, b"old ALL=(ALL) ALL\n", 0o400)
    assert isinstance(undo[1], Absent) and undo[1].path == "/home/deploy/.ssh/authorized_keys"
    assert undo[2].commands == ("userdel --force --remove deploy",)


def test_the_marker_and_upgrades_follow_the_settings():
    on = boot.upgrades_steps(settings(open_ports=["8443"]), (22,))
    assert json.loads(on[-1].content) == {"deploy_user": "deploy", "ssh_ports": [22], "open_ports": ["8443/tcp"],
                                          "unattended_upgrades": True}
    assert b'APT::Periodic::Unattended-Upgrade "1";' in on[0].content
    off = boot.upgrades_steps(settings(unattended_upgrades=False), (22,))
    assert isinstance(off[0], Absent) and off[0].path == on[0].path


def test_inventory_line():
    assert boot.inventory_line("web1", "203.0.113.10", "deploy", 22, "~/.ssh/id") == \
        "web1 host=203.0.113.10 user=deploy key=~/.ssh/id"
    assert boot.inventory_line("web1", "h", "deploy", 2222, None) == "web1 host=h user=deploy port=2222"


# -- connecting

class Connections:
    def __init__(self, refused: set[str]):
        self.refused, self.tried = refused, []

    def __call__(self, user):
        self.tried.append(user)
        if user in self.refused:
            raise AuthFailed(f"web1: SSH authentication failed for {user}@10.0.0.1:22; check the user and the key")
        return f"remote as {user}"


def test_a_second_bootstrap_as_root_goes_on_as_the_deploy_user_saying_so(capsys):
    b = Bootstrap(Job(Target("web1", "10.0.0.1"), settings()), None, Printer(), (KEY,))
    b.connect = Connections({"root"})
    assert b.login() == "remote as deploy" and b.connect.tried == ["root", "deploy"]
    assert capsys.readouterr().out == ("web1: root's login is refused (bootstrapped already): going on as deploy, "
                                       "through sudo\n")
    b.connect = Connections({"root", "deploy"})
    with pytest.raises(AuthFailed, match="for root@"):  # the first refusal is the one that says what to fix
        b.login()
    b = Bootstrap(Job(Target("web1", "10.0.0.1", user="ops"), settings()), None, Printer(), (KEY,))
    b.connect = Connections({"ops"})
    with pytest.raises(AuthFailed):
        b.login()
    assert b.connect.tried == ["ops"]
