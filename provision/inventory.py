"""Ansible-style INI inventory: hosts with vars, [group], [group:vars], [group:children].

``resolve("web,db1,deploy@10.0.0.5:2222")`` turns a ``-H`` selection into
:class:`Target` objects: aliases and groups from the inventory, anything that
looks like an address used as it is.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ProvisionError

# Each used with fullmatch: the whole text must match (no trailing newline).
SECTION_RE = re.compile(r"\[([A-Za-z0-9_.-]+)(?::(vars|children))?\]")
ALIAS_RE = re.compile(r"[A-Za-z0-9_.-]+")
VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ADDRESS_RE = re.compile(r"(?:(?P<user>[A-Za-z0-9_.-]+)@)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+)(?::(?P<port>[0-9]+))?")


@dataclass(frozen=True)
class Target:
    alias: str
    host: str
    user: str = "root"
    port: int = 22
    key: str | None = None
    known_hosts: str | None = None
    vars: dict = field(default_factory=dict, compare=False, hash=False)  # app settings from the inventory

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _port(value, where: str) -> int:
    try:
        p = int(value)
    except (TypeError, ValueError):
        p = -1
    if not 1 <= p <= 65535:
        raise ProvisionError(f"{where}: port {value!r} is out of range; use a number from 1 to 65535")
    return p


class Inventory:
    def __init__(self):
        self.hosts: dict[str, dict] = {}  # alias -> vars
        self.groups: dict[str, list[str]] = {"all": [], "ungrouped": []}
        self.group_vars: dict[str, dict] = {}
        self.children: dict[str, list[str]] = {}
        self.sources: list[str] = []
        self.searched: list[str] = []

    # -- parsing ----------------------------------------------------------
    @classmethod
    def load(cls, paths: list[Path]) -> "Inventory":
        inv = cls()
        for p in paths:
            if p.exists():
                inv.parse(p.read_text(), str(p))
        inv.searched = [str(p) for p in paths]
        return inv

    def parse(self, text: str, source: str = "inventory.ini") -> "Inventory":
        self.sources.append(source)
        section, kind = "ungrouped", None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            where = f"{source}:{n}"
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                m = SECTION_RE.fullmatch(line)
                if not m:
                    raise ProvisionError(f"{where}: malformed section header {line!r}; use [group], "
                                         "[group:vars] or [group:children]")
                section, kind = m.group(1), m.group(2)
                if kind is None:
                    self.groups.setdefault(section, [])
                elif kind == "vars":
                    self.group_vars.setdefault(section, {})
                else:
                    self.children.setdefault(section, [])
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:
                raise ProvisionError(f"{where}: malformed line {line!r} ({e}); fix the quoting")
            if kind == "vars":
                k, v = self._pair(line, where)
                self.group_vars[section][k] = v
            elif kind == "children":
                if len(words) != 1 or not ALIAS_RE.fullmatch(words[0]):
                    raise ProvisionError(f"{where}: malformed line {line!r}; list one child group per line")
                self.children[section].append(words[0])
            else:
                alias, pairs = words[0], words[1:]
                if not ALIAS_RE.fullmatch(alias) or "=" in alias:
                    raise ProvisionError(f"{where}: malformed host line {line!r}; expected ALIAS [key=value ...]")
                hv = dict(self._pair(p, where) for p in pairs)
                if "port" in hv:
                    _port(hv["port"], where)
                if alias in self.groups.get(section, []):
                    raise ProvisionError(f"{where}: host {alias!r} is listed twice in [{section}]; remove one line")
                self.hosts.setdefault(alias, {}).update(hv)
                self.groups[section].append(alias)
                if alias not in self.groups["all"]:
                    self.groups["all"].append(alias)
        return self

    @staticmethod
    def _pair(text: str, where: str) -> tuple[str, str]:
        k, sep, v = text.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not VAR_RE.fullmatch(k):
            raise ProvisionError(f"{where}: malformed variable {text!r}; expected key=value")
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        return k, v

    # -- lookups ----------------------------------------------------------
    def group_hosts(self, group: str, _seen: frozenset = frozenset()) -> list[str]:
        if group in _seen:
            raise ProvisionError(f"inventory: group {group!r} contains itself through [..:children]; break the loop")
        out = list(self.groups.get(group, []))
        for child in self.children.get(group, []):
            if child not in self.groups and child not in self.children:
                raise ProvisionError(f"inventory: [{group}:children] names unknown group {child!r}; define [{child}]")
            out += [h for h in self.group_hosts(child, _seen | {group}) if h not in out]
        return out

    def is_group(self, name: str) -> bool:
        return name in self.groups or name in self.children

    def host_groups(self, alias: str) -> list[str]:
        """Groups containing ``alias``, outermost first (so inner group vars win)."""
        names = [g for g in list(self.groups) + list(self.children) if alias in self.group_hosts(g)]
        names = list(dict.fromkeys(names))

        def depth(g: str) -> int:
            parents = [p for p, kids in self.children.items() if g in kids]
            return 0 if g == "all" else 1 + max((depth(p) for p in parents), default=0)

        return sorted(names, key=depth)

    def host_vars(self, alias: str) -> dict:
        out: dict = {}
        for g in self.host_groups(alias):
            out.update(self.group_vars.get(g, {}))
        out.update(self.hosts.get(alias, {}))
        return out

    def target(self, alias: str, default_user: str = "root", default_port: int = 22) -> Target:
        hv = self.host_vars(alias)
        where = f"inventory host {alias}"
        conn = {k: hv.pop(k) for k in ("host", "user", "port", "key", "known_hosts") if k in hv}
        port = _port(conn.get("port", default_port), where)
        return Target(
            alias=alias, host=conn.get("host", alias), user=conn.get("user", default_user), port=port,
            key=conn.get("key"), known_hosts=conn.get("known_hosts"), vars=hv,
        )

    def resolve(self, selection: str, default_user: str = "root", default_port: int | str = 22) -> list[Target]:
        items = [s.strip() for s in (selection or "").split(",") if s.strip()]
        if not items:
            raise ProvisionError("no hosts selected; pass -H ALIAS, -H GROUP or -H user@host[:port]")
        default_port = _port(default_port, "the default port (`port` in fabric.yaml or FABRIC_PORT)")
        out: list[Target] = []
        for item in items:
            if item in self.hosts:
                found = [self.target(item, default_user, default_port)]
            elif self.is_group(item):
                aliases = self.group_hosts(item)
                if not aliases:
                    raise ProvisionError(f"group {item!r} has no hosts; add hosts under [{item}] in the inventory")
                found = [self.target(a, default_user, default_port) for a in aliases]
            else:
                found = [self._direct(item, default_user, default_port)]
            for t in found:
                if any((o.host, o.port) == (t.host, t.port) for o in out):
                    raise ProvisionError(f"host {t.host}:{t.port} is selected twice (via {item!r}); "
                                         "select each host once")
                out.append(t)
        return out

    def _direct(self, item: str, default_user: str, default_port: int) -> Target:
        m = ADDRESS_RE.fullmatch(item)
        if not m:
            raise ProvisionError(f"cannot read host {item!r}; use ALIAS, GROUP or user@host[:port]")
        host = m.group("host").strip("[]")
        looks_like_address = "@" in item or ":" in item or "." in host or _is_ip(host) or host == "localhost"
        if not looks_like_address:
            known = ", ".join(sorted(set(self.hosts) | {g for g in self.groups if self.groups[g]} |
                                     set(self.children))) or "none"
            where = (f"inventory {', '.join(self.sources)} defines: {known}" if self.sources else
                     f"no inventory file found: {', '.join(self.searched) or 'none given'}")
            raise ProvisionError(f"unknown host or group {item!r} ({where}); add it to inventory.ini "
                                 "or use user@host")
        port = _port(m.group("port"), f"host {item!r}") if m.group("port") else default_port
        # An address also listed in the inventory gets that host's vars.
        for alias in self.hosts:
            t = self.target(alias, default_user, default_port)
            if t.host == host and (m.group("port") is None or t.port == port):
                return Target(alias=alias, host=host, user=m.group("user") or t.user, port=port,
                              key=t.key, known_hosts=t.known_hosts, vars=t.vars)
        return Target(alias=item, host=host, user=m.group("user") or default_user, port=port)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False
