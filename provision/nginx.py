"""The app's nginx site, beside the other sites enabled on the host.

Planning refuses a site that clashes with another enabled one: both the default server of a port
(nginx refuses to start), or both serving a server_name on the same port (nginx ignores the second).
Applying writes and enables the site, then runs ``nginx -t``: when nginx refuses the result, the
previous site file and link come back (or the new ones go), so a deploy never leaves nginx with a
configuration it refuses to start with.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from .errors import ProvisionError
from .layout import NGINX_DEFAULT_SITE, Layout
from .steps import Change, File, symlink_commands

q = shlex.quote
MANAGED = "# Managed by provision"  # the first line of provision's site template
NGINX_CHECK = "nginx -t -q"  # nginx tests its whole configuration, quietly
TOKEN_RE = re.compile(r"""#[^\n]*|"[^"]*"|'[^']*'|[{};]|[^\s{};"']+""")  # a comment, a word, or { } ;


@dataclass(frozen=True)
class Server:
    """What a server block listens on: its ports, those it is the default server of, its names."""

    ports: frozenset[str]
    default_ports: frozenset[str]
    names: frozenset[str]


def port(address: str) -> str:
    """The port of a ``listen`` address: 80, [::]:80, 127.0.0.1:8080, localhost (80)."""
    if address.startswith("unix:"):
        return address
    tail = address.rsplit(":", 1)[-1]
    return tail if tail.isdigit() else "80"


def servers(text: str) -> list[Server]:
    """The server blocks of a site file (nginx includes it inside its http block)."""
    out: list[Server] = []
    blocks: list[str] = []  # the blocks the parser is in, by name
    words: list[str] = []  # the directive being read
    listen: list[list[str]] = []
    names: list[str] = []
    for token in TOKEN_RE.findall(text):
        if token.startswith("#"):
            continue
        if token not in ("{", "}", ";"):
            words.append(token.strip("\"'"))
            continue
        if token == "{":
            blocks.append(words[0] if words else "")
            if blocks == ["server"]:
                listen, names = [], []
        elif token == "}":
            if blocks == ["server"]:
                listen = listen or [["80"]]  # nginx's default
                out.append(Server(
                    frozenset(port(a[0]) for a in listen),
                    frozenset(port(a[0]) for a in listen if {"default_server", "default"} & set(a[1:])),
                    frozenset(n.lower() for n in names if n != "_")))  # _ is no name, only a placeholder
            blocks = blocks[:-1]
        elif blocks == ["server"] and words[:1] == ["listen"] and len(words) > 1:
            listen.append(words[1:])
        elif blocks == ["server"] and words[:1] == ["server_name"]:
            names += words[1:]
        words = []
    return out


def clash(mine: list[Server], theirs: list[Server]) -> str | None:
    """Why two sites cannot be enabled together (and the fix), or None."""
    for a in mine:
        for b in theirs:
            defaults = sorted(a.default_ports & b.default_ports)
            if defaults:
                return f"are both nginx's default server for port {defaults[0]}; give one of them a server_name"
            shared = sorted((p, name) for p in a.ports & b.ports for name in a.names & b.names)
            if shared:
                return f"both serve {shared[0][1]} on port {shared[0][0]}; give one of them another server_name"
    return None


class Site(File):
    """The app's site (``sites-available/<app>``), enabled by a link in ``sites-enabled``: refused
    while planning when it clashes with another enabled site, put back when nginx refuses it."""

    def __init__(self, layout: Layout, content: bytes):
        super().__init__(layout.site, content, notify=("nginx",))
        self.app, self.enabled, self.link = layout.name, layout.sites_enabled, layout.site_enabled
        self.backup = layout.site_backup

    def facts(self):
        return super().facts() + [("file", self.link), ("files", self.enabled)]

    def refuse_clashes(self, enabled: dict[str, str | None]) -> None:
        mine = servers(self.content.decode("utf-8", "replace"))
        for name, text in sorted(enabled.items()):
            if name in (self.app, NGINX_DEFAULT_SITE) or text is None:
                continue
            why = clash(mine, servers(text))
            if why:
                other = f"{self.enabled}/{name}"
                other = f"app {name} ({other})" if text.startswith(MANAGED) else f"{other} (not deployed by provision)"
                raise ProvisionError(f"app {self.app} and {other} {why} (app.server_name)")

    def plan(self, facts, notified):
        self.refuse_clashes(facts.files(self.enabled) or {})
        write = super().plan(facts, notified)
        link = facts.file(self.link)
        enable = not (link and link["type"] == "link" and link["target"] == self.path)
        if write is None and not enable:
            return None
        commands = (write.commands if write else []) + (symlink_commands(self.link, self.path) if enable else [])
        summary = ", ".join(w for w in (write and write.summary, enable and "enable") if w)
        return Change(nginx_tested(commands, [self.path, self.link], self.backup), summary=summary)


def nginx_tested(commands: list[str], paths: list[str], backup: str) -> list[str]:
    """``commands``, which change ``paths`` (absolute), then ``nginx -t``. When nginx refuses the
    result, each path is put back as it was (removed when it was not there) and the step fails with
    nginx's message. ``backup`` (a directory in one only root writes) keeps the previous paths meanwhile."""
    each = f"for __p in {' '.join(q(p) for p in paths)}; do"
    return [
        f'__old={q(backup)}; rm -rf "$__old" && mkdir -m 700 "$__old"',
        f'{each} if [ -e "$__p" ] || [ -L "$__p" ]; then mkdir -p "$__old${{__p%/*}}" && cp -a "$__p" "$__old$__p"; '
        "fi; done",
        *commands,
        f'if ! __nginx=$({NGINX_CHECK} 2>&1); then {each} rm -rf "$__p"; '
        'if [ -e "$__old$__p" ] || [ -L "$__old$__p" ]; then mv "$__old$__p" "$__p"; fi; done; '
        'rm -rf "$__old"; echo "$__nginx" >&2; exit 1; fi',
        'rm -rf "$__old"',
    ]
