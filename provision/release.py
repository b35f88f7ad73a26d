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


def _live_json(s: Settings, facts: Facts, path: str, own_dir: str | None = None) -> dict | None:
    """A JSON object the live release (or the one whose own directory is ``own_dir``) keeps in its
    own directory; None when there is none."""
    own = facts.file(own_dir or f"{s.layout.current}/{RELEASE_DIR}")
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


def slot_meta(s: Settings, facts: Facts, slot: str) -> dict:
    """The release.json of the release a slot runs; {} when it has none (or not root's)."""
    return _live_json(s, facts, s.layout.in_slot(slot, META), s.layout.in_slot(slot)) or {}


def slot_facts(s: Settings) -> list:
    """What tells which release each slot runs, and which one is live."""
    lay = s.layout
    return [("content", lay.upstream_file),
            *[f for slot in SLOTS for f in (("content", lay.in_slot(slot, META)),
                                            ("file", lay.in_slot(slot)), ("file", lay.slot_link(slot)))]]


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
                 deployer: str = "", origin: dict | None = None):
        self.s, self.source, self.release_id, self.venv_key = s, source, release_id, venv_key
        self.configs, self.deployer, self.origin = configs, deployer, origin or {}
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
                ("file", f"{self.live}/{RELEASE_DIR}"), ("file", self.live), *slot_facts(self.s)]

    def same(self, meta: dict) -> bool:
        """A release with this ``meta`` holds what this one would: source, virtualenv, configs, links.
        (Release ids hold the time they were made: content decides, never the id.)"""
        # (a release made before releases recorded their links is taken to have these)
        return (meta.get("digest"), meta.get("venv"), meta.get("config"), meta.get("linked", self.linked)) == (
            self.source.digest, self.venv_key, self.config, self.linked)

    def prepared(self, facts: Facts) -> str | None:
        """A release that is not live but holds what this one would, in the idle slot (a deploy
        prepared it and was interrupted, or a fleet's prepare stage): used instead of a new upload."""
        if self.same(live_meta(self.s, facts)):
            return None
        live = live_slot(self.s, facts)
        for slot in SLOTS:
            meta = slot_meta(self.s, facts, slot)
            if slot != live and meta.get("id") == slot_release(self.s, facts, slot) and self.same(meta):
                return meta["id"]
        return None

    def needed(self, facts: Facts) -> bool:
        return not self.same(live_meta(self.s, facts)) and not self.prepared(facts)

    def target(self, facts: Facts) -> str:
        """The release that should be live after this deploy."""
        if self.needed(facts):
            return self.release_id
        return (self.prepared(facts) or live_meta(self.s, facts).get("id") or current_release(self.s, facts)
                or self.release_id)

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
                           "config": self.config, "linked": self.linked,
                           **({"origin": self.origin} if self.origin else {})}, sort_keys=True)
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
        ]
        if not s.container:  # a container app's image holds its dependencies
            cmds.append(f"ln -sfn {q(lay.venv_link(self.venv_key))} {q(tmp + '/' + VENV)}")
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

    ``stage`` (a fleet deployed as one transaction; see remote/switch.py): ``all`` does it all;
    ``prepare`` only starts ``target`` in the idle slot and passes its health gate; ``commit``
    moves traffic to it (not restarting what a prepare started) and keeps the old instance
    running; ``revert`` goes back to the release the idle slot still runs, stopping the other.
    """

    barrier = True
    notify = ("switched",)

    def __init__(self, s: Settings, target: str | None, action: str = "deploy", by: str = "",
                 restart_on: tuple[str, ...] = ("socket",), daemon_reload_on: tuple[str, ...] = ("unit",),
                 prove: bool = False, stage: str = "all", log: dict | None = None):
        self.s, self.target, self.action, self.by, self.prove = s, target, action, by, prove
        self.log = log or {}  # more for the release log's line (where the release came from: commit, tests)
        self.restart_on, self.daemon_reload_on, self.stage = restart_on, daemon_reload_on, stage

    @property
    def name(self):
        return f"{'prepare' if self.stage == 'prepare' else 'switch'} {self.s.name}"

    def units(self) -> dict[str, str]:
        return {slot: self.s.layout.unit(slot) for slot in SLOTS}

    def facts(self):
        s = self.s
        return [("content", s.layout.upstream_file), ("file", s.layout.current),
                *[("file", s.layout.slot_link(slot)) for slot in SLOTS],
                *[("file", f"{s.layout.wants}/{u}.service") for u in self.units().values()],
                *[("service", u) for u in self.units().values()]]

    def due(self, facts: Facts, notified: set[str] = frozenset()) -> bool:
        """Traffic has to move: no live instance, it is not running, or it runs another release."""
        live = live_slot(self.s, facts)
        state = facts.service(self.units()[live]) if live else None
        return (live is None or not (state and state["active"]) or slot_release(self.s, facts, live) != self.target
                or bool(notified & set(self.restart_on)))

    def plan(self, facts, notified):
        s, target = self.s, self.target
        live = live_slot(s, facts)
        if self.due(facts, notified):
            slot = "b" if live == "a" else "a"
            health = {"path": s.health_path, "host": host_header(s), "timeout": s.health_timeout,
                      "header": UPSTREAM_HEADER if self.prove else None}
            return Change([switch_command(s.layout, target, slot, live, self.action, self.by, health,
                                          bool(notified & set(self.daemon_reload_on)),
                                          stage=self.stage, log=self.log, engine=s.engine if s.container else None)],
                          summary=f"{target} -> slot {slot}" + (" (traffic stays)" if self.stage == "prepare" else ""))
        cmds = []
        if current_release(s, facts) != target:
            cmds += symlink_commands(s.layout.current, s.layout.current_target(target))
        cmds += stop_idle(s, facts, live)
        return Change(cmds, summary="repair") if cmds else None


def stop_idle(s: Settings, facts: Facts, live: str | None, wait: bool = True) -> list[str]:
    """Commands that stop (and disable at boot) every instance but the live slot's: one left
    running by an interrupted deploy, the old release a fleet kept until all hosts switched, or
    a release prepared for a transaction that was called off. ``wait``: until it has stopped
    (else it finishes the requests it has, gracefully, after the command returned)."""
    wants, sockets_wants = s.layout.wants, s.layout.sockets_wants
    cmds = []
    for slot in SLOTS:
        if slot == live:
            continue
        unit = s.layout.unit(slot)
        state = facts.service(unit)
        if (state and state["active"]) or facts.file(f"{wants}/{unit}.service"):
            socket = "" if s.container else f" {q(unit + '.socket')}"  # a container app's slots have no socket
            cmds += [f"rm -f {q(f'{wants}/{unit}.service')} {q(f'{sockets_wants}/{unit}.socket')}",
                     f"systemctl stop{'' if wait else ' --no-block'}{socket} {q(unit + '.service')}"]
    return cmds


class StopIdle(Step):
    """Only the live slot runs: the end of a fleet transaction on a host (the old release once
    every host switched; the prepared one when the fleet called it off). No request reaches
    them: they stop gracefully without holding up the deploy."""

    def __init__(self, s: Settings):
        self.s = s

    @property
    def name(self):
        return f"idle slot {self.s.name}"

    def facts(self):
        return Switch(self.s, None).facts()

    def plan(self, facts, notified):
        cmds = stop_idle(self.s, facts, live_slot(self.s, facts), wait=False)
        return Change(cmds, summary="stop") if cmds else None


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
        if self.s.container:
            # the images of releases no longer here go with them (one a container still runs stays)
            engine, repo = self.s.engine, lay.image_repo
            cmds.append(f"for t in $({engine} images --format '{{{{.Tag}}}}' {q(repo)}); do "
                        f'[ -d {q(lay.releases)}/"$t" ] || {engine} rmi {q(repo)}:"$t" >/dev/null 2>&1 || true; done')
        return Change(cmds, summary=f"remove {len(doomed)}" if doomed else
                      "unused images" if self.s.container else "unused virtualenvs")


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
