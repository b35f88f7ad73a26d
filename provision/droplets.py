"""``fab droplet.*``'s decisions, pure: the cloud-init user data a new droplet gets, the provider a
command means, the inventory line it adds or removes (the file's other lines and comments kept), the
known_hosts lines it records, and when ``droplet.destroy`` may go on. :mod:`provision.cli.droplet`
does the work; :mod:`provision.providers` talks to the providers.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from invoke.util import yaml

from .bootstrap import ssh_reload
from .errors import ProvisionError
from .inventory import ALIAS_RE, SECTION_RE
from .layout import SSH_HOST_KEY

PROVIDERS = ("sandbox", "digitalocean")
# A droplet's inventory line ends with this comment: which provider made it (droplet.destroy reads it back).
MARK = "# droplet:"
MARK_RE = re.compile(r"#\s*droplet:\s*provider=(?P<provider>[a-z]+)(?:\s+id=(?P<id>\S+))?")
PLAIN_WORD = re.compile(r"[\w@%+=:,./~-]+")  # an inventory word that needs no quotes
SUDOERS_RULE = "ALL=(ALL) NOPASSWD:ALL"


# -- cloud-init user data ------------------------------------------------------------------------
def user_data(deploy_user: str, public_keys: tuple[str, ...] | list[str], host_key: tuple[str, str] | None = None) -> str:
    """The #cloud-config document a new droplet boots with: ``deploy_user`` with ``public_keys`` and
    passwordless sudo, no password; with ``host_key`` (private PEM, public line), the ed25519 SSH host
    key the droplet's sshd uses, generated here so that its first connection is already checked (see
    the README: user data is readable from the droplet's metadata service). Rendered with YAML's
    safe dumper: a key comment with ``:`` or ``#`` in it stays data."""
    if not public_keys:
        raise ProvisionError(f"no public key to give {deploy_user}; pass --key KEY or list public key files in "
                             "app.deploy_keys")
    doc: dict = {
        "users": [{
            "name": deploy_user,
            "shell": "/bin/bash",
            "lock_passwd": True,
            "sudo": SUDOERS_RULE,
            "ssh_authorized_keys": list(public_keys),
        }],
    }
    if host_key is not None:
        private, public = host_key
        doc["ssh_deletekeys"] = True  # the image's own keys go: only the one recorded here is offered
        # ed25519 only: given above, so none is generated (cloud-init's schema refuses an empty list)
        doc["ssh_genkeytypes"] = ["ed25519"]
        doc["ssh_keys"] = {"ed25519_private": private, "ed25519_public": public}
    return "#cloud-config\n" + yaml.safe_dump(doc, default_flow_style=False, sort_keys=False)


def users_section(text: str) -> list[dict]:
    """The ``users`` of a #cloud-config document, each checked to be what :func:`user_data` writes (what
    the sandbox's root program applies, as cloud-init's users module would)."""
    if not text.startswith("#cloud-config\n"):
        raise ProvisionError("user data: not a #cloud-config document")
    doc = yaml.safe_load(text) or {}
    out = []
    for u in doc.get("users") or []:
        if not isinstance(u, dict) or not ALIAS_RE.fullmatch(str(u.get("name", ""))):
            raise ProvisionError(f"user data: a user entry without a valid name: {u!r}")
        out.append({"name": str(u["name"]), "shell": str(u.get("shell", "/bin/bash")),
                    "sudo": u.get("sudo") or None, "keys": [str(k) for k in u.get("ssh_authorized_keys") or []]})
    return out


# -- replacing a host key that user data gave --------------------------------------------------------
def rotate_host_key_command() -> str:
    """Run as root over a connection checked with the host key the user data gave: a new ed25519 key in
    its place (the old one kept as ``.old`` until :func:`rotate_cleanup_command` or
    :func:`rotate_undo_command`), sshd reloaded; prints the new public key. The old key stays readable
    from the metadata service, but nothing trusts it any more."""
    k = shlex.quote(SSH_HOST_KEY)
    # Any step failing after the copies puts the old key back (the trap) and reloads: sshd and the files agree.
    return (f"set -e; k={k}; rm -f \"$k.new\" \"$k.new.pub\"; ssh-keygen -q -t ed25519 -N '' -C '' -f \"$k.new\" "
            f">/dev/null; cp -p \"$k\" \"$k.old\"; cp -p \"$k.pub\" \"$k.old.pub\"; "
            f"trap 'cp -p \"$k.old\" \"$k\"; cp -p \"$k.old.pub\" \"$k.pub\"; {{ {ssh_reload()}; }} || true' EXIT; "
            f"mv \"$k.new\" \"$k\"; mv \"$k.new.pub\" \"$k.pub\"; {ssh_reload()}; trap - EXIT; cat \"$k.pub\"")


def rotate_cleanup_command() -> str:
    k = shlex.quote(SSH_HOST_KEY)
    return f"rm -f {k}.old {k}.old.pub"


def rotate_undo_command() -> str:
    k = shlex.quote(SSH_HOST_KEY)
    return f"mv {k}.old {k} && mv {k}.old.pub {k}.pub && {{ {ssh_reload()}; }}"


# -- providers -------------------------------------------------------------------------------------
def choose_provider(flag: str | None, recorded: str | None = None) -> str:
    """``--provider``, else the provider the inventory line records (droplet.destroy), else refused:
    creating a droplet at a cloud provider costs money, so it is never a guess."""
    name = (flag or recorded or "").strip().lower()
    if not name:
        raise ProvisionError(f"name the provider: --provider {' or --provider '.join(PROVIDERS)}")
    if name not in PROVIDERS:
        raise ProvisionError(f"unknown provider {name!r}; use one of: {', '.join(PROVIDERS)}")
    return name


# -- inventory.ini -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostLine:
    """A host's line in an inventory file: where it is, its words, the provider its comment records."""

    index: int  # line number, from 0
    section: str
    host: str | None  # its host= value
    provider: str | None
    droplet_id: str | None
    port: int = 22  # its port= value (a hashed known_hosts entry names its port: only then found)


def find_host(text: str, name: str) -> HostLine | None:
    """``name``'s host line in an inventory's ``text`` (a host section's, never a vars line), or None."""
    section, kind = "ungrouped", None
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = SECTION_RE.fullmatch(line)
        if m:
            section, kind = m.group(1), m.group(2)
            continue
        if kind is not None:
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # the inventory's own parser names that line
        if words and words[0] == name:
            pairs = dict(w.partition("=")[::2] for w in words[1:])
            mark = MARK_RE.search(line)
            port = pairs.get("port", "22")
            return HostLine(i, section, pairs.get("host"), mark and mark.group("provider"), mark and mark.group("id"),
                            int(port) if port.isdigit() else 22)
    return None


def recorded_providers(text: str) -> list[str]:
    """The providers the droplet lines of an inventory's ``text`` record, each once, in order."""
    found = (MARK_RE.search(line) for line in text.splitlines() if not line.lstrip().startswith(("#", ";")))
    return list(dict.fromkeys(m.group("provider") for m in found if m))


def without_created(sandbox_inventory: str, inventory: str) -> str:
    """The sandbox inventory's text without the droplets ``inventory`` has lines of ``droplet.create``'s
    for (read after it, the sandbox's root login would replace the deploy user's)."""
    lines = sandbox_inventory.splitlines()
    for line in list(lines):
        words = line.split()
        found = find_host(inventory, words[0]) if words and "=" in line and not line.startswith(("#", "[")) else None
        if found is not None and found.provider == "sandbox":
            lines.remove(line)
    return "\n".join(lines) + ("\n" if sandbox_inventory.endswith("\n") else "")


def host_line(name: str, address: str, user: str, key: str, known_hosts: str | None, provider: str,
              droplet_id: str, extra: dict | None = None) -> str:
    """The inventory line of a new droplet, its provider and id in a trailing comment."""
    words = [name, f"host={address}", f"user={user}", f"key={key}"]
    if known_hosts:
        words.append(f"known_hosts={known_hosts}")
    words += [f"{k}={v}" for k, v in (extra or {}).items()]
    return " ".join(w if PLAIN_WORD.fullmatch(w) else shlex.quote(w) for w in words) + \
        f"  {MARK} provider={provider} id={droplet_id}"


def check_name_free(text: str, name: str, replace: bool, address: str | None = None) -> None:
    """A name already in the inventory is refused, unless ``replace`` or (once known) the same address."""
    found = find_host(text, name)
    if found is None or replace or (address is not None and found.host == address):
        return
    raise ProvisionError(f"inventory already has a host {name!r} (host={found.host}); pick another --name, or pass "
                         "--replace to point that line at the new droplet")


def add_host(text: str, line: str, name: str, replace: bool, address: str, group: str = "droplets") -> str:
    """``text`` with ``line`` for host ``name``: in place of its old line (see :func:`check_name_free`),
    else at the end of ``[group]`` (the section made at the end of the file when missing). Every other
    line, comment and blank line is kept as it was."""
    check_name_free(text, name, replace, address)
    lines = text.splitlines()
    found = find_host(text, name)
    if found is not None:
        lines[found.index] = line
        return "\n".join(lines) + "\n"
    start = next((i for i, l in enumerate(lines) if l.strip() == f"[{group}]"), None)
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ([""] if lines else []) + [f"[{group}]", line]
        return "\n".join(lines) + "\n"
    end = start + 1  # after the group's last host line (its trailing comments and blank lines stay after)
    for i in range(start + 1, len(lines)):
        s = lines[i].strip()
        if s.startswith("["):
            break
        if s and s[0] not in "#;":
            end = i + 1
    lines.insert(end, line)
    return "\n".join(lines) + "\n"


def remove_host(text: str, name: str) -> str:
    """``text`` without host ``name``'s line (the rest as it was); unchanged when it has none."""
    found = find_host(text, name)
    if found is None:
        return text
    lines = text.splitlines()
    del lines[found.index]
    return "\n".join(lines) + ("\n" if lines else "")


# -- known_hosts -------------------------------------------------------------------------------------
def known_hosts_name(address: str, port: int = 22) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def _names_host(name: str, hosts: tuple[str, ...], any_port_of: str | None) -> bool:
    """A known_hosts host pattern ``name`` names one of ``hosts`` (a hashed ``|1|SALT|HASH`` one too, as
    OpenSSH's HashKnownHosts writes it), or, with ``any_port_of``, that address at any port."""
    if name.startswith("|1|"):
        import paramiko

        salt = name.split("|")[2] if name.count("|") >= 3 else ""
        return any(paramiko.HostKeys.hash_host(h, salt) == name for h in hosts)
    if name in hosts:
        return True
    return any_port_of is not None and name.startswith(f"[{any_port_of}]:")


def _without(text: str, hosts: tuple[str, ...], any_port_of: str | None = None) -> list[str]:
    """known_hosts ``text``'s lines, ``hosts`` taken out of each: a line naming only them goes, a line
    naming others too (``addr,web1``) keeps the others. Markers (@revoked, @cert-authority) are kept."""
    out = []
    for line in text.splitlines():
        first, sep, rest = line.partition(" ")
        if not sep or line.startswith(("#", "@")):
            out.append(line)
            continue
        names = first.split(",")
        keep = [n for n in names if not _names_host(n, hosts, any_port_of)]
        if len(keep) == len(names):
            out.append(line)
        elif keep:
            out.append(",".join(keep) + " " + rest)
    return out


def record_keys(text: str, address: str, keys: tuple[str, ...] | list[str], port: int = 22) -> str:
    """known_hosts ``text`` with ``address``'s lines replaced by ``keys`` ("TYPE BASE64" each): the
    provider just gave this address to a new droplet, so an older key for it is stale, hashed or in a
    list of names too."""
    name = known_hosts_name(address, port)
    hosts = (name,) if port != 22 else (name, f"[{address}]:22")
    keep = _without(text, hosts)
    return "".join(l + "\n" for l in keep + [f"{name} {k}" for k in keys])


def forget_keys(text: str, address: str, ports: tuple[int, ...] = ()) -> str:
    """known_hosts ``text`` without ``address``'s keys at any port; hashed ones (which hide their port)
    at port 22 and at ``ports``."""
    hosts = (address, *(f"[{address}]:{p}" for p in dict.fromkeys((22, *ports))))
    return "".join(l + "\n" for l in _without(text, hosts, any_port_of=address))


def names_address(text: str, address: str) -> bool:
    """Whether known_hosts ``text`` has a key for ``address`` (port 22), hashed or in a list of names."""
    return _without(text, (address, f"[{address}]:22")) != text.splitlines()


# -- confirmation ----------------------------------------------------------------------------------------
def confirm_rule(yes: bool, interactive: bool) -> str:
    """How ``droplet.destroy`` goes on: ``go`` (--yes), ``ask`` (a terminal to ask on), or ``refuse``."""
    if yes:
        return "go"
    return "ask" if interactive else "refuse"


def confirmed(answer: str, name: str) -> bool:
    """The user typed the droplet's name (a `y` is too easy to give by habit)."""
    return answer.strip() == name
