"""A fresh host made safe (`fab bootstrap`), as phases of steps: pure, facts in, steps out.

1. ``account``: the deploy user with the operator's public keys and passwordless sudo (plus the
   packages the later phases need, in the same apt run).
2. ``sshd``: a drop-in that sorts first (sshd takes the first value it reads) turning off root
   and password logins, checked with ``sshd -t`` and ``sshd -T`` before sshd reloads.
3. ``firewall``: provision's own nftables table (never ``flush ruleset``, never Debian's
   nftables.conf): incoming traffic dropped but for SSH, 80, 443 and ``open_ports``. A transient
   timer on the host undoes the change unless a fresh connection confirms it.
4. ``upgrades``: unattended security upgrades (``unattended_upgrades: false`` leaves them be),
   then the marker that tells `fab check` the host was bootstrapped.

Each phase remembers the facts it was planned from (:class:`Phase`), so that what it changed can
be put back (:meth:`Phase.undo`). :mod:`provision.cli.bootstrap` runs the phases, with fresh SSH
connections verifying the deploy user's login between them.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Callable

from .app import trust_steps
from .config import Settings
from .facts import Facts
from .layout import (BOOTSTRAP_MARKER, FIREWALL_PENDING, FIREWALL_PREVIOUS, FIREWALL_REVERT, FIREWALL_RULES, FIREWALL_TABLE,
                     FIREWALL_UNIT, PROVISION_ETC, SRV_DIR, SSH_SERVICE, SSHD_DROPIN, SUDOERS_FILE, SYSTEMD_DIR,
                     UPGRADES_CONF, UPGRADES_TIMER)
from .steps import Absent, Change, Command, Directory, File, Packages, Recipe, Service, Step

q = shlex.quote
# sshd -T's names and values, and how the drop-in spells them
HARDENED = (("PermitRootLogin", "no"), ("PasswordAuthentication", "no"), ("KbdInteractiveAuthentication", "no"),
            ("X11Forwarding", "no"))
WEB_PORTS = (80, 443)
FIREWALL_CONFIRM_SECONDS = 60  # a firewall change not confirmed by a fresh connection by then is undone
NFT = "/usr/sbin/nft"
NO_LOGIN_SHELLS = ("/nologin", "/false")  # how a shell that refuses logins ends


def packages(s: Settings) -> tuple[str, ...]:
    return ("sudo", "nftables") + (("unattended-upgrades",) if s.unattended_upgrades else ())


# -- 1. the deploy user -------------------------------------------------------------------

@dataclass(repr=False)
class LoginUser(Step):
    """A user people log in as (a home, a shell). An existing account is kept as it is, but for a
    shell that refuses logins."""

    user: str

    @property
    def name(self):
        return f"login user {self.user}"

    def facts(self):
        return [("user", self.user)]

    def plan(self, facts, notified):
        u = facts.user(self.user)
        if u is None:
            return Change([f"useradd --create-home --user-group --shell /bin/bash {q(self.user)}"], summary="create")
        if u["shell"].endswith(NO_LOGIN_SHELLS):
            return Change([f"usermod --shell /bin/bash {q(self.user)}"], summary="allow logins")
        return None


UID_MIN = 1000  # Debian's first uid for people (login.defs); below it: system accounts


def made_by_bootstrap(user: str, marker_text: str | None, sudoers_text: str | None) -> bool:
    """The deploy user an earlier bootstrap made: its marker names it, or its sudoers file is ours for it."""
    try:
        if json.loads(marker_text or "null").get("deploy_user") == user:
            return True
    except (ValueError, AttributeError):
        pass
    return (sudoers_text or "").encode() == sudoers(user)


def unfit_deploy_user(user: str, fact: dict | None, marker_text: str | None, sudoers_text: str | None) -> str | None:
    """Why an existing account must not become the deploy user (keys, a login shell, NOPASSWD sudo
    would make it root), else None: a system account (uid below UID_MIN, or a shell refusing
    logins) or a provision app's user (home under /srv); unless bootstrap made it."""
    if fact is None or made_by_bootstrap(user, marker_text, sudoers_text):
        return None
    if fact["uid"] < UID_MIN:
        what = f"a system account (uid {fact['uid']} below {UID_MIN})"
    elif fact["shell"].endswith(NO_LOGIN_SHELLS):
        what = f"an account that refuses logins (shell {fact['shell']})"
    elif fact["home"] == SRV_DIR or fact["home"].startswith(SRV_DIR + "/"):
        what = f"a provision app's user (home {fact['home']})"
    else:
        return None
    return (f"app.deploy_user={user!r} is {what}: giving it keys and passwordless sudo would make it root; "
            "set app.deploy_user to a new name (bootstrap creates it) or to a person's login account")


def home_of(user: str, fact: dict | None) -> str:
    return fact["home"] if fact else f"/home/{user}"


def authorized_keys(old: str | None, keys: tuple[str, ...]) -> bytes:
    """The keys already there (another admin's are kept), then the operator's that are missing."""
    lines = (old or "").splitlines()
    have = {" ".join(l.split()[:2]) for l in lines}
    lines += [k for k in keys if " ".join(k.split()[:2]) not in have]
    return ("\n".join(lines) + "\n").encode()


def sudoers(user: str) -> bytes:
    return f"# Managed by provision (fab bootstrap)\n{user} ALL=(ALL:ALL) NOPASSWD: ALL\n".encode()


def account_steps(s: Settings, keys: tuple[str, ...], facts: Facts | None, user_fact: dict | None) -> list[Step]:
    user = s.deploy_user
    home = home_of(user, user_fact)
    group = user_fact["group"] if user_fact else user
    keys_file = f"{home}/.ssh/authorized_keys"
    old_keys = facts.content(keys_file) if facts else None
    return trust_steps(s) + [
        Packages(packages(s)),
        LoginUser(user),
        Directory(f"{home}/.ssh", owner=user, group=group, mode=0o700),
        File(keys_file, authorized_keys(old_keys, keys), owner=user, group=group, mode=0o600),
        File(SUDOERS_FILE, sudoers(user), mode=0o440, notify=("sudoers",)),
        Command("sudoers valid", (f"visudo -cq -f {q(SUDOERS_FILE)}",), when=("sudoers",)),
    ]


# -- 2. sshd --------------------------------------------------------------------------------

def sshd_dropin() -> bytes:
    return ("# Managed by provision (fab bootstrap). sshd takes the first value it reads: this file sorts\n"
            "# first in sshd_config.d, which Debian's and Ubuntu's sshd_config include at their top.\n"
            + "".join(f"{k} {v}\n" for k, v in HARDENED)).encode()


def sshd_hardened(fact: dict | None) -> bool:
    return bool(fact and fact["ok"]) and all(fact["config"].get(k.lower()) == [v] for k, v in HARDENED)


def ssh_reload() -> str:
    """sshd rereads its config; running sessions stay. On Ubuntu 22.10+ ssh.socket may start
    ssh.service on the first connection: when that is not running, the next one starts it with
    the new config, and there is nothing to reload."""
    return f"if systemctl is-active --quiet {SSH_SERVICE}; then systemctl reload {SSH_SERVICE}; fi"


# sshd -t wants its privilege separation directory, which ssh.service makes (a socket-activated
# Ubuntu whose ssh.service never ran has none yet)
PRIVSEP = "mkdir -p -m 0755 /run/sshd"


def sshd_match(user: str) -> str:
    """``sshd -T``'s connection spec for a login as ``user``: its Match blocks applied."""
    return f"user={user},host=localhost,addr=127.0.0.1"


@dataclass(repr=False)
class SshdHardened(Step):
    """sshd's effective config (``sshd -T -C``, for a login as root and as ``users``: a ``Match``
    block may set them again) has the hardened values. When it has not, or the drop-in just
    changed: ``sshd -t``, the values checked as sshd would read them, then reload."""

    users: tuple[str, ...] = ()
    notify: tuple[str, ...] = ()

    @property
    def name(self):
        return "sshd config"

    def logins(self) -> tuple[str, ...]:
        return ("root", *(u for u in self.users if u != "root"))

    def facts(self):
        return [("sshd", u) for u in self.logins()]

    def plan(self, facts, notified):
        if all(sshd_hardened(facts[("sshd", u)]) for u in self.logins()) and "sshd" not in notified:
            return None
        cmds = [PRIVSEP, "sshd -t"]
        for user in self.logins():
            cmds.append(f"effective=$(sshd -T -C {sshd_match(user)})")
            for k, v in HARDENED:
                want = f"{k.lower()} {v}"
                cmds.append(f"grep -qx {q(want)} <<<\"$effective\" || {{ echo \"sshd would still use "
                            f"$(grep '^{k.lower()} ' <<<\"$effective\") for {user} with {SSHD_DROPIN} in place: a "
                            f"Match block or a file sshd reads first sets it; take it out, and make "
                            f"/etc/ssh/sshd_config include sshd_config.d/*.conf at its top\"; exit 1; }}")
        return Change(cmds + [ssh_reload()], summary="test, reload")


def sshd_steps(deploy_user: str) -> list[Step]:
    return [Directory(SSHD_DROPIN.rsplit("/", 1)[0], owner="root", group="root", mode=0o755),
            File(SSHD_DROPIN, sshd_dropin(), notify=("sshd",)), SshdHardened((deploy_user,))]


def sshd_undo() -> list[Step]:
    """sshd rereads the config put back, when it passes ``sshd -t`` (else it keeps running the one it has)."""
    return [Command("reload sshd", (PRIVSEP, f"if sshd -t; then {ssh_reload()}; fi"))]


# -- 3. the firewall -----------------------------------------------------------------------------

def ssh_ports(fact: dict | None, connection_port: int | None) -> tuple[int, ...]:
    """The ports sshd listens on (``Port`` and ``ListenAddress`` lines of ``sshd -T``), and the port
    this connection came in on."""
    ports = set()
    if fact and fact["ok"]:
        ports |= {int(p) for p in fact["config"].get("port", []) if p.isdigit()}
        for addr in fact["config"].get("listenaddress", []):
            port = addr.rsplit(":", 1)[-1] if ":" in addr else ""
            if port.isdigit():
                ports.add(int(port))
    if connection_port:
        ports.add(connection_port)
    return tuple(sorted(ports or {22}))


def allowed(s: Settings, ssh: tuple[int, ...]) -> dict[str, list[int]]:
    """The ports the firewall lets in, by protocol."""
    out = {"tcp": sorted({*ssh, *WEB_PORTS}), "udp": []}
    for p in s.open_ports:
        port, proto = p.split("/")
        out[proto] = sorted({*out[proto], int(port)})
    return out


def firewall_rules(ports: dict[str, list[int]]) -> bytes:
    """provision's own table, replaced whole and atomically (`nft -f`): nothing else's is touched."""
    accept = "".join(f"        {proto} dport {{ {', '.join(map(str, nums))} }} accept\n"
                     for proto, nums in sorted(ports.items()) if nums)
    return ("# Managed by provision (fab bootstrap): changes here are overwritten on the next bootstrap.\n"
            f"table {FIREWALL_TABLE}\ndelete table {FIREWALL_TABLE}\n"
            f"table {FIREWALL_TABLE} {{\n"
            "    chain input {\n"
            "        type filter hook input priority 0; policy drop;\n"
            "        ct state established,related accept\n"
            "        ct state invalid drop\n"
            "        iifname \"lo\" accept\n"
            "        # ICMP (1) and ICMPv6 (58: IPv6 needs neighbour discovery), by number: /etc/protocols may be missing\n"
            "        meta l4proto { 1, 58 } accept\n"
            "        ip6 saddr fe80::/10 udp dport 546 accept\n"
            + accept +
            "    }\n}\n").encode()


def firewall_unit() -> bytes:
    return nft_unit("fab bootstrap", "provision firewall", FIREWALL_TABLE, FIREWALL_RULES)


def nft_unit(by: str, description: str, table: str, rules: str, before: str = "") -> bytes:
    """Loads ``table`` from ``rules`` at boot, before the network is up (and ``before``), after Debian's
    nftables.service (whose `flush ruleset` would drop it); stopping it drops the table."""
    return (f"# Managed by provision ({by})\n[Unit]\nDescription={description} (nftables table "
            f"{table})\nDefaultDependencies=no\nWants=network-pre.target\nAfter=nftables.service\n"
            f"Before=network-pre.target {before}shutdown.target\nConflicts=shutdown.target\n\n"
            f"[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart={NFT} -f {rules}\n"
            f"ExecReload={NFT} -f {rules}\nExecStop=-{NFT} delete table {table}\n\n"
            "[Install]\nWantedBy=sysinit.target\n").encode()


FIREWALL_UNIT_FILE = f"{SYSTEMD_DIR}/{FIREWALL_UNIT}"


def revert_script() -> str:
    """What the pending revert does, once: the rules confirmed before come back (copied: they stay
    until a confirm), or without any the firewall goes. The pending marker is consumed first (`rm`
    fails when it is gone), so a second revert (the timer fired, then the open connection reverts)
    does nothing."""
    return (f"if rm {FIREWALL_PENDING} 2>/dev/null; then "
            f"if [ -f {FIREWALL_PREVIOUS} ]; then cp -p {FIREWALL_PREVIOUS} {FIREWALL_RULES}; "
            f"systemctl reload-or-restart {FIREWALL_UNIT}; "
            f"else systemctl disable --now {FIREWALL_UNIT}; {NFT} delete table {FIREWALL_TABLE}; "
            f"rm -f {FIREWALL_RULES}; fi; fi 2>/dev/null; true")


def stop_revert() -> str:
    return (f"{{ systemctl stop {FIREWALL_REVERT}.timer; "
            f"systemctl reset-failed {FIREWALL_REVERT}.service {FIREWALL_REVERT}.timer; }} 2>/dev/null || true")


def arm_commands(seconds: int) -> list[str]:
    """A transient timer on the host that undoes the change in ``seconds`` unless confirmed."""
    return [stop_revert(),
            f"if [ -f {FIREWALL_RULES} ]; then cp -p {FIREWALL_RULES} {FIREWALL_PREVIOUS}; "
            f"else rm -f {FIREWALL_PREVIOUS}; fi; touch {FIREWALL_PENDING}",
            f"systemd-run --quiet --collect --unit={FIREWALL_REVERT} --on-active={int(seconds)} "
            f"--timer-property=AccuracySec=1s /bin/sh -c {q(revert_script())}"]


def confirm_command(rules: bytes) -> str:
    """Run over a fresh connection: the pending revert is called off, when the firewall is still the
    new one (a revert that already fired makes this fail)."""
    sha = hashlib.sha256(rules).hexdigest()
    return (f"systemctl stop {FIREWALL_REVERT}.timer && systemctl is-active --quiet {FIREWALL_UNIT} && "
            f"echo {q(f'{sha}  {FIREWALL_RULES}')} | sha256sum -c --status && rm -f {FIREWALL_PENDING} {FIREWALL_PREVIOUS}")


def revert_now() -> str:
    """Over the connection still open: the revert, at once, and the timer called off."""
    return f"{stop_revert()}; {revert_script()}"


@dataclass(repr=False)
class FirewallArm(Step):
    """Before the firewall changes: the pending revert armed (see :func:`arm_commands`)."""

    files: tuple[File, ...]
    seconds: int

    @property
    def name(self):
        return "firewall revert timer"

    def facts(self):
        return [("file", f.path) for f in self.files] + [("service", FIREWALL_UNIT)]

    def plan(self, facts, notified):
        unit = facts.service(FIREWALL_UNIT) or {}
        same = all((facts.file(f.path) or {}).get("sha256") == f.sha256 for f in self.files)
        if same and unit.get("active") and unit.get("enabled"):
            return None
        return Change(arm_commands(self.seconds), summary=f"undone in {self.seconds}s unless a fresh login confirms")


def firewall_steps(s: Settings, ssh: tuple[int, ...], seconds: int = FIREWALL_CONFIRM_SECONDS,
                   ports: dict[str, list[int]] | None = None) -> list[Step]:
    """``ports`` replaces what :func:`allowed` would let in (tests only: a rule set that shuts SSH
    out, to see the pending revert fire)."""
    files = (File(FIREWALL_RULES, firewall_rules(ports or allowed(s, ssh)), mode=0o644, notify=("firewall",)),
             File(FIREWALL_UNIT_FILE, firewall_unit(), notify=("firewall-unit",)))
    return [Directory(PROVISION_ETC, owner="root", group="root", mode=0o755), FirewallArm(files, seconds), *files,
            Service(FIREWALL_UNIT, reload_on=("firewall",), restart_on=("firewall-unit",),
                    daemon_reload_on=("firewall-unit",), check=f"{NFT} -c -f {FIREWALL_RULES}")]


def firewall_file(steps: list[Step]) -> File:
    return next(st for st in steps if isinstance(st, File) and st.path == FIREWALL_RULES)


# how `nft -j` names the protocols of `meta l4proto { 1, 58 }` when /etc/protocols is there (Debian's
# netbase, on every real host); without it, it prints the numbers
PROTOCOL_NUMBERS = {"icmp": 1, "ipv6-icmp": 58, "icmpv6": 58}


def _numeric_protocols(right):
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        return {"set": sorted((PROTOCOL_NUMBERS.get(v, v) if isinstance(v, str) else v for v in right["set"]),
                              key=lambda v: (isinstance(v, str), str(v).zfill(3)))}
    return right


def _own_rule(matches: list[dict]) -> bool:
    """One of the accept rules every provision firewall has besides its ports (see firewall_rules)."""
    def key(m):
        left = m.get("left", {})
        if "payload" in left:
            return f"{left['payload'].get('protocol')}.{left['payload'].get('field')}"
        return (left.get("ct") or left.get("meta") or {}).get("key")

    def right(m):
        return _numeric_protocols(m.get("right")) if key(m) == "l4proto" else m.get("right")
    shape = sorted((key(m), json.dumps(right(m), sort_keys=True)) for m in matches)
    return shape in ([("state", '["established", "related"]')], [("iifname", '"lo"')],
                     [("l4proto", '{"set": [1, 58]}')],
                     [("ip6.saddr", '{"prefix": {"addr": "fe80::", "len": 10}}'), ("udp.dport", "546")])


def open_ports_of(nft_json: dict) -> tuple[str | None, set[str]]:
    """From ``nft -j list table ...``: the input chain's policy, and what its other accept rules
    let in: ``PORT/PROTO`` (``A-B/PROTO`` for a range; ``*`` for a rule on no port at all). A port
    accepted only from some addresses counts as open."""
    policy, ports = None, set()
    for item in nft_json.get("nftables", []):
        if "chain" in item and item["chain"].get("hook") == "input":
            policy = item["chain"].get("policy")
        rule = item.get("rule")
        if not rule or not any("accept" in e for e in rule.get("expr", [])):
            continue
        matches = [e["match"] for e in rule["expr"] if "match" in e]
        if _own_rule(matches):
            continue
        dports = [m for m in matches if m.get("left", {}).get("payload", {}).get("field") == "dport"]
        if not dports:
            ports.add("*")
        for m in dports:
            proto, right = m["left"]["payload"].get("protocol"), m.get("right")
            for v in right["set"] if isinstance(right, dict) and "set" in right else [right]:
                ports.add(f"{v['range'][0]}-{v['range'][1]}/{proto}" if isinstance(v, dict) and "range" in v
                          else f"{v}/{proto}")
    return policy, ports


# -- 4. upgrades, and the marker -----------------------------------------------------------------------

UPGRADES = (b'// Managed by provision (fab bootstrap): security upgrades every day\n'
            b'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n')


def marker(s: Settings, ssh: tuple[int, ...]) -> bytes:
    """What `fab check` finds on a bootstrapped host (root's, written last)."""
    return (json.dumps({"deploy_user": s.deploy_user, "ssh_ports": list(ssh), "open_ports": list(s.open_ports),
                        "unattended_upgrades": s.unattended_upgrades}, sort_keys=True) + "\n").encode()


def upgrades_steps(s: Settings, ssh: tuple[int, ...]) -> list[Step]:
    if s.unattended_upgrades:
        steps: list[Step] = [File(UPGRADES_CONF, UPGRADES), Service(UPGRADES_TIMER)]
    else:
        steps = [Absent(UPGRADES_CONF)]
    return steps + [Directory(PROVISION_ETC, owner="root", group="root", mode=0o755),
                    File(BOOTSTRAP_MARKER, marker(s, ssh))]


# -- phases ----------------------------------------------------------------------------------------

class Phase(Recipe):
    """One phase: steps made from the facts (``make(facts)``; facts None: only to tell which facts
    they need). Remembers the facts it was planned from, to put back what it changed."""

    def __init__(self, title: str, make: Callable[[Facts | None], list[Step]], undo_after: list[Step] | None = None,
                 facts: list | None = None):
        self.title, self.make, self.undo_after, self.extra = title, make, undo_after or [], facts or []
        self.before: Facts | None = None

    def target_facts(self):
        return [*self.extra, *(("content", st.path) for st in self.make(None) if isinstance(st, File))]

    def target(self, facts):
        self.before = facts
        return None

    def steps(self, target):
        return self.make(self.before)

    def undo(self) -> list[Step]:
        """Steps that put back what the phase changed, as its facts found it: its files' old
        content, owner and mode (or none), a user it made removed; then ``undo_after``. Nothing
        when it never planned. The packages it installed stay."""
        if self.before is None:
            return []
        out: list[Step] = []
        for st in reversed(self.make(self.before)):
            if isinstance(st, File):
                f, old = self.before.file(st.path), self.before.content(st.path)
                if f is None:
                    out.append(Absent(st.path))
                elif f["type"] == "file" and old is not None:
                    out.append(File(st.path, old.encode(), owner=f["owner"], group=f["group"], mode=f["mode"]))
            elif isinstance(st, LoginUser) and self.before.user(st.user) is None:
                out.append(Command(f"remove user {st.user}", (f"userdel --force --remove {q(st.user)}",),
                                   unless=f"! id -u {q(st.user)} >/dev/null 2>&1"))
        return out + self.undo_after


def inventory_line(alias: str, host: str, user: str, port: int, key: str | None) -> str:
    return (f"{alias} host={host} user={user}" + (f" port={port}" if port != 22 else "")
            + (f" key={key}" if key else ""))
