"""Releases: upload, blue/green switch, pruning. Pure steps; the switch itself runs
``remote/switch.py`` on the host.

Where each piece lives on the host: :mod:`provision.layout`.
"""

from __future__ import annotations

import hashlib
import json
import shlex

from . import secrets
from .config import Settings
from .layout import RELEASE_DIR, RELEASE_ENV, SLOTS, TMP, UPSTREAM_HEADER, VENV
from .errors import ProvisionError
from .history import History
from .remote import python, switch_command
from .source import LINK_TAG, Source
from .upload import Upload, megabytes
from .facts import Facts, below
from .steps import HIDDEN, Change, Step, shown_diff, symlink_commands, unified_diff

q = shlex.quote
SHOWN_LINES, SHOWN_IN_ALL = 200, 1000  # diff lines a dry run shows of one app file, and of all
SHOWN_CONFIGS = (RELEASE_ENV, "release_command")  # a release's own files whose changes a dry run shows


META, MANIFEST = "release.json", "manifest.json"  # in a release's own directory


def meta_path(s: Settings) -> str:
    return s.layout.live(META)


def manifest_path(s: Settings) -> str:
    return s.layout.live(MANIFEST)



def _live_json(s: Settings, facts: Facts, path: str) -> dict | None:
    """A JSON object the live release keeps in its own directory; None when there is none."""
    own = facts.file(f"{s.layout.current}/{RELEASE_DIR}")
    if not own or own["type"] != "dir" or own["owner"] != "root":
        return None  # not a release root made (an older layout, or tampered with)
    raw = facts.content(path)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:  # also a manifest cut at the fact gatherer's MAX_CONTENT
        return None
    return value if isinstance(value, dict) else None


def live_meta(s: Settings, facts: Facts) -> dict:
    return _live_json(s, facts, meta_path(s)) or {}  # {}: a new release is due


def live_files(s: Settings, facts: Facts) -> dict[str, str] | None:
    """The live release's files, each with its sha256: {} on a host with no release; None when not
    known (a release made before manifests were, or one whose manifest is over 1 MiB)."""
    if facts.file(s.layout.current) is None:
        return {}
    return _live_json(s, facts, manifest_path(s))


def release_files(s: Settings, source: Source) -> dict[str, str]:
    """The source files a release holds, each with its sha256 (``+x`` after an executable's): not
    those that its links (to shared/, the virtualenv) or its own directory take the place of."""
    replaced = (*s.linked_files, *s.linked_dirs, VENV, RELEASE_DIR)
    return {p: h + ("+x" if source.executable(p) else "") for p, h in source.hashes.items()
            if not any(p == r or p.startswith(r + "/") for r in replaced)}


def as_text(data: bytes) -> str | None:
    """``data`` as text; None when it is binary (a NUL byte, or not UTF-8)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def no_content(path: str, data: bytes) -> str:
    """Why a dry run shows none of a file's new content, whatever the old one: "" when it may show it."""
    text = as_text(data)
    if secrets.looks_secret(path) or (text is not None and secrets.holds_secret(text)):
        return HIDDEN
    return f"(binary, {len(data)} bytes)" if text is None else ""


def linked_release(facts: Facts, path: str) -> str | None:
    """The release a link (``current``, ``slots/a``) points at."""
    f = facts.file(path)
    return f["target"].rstrip("/").rsplit("/", 1)[-1] if f and f["type"] == "link" else None


def current_release(s: Settings, facts: Facts) -> str | None:
    return linked_release(facts, s.layout.current)


def config_digest(configs: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(configs):
        h.update(name.encode() + b"\0" + configs[name] + b"\0")
    return h.hexdigest()[:16]


class Release(Step):
    """Upload the source and its configs as ``releases/<id>`` (not live yet: :class:`Switch` does that).

    Nothing to do when the live release has the same source, configs and virtualenv.
    A ``current`` that is a plain directory (a hand-made deploy) is kept as a
    release of its own first. Everything is written by root into a directory only root
    can write; the app reads it.
    """

    notify = ("code",)

    def __init__(self, s: Settings, source: Source, release_id: str, venv_key: str, configs: dict[str, bytes],
                 deployer: str = ""):
        self.s, self.source, self.release_id, self.venv_key = s, source, release_id, venv_key
        self.configs, self.deployer = configs, deployer
        self.config = config_digest(configs)
        self.files = release_files(s, source)
        self.live = s.layout.current
        self.linked = {"files": list(s.linked_files), "dirs": list(s.linked_dirs)}  # what links to shared/
        self.reuse = True  # start from the live release's files on the host (see base)

    @property
    def name(self):
        return f"release {self.s.layout.releases}"

    def facts(self):
        return [("content", meta_path(self.s)), ("content", manifest_path(self.s)),
                ("file", f"{self.live}/{RELEASE_DIR}"), ("file", self.live)]

    def needed(self, facts: Facts) -> bool:
        meta = live_meta(self.s, facts)
        # (a release made before releases recorded their links is taken to have these)
        return (meta.get("digest"), meta.get("venv"), meta.get("config"), meta.get("linked", self.linked)) != (
            self.source.digest, self.venv_key, self.config, self.linked)

    def target(self, facts: Facts) -> str:
        """The release that should be live after this deploy."""
        if self.needed(facts):
            return self.release_id
        return live_meta(self.s, facts).get("id") or current_release(self.s, facts) or self.release_id

    def changes(self, facts: Facts) -> tuple[list[str], list[str], list[str]] | None:
        """This release's files changed, added and removed against the live release's; None when
        the live release's are not known."""
        live = live_files(self.s, facts)
        if live is None:
            return None
        return ([p for p, h in self.files.items() if p in live and live[p] != h],
                [p for p in self.files if p not in live], sorted(p for p in live if p not in self.files))

    def base(self, facts: Facts) -> tuple[str, dict[str, str]] | None:
        """The live release the new one starts from (its id and files), when it may: provision
        made it and its manifest is known. Its files that the new release has too are taken from
        it on the host (hard links); only the others are sent."""
        live, rid = live_files(self.s, facts), current_release(self.s, facts)
        if not self.reuse or not live or not rid:
            return None
        return rid, live

    def plan(self, facts, notified):
        if not self.needed(facts):
            return None
        s, lay = self.s, self.s.layout
        rel = lay.release(self.release_id)
        tmp = rel + TMP
        cmds = []
        cur = facts.file(lay.current)
        if cur is not None and cur["type"] == "dir":
            legacy = lay.release(f"{self.release_id.split('-')[0]}-legacy")
            cmds.append(f"mv -T {q(lay.current)} {q(legacy)}")
        meta = json.dumps({"id": self.release_id, "digest": self.source.digest, "revision": self.source.revision,
                           "dirty": self.source.dirty, "deployer": self.deployer, "venv": self.venv_key,
                           "config": self.config, "linked": self.linked}, sort_keys=True)
        base = self.base(facts)
        base_id, kept = base or (None, {})
        send = tuple(p for p, h in self.files.items() if kept.get(p) != h)
        manifest = json.dumps(self.files, indent=0, sort_keys=True).encode() + b"\n"
        own = {**self.configs, MANIFEST: manifest, META: meta.encode() + b"\n"}
        upload = Upload(self.source, send, tuple((f"{RELEASE_DIR}/{n}", d) for n, d in sorted(own.items())))
        cmds += [
            f"rm -rf {q(tmp)} && mkdir -p {q(tmp)}",
            # this release's own files and those the base lacks: the stream sent beside the script
            f'tar -xz --no-same-owner -C {q(tmp)} -f "$__upload"',
            f"chmod 755 {q(tmp + '/' + RELEASE_DIR)}",
            python("release_tree.py", {
                "tmp": tmp, "manifest": f"{tmp}/{RELEASE_DIR}/{MANIFEST}", "link_tag": LINK_TAG.hex(),
                "base": lay.release(base_id) if base_id else None,
                "base_manifest": f"{lay.release(base_id)}/{RELEASE_DIR}/{MANIFEST}" if base_id else None}),
            f"ln -sfn {q(lay.venv_link(self.venv_key))} {q(tmp + '/' + VENV)}",
        ]
        # shared/ files and dirs outlive releases (the layout steps make them); each release links to them
        for path in s.linked_files + s.linked_dirs:
            inside = q(f"{tmp}/{path}")
            cmds += [f'mkdir -p "$(dirname {inside})"',
                     f"rm -rf {inside} && ln -s {q(lay.shared + '/' + path)} {inside}"]
        cmds += [
            f"chmod -R go-w {q(tmp)}",
            f"rm -rf {q(rel)} && mv -T {q(tmp)} {q(rel)}",
        ]
        changes = self.changes(facts)
        compared = ("files not compared (the live release has no readable manifest)" if changes is None else
                    "{} changed, {} added, {} removed".format(*map(len, changes)))
        sent = f"sent {len(send)} file{'s' * (len(send) != 1)} ({megabytes(upload.raw_size)})" + (
            f", {len(self.files) - len(send)} kept from {base_id}" if len(send) < len(self.files) else "")
        return Change(cmds, summary=f"{self.release_id} ({len(self.source.files)} files), {compared}; {sent}",
                      upload=upload)

    def _new(self, path: str) -> bytes:
        return self.source.path(path).read_bytes()

    def diff_facts(self, facts):
        changes = self.changes(facts)
        own = [("content", self.s.layout.live(name)) for name in SHOWN_CONFIGS if name in self.configs]
        if changes is None:
            return own
        return [below(self.live, p) for p in changes[0] if p not in self.source.links and not no_content(p, self._new(p))] + own

    def show_diff(self, facts, more):
        """Each changed, added and removed file on a line; below a changed or added text file its
        unified diff, cut at SHOWN_LINES lines, and at SHOWN_IN_ALL for all files together."""
        changes = self.changes(facts)
        if changes is None:
            return "\n".join(self.config_diffs(more))
        changed, added, removed = changes
        out, room = [], SHOWN_IN_ALL
        for status, paths in (("changed", changed), ("added", added)):
            for path in paths:
                link = self.source.links.get(path)
                new, old = (b"", None) if link else (self._new(path), None)
                note = f"(a link to {link})" if link else no_content(path, new)
                if not note and status == "changed":
                    old = more.content_below(self.live, path)
                    if old is None:
                        note = "(no diff: the live copy is binary, over 1 MiB or unreadable)"
                    elif secrets.holds_secret(old):
                        note = HIDDEN
                out.append(f"{status:<7} {path}" + (f" {note}" if note else ""))
                diff = [] if note else unified_diff(path, old, new.decode("utf-8"))
                shown = min(len(diff), SHOWN_LINES, room)
                room -= shown
                out += diff[:shown] + ([f"... {len(diff) - shown} more lines"] if shown < len(diff) else [])
        out += [f"removed {p}" for p in removed]
        return "\n".join(out + self.config_diffs(more))

    def config_diffs(self, more) -> list[str]:
        """The diff of each of SHOWN_CONFIGS (the plain environment, the release command) against the
        live release's."""
        out = []
        for name in SHOWN_CONFIGS:
            if name in self.configs:
                old, new = more.content(self.s.layout.live(name)), self.configs[name].decode("utf-8", "replace")
                if (old or "") != new:
                    out += shown_diff(f"{RELEASE_DIR}/{name}", old, new, False).rstrip("\n").split("\n")
        return out


def live_slot(s: Settings, facts: Facts) -> str | None:
    return s.layout.live_slot(facts.content(s.layout.upstream_file))


def slot_release(s: Settings, facts: Facts, slot: str) -> str | None:
    return linked_release(facts, s.layout.slot_link(slot))




class Switch(Step):
    """Make ``target`` the live release without dropping a request (blue/green slots).

    Switches when there is no live instance, it is not running, or it runs another release
    (a changed unit or gunicorn config is a new release). Otherwise only repairs a ``current``
    link or a second instance left running or enabled by an interrupted deploy.
    """

    barrier = True
    notify = ("switched",)

    def __init__(self, s: Settings, target: str | None, action: str = "deploy", by: str = "",
                 restart_on: tuple[str, ...] = ("socket",), daemon_reload_on: tuple[str, ...] = ("unit",),
                 prove: bool = False):
        self.s, self.target, self.action, self.by, self.prove = s, target, action, by, prove
        self.restart_on, self.daemon_reload_on = restart_on, daemon_reload_on

    @property
    def name(self):
        return f"switch {self.s.name}"

    def units(self) -> dict[str, str]:
        return {slot: self.s.layout.unit(slot) for slot in SLOTS}

    def facts(self):
        s = self.s
        return [("content", s.layout.upstream_file), ("file", s.layout.current),
                *[("file", s.layout.slot_link(slot)) for slot in SLOTS],
                *[("file", f"{s.layout.wants}/{u}.service") for u in self.units().values()],
                *[("service", u) for u in self.units().values()]]

    def plan(self, facts, notified):
        s, target = self.s, self.target
        live = live_slot(s, facts)
        state = facts.service(self.units()[live]) if live else None
        running = bool(state and state["active"])
        if live is None or not running or slot_release(s, facts, live) != target or notified & set(self.restart_on):
            slot = "b" if live == "a" else "a"
            health = {"path": s.health_path, "host": host_header(s), "timeout": s.health_timeout,
                      "header": UPSTREAM_HEADER if self.prove else None}
            return Change([switch_command(s.layout, target, slot, live, self.action, self.by, health,
                                          bool(notified & set(self.daemon_reload_on)))],
                          summary=f"{target} -> slot {slot}")
        cmds = []
        if current_release(s, facts) != target:
            cmds += symlink_commands(s.layout.current, s.layout.current_target(target))
        other = self.units()["b" if live == "a" else "a"]
        other_state = facts.service(other)
        wants, sockets_wants = s.layout.wants, s.layout.sockets_wants
        if (other_state and other_state["active"]) or facts.file(f"{wants}/{other}.service"):
            cmds += [f"rm -f {q(f'{wants}/{other}.service')} {q(f'{sockets_wants}/{other}.socket')}",
                     f"systemctl stop {q(other + '.socket')} {q(other + '.service')}"]
        return Change(cmds, summary="repair") if cmds else None


def host_header(s: Settings) -> str:
    return "" if s.server_name == "_" else s.server_name.split()[0].replace("*", "www")



def releases_on_host(s: Settings, facts: Facts) -> list[str]:
    return sorted(n for n in (facts.ls(s.layout.releases) or []) if not n.endswith(TMP))


class Prune(Step):
    """Keep the newest ``keep_releases`` releases, never the live or the previous one; releases
    that never went live (refused, interrupted) go first: they keep only the room left. Partial
    uploads and virtualenvs no kept release uses go too."""

    def __init__(self, s: Settings, target: str | None):
        self.s, self.target = s, target

    @property
    def name(self):
        return f"prune {self.s.layout.releases}"

    def facts(self):
        return [("ls", self.s.layout.releases), ("file", self.s.layout.current), ("content", self.s.layout.release_log)]

    def doomed(self, facts: Facts) -> list[str]:
        names = facts.ls(self.s.layout.releases) or []
        partial = [n for n in names if n.endswith(TMP)]
        history = History.read(facts.content(self.s.layout.release_log))
        releases = releases_on_host(self.s, facts)
        target, previous = self.target, current_release(self.s, facts)
        went_live = sorted({r for r in releases if history.state(r) == "went live"} | {target})
        keep = set(went_live[-self.s.keep_releases:]) | ({previous} if previous else set())
        never = [r for r in releases if r not in keep and r not in went_live]
        room = max(0, self.s.keep_releases - len(keep))  # never-live ones go first: they get what is left
        keep |= set(never[max(0, len(never) - room):]) if room else set()
        return partial + [r for r in never if r not in keep] + [r for r in went_live if r not in keep]

    def plan(self, facts, notified):
        doomed = self.doomed(facts)
        if not doomed and "switched" not in notified:
            return None
        lay = self.s.layout
        cmds = [f"rm -rf {' '.join(q(lay.release(d)) for d in doomed)}"] if doomed else []
        # A virtualenv stays while any release links to it (rollbacks need theirs).
        cmds.append(
            f"for v in {q(lay.venvs)}/*/; do [ -d \"$v\" ] || continue; k=$(basename \"$v\"); "
            f"used=; for l in {q(lay.releases)}/*/{VENV}; do "
            '[ "$(basename "$(readlink "$l")")" = "$k" ] '
            f"&& used=1 && break; done; [ -n \"$used\" ] || rm -rf \"$v\"; done"
        )
        return Change(cmds, summary=f"remove {len(doomed)}" if doomed else "unused virtualenvs")


def rollback_facts(s: Settings) -> list:
    return [("ls", s.layout.releases), ("content", s.layout.release_log), ("file", s.layout.current)]


def rollback_target(s: Settings, facts: Facts, to: str | None) -> str:
    """``to``, or the release that was live before the live one (from the release log)."""
    releases = releases_on_host(s, facts)
    if to:
        if to not in releases:
            raise ProvisionError(f"no release {to!r} on the host; `fab releases` lists them")
        return to
    earlier = History.read(facts.content(s.layout.release_log)).before(current_release(s, facts), releases)
    if not earlier:
        raise ProvisionError("no release that was live before the live one is left on the host; "
                             "`fab releases` lists them (roll back to one with --to ID)")
    return earlier
