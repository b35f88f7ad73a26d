"""Releases: upload, blue/green switch, pruning. Pure steps; the switch itself runs
``remote/switch.py`` on the host.

Layout under ``/srv/<app>``::

    releases/<id>/        code, .provision-release (metadata), .venv -> venvs/<key>,
                          linked files/dirs -> shared/
    venvs/<key>/          one virtualenv per distinct requirements
    shared/               .env, log/, uploads/ ... kept across releases
    slots/{a,b}           -> ../releases/<id>: what each gunicorn instance runs
    current               -> releases/<id>: the release nginx sends traffic to
    releases.log          who deployed or rolled back what, when
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from importlib import resources
from typing import Callable

from .config import Settings
from .errors import ProvisionError
from .source import Source
from .steps import Change, Facts, Step, symlink_commands

q = shlex.quote
SWITCH_PY = resources.files("provision").joinpath("remote/switch.py").read_text()
SLOTS = ("a", "b")


def meta_path(s: Settings) -> str:
    return f"{s.root}/current/.provision-release"


def live_meta(s: Settings, facts: Facts) -> dict:
    raw = facts.content(meta_path(s))
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}


def linked_release(facts: Facts, path: str) -> str | None:
    """The release a link (``current``, ``slots/a``) points at."""
    f = facts.file(path)
    return f["target"].rstrip("/").rsplit("/", 1)[-1] if f and f["type"] == "link" else None


def current_release(s: Settings, facts: Facts) -> str | None:
    return linked_release(facts, f"{s.root}/current")


class Release(Step):
    """Upload the source as ``releases/<id>`` (not live yet: :class:`Switch` does that).

    Nothing to do when the live release has the same source digest and virtualenv.
    A ``current`` that is a plain directory (a hand-made deploy) is kept as a
    release of its own first.
    """

    notify = ("code",)

    def __init__(self, s: Settings, source: Source, release_id: str, venv_key: str, deployer: str = ""):
        self.s, self.source, self.release_id, self.venv_key, self.deployer = s, source, release_id, venv_key, deployer

    @property
    def name(self):
        return f"release {self.s.root}/releases"

    def facts(self):
        return [("content", meta_path(self.s)), ("file", f"{self.s.root}/current")]

    def needed(self, facts: Facts) -> bool:
        meta = live_meta(self.s, facts)
        return not (meta.get("digest") == self.source.digest and meta.get("venv") == self.venv_key)

    def target(self, facts: Facts) -> str:
        """The release that should be live after this deploy."""
        if self.needed(facts):
            return self.release_id
        return live_meta(self.s, facts).get("id") or current_release(self.s, facts) or self.release_id

    def plan(self, facts, notified):
        if not self.needed(facts):
            return None
        s, root = self.s, self.s.root
        rel = f"{root}/releases/{self.release_id}"
        tmp = rel + ".provision-tmp"
        owner = f"{q(s.user)}:{q(s.user)}"
        cmds = []
        cur = facts.file(f"{root}/current")
        if cur is not None and cur["type"] == "dir":
            legacy = f"{root}/releases/{self.release_id.split('-')[0]}-legacy"
            cmds.append(f"mv -T {q(root + '/current')} {q(legacy)}")
        meta = json.dumps({"id": self.release_id, "digest": self.source.digest, "revision": self.source.revision,
                           "dirty": self.source.dirty, "deployer": self.deployer, "venv": self.venv_key},
                          sort_keys=True)
        b64 = base64.encodebytes(self.source.tarball()).decode()
        cmds += [
            f"rm -rf {q(tmp)} && mkdir -p {q(tmp)}",
            f"base64 -d <<'__PROVISION_EOF__' | tar -xz --no-same-owner -C {q(tmp)}\n{b64}__PROVISION_EOF__",
            f"ln -sfn ../../venvs/{self.venv_key} {q(tmp)}/.venv",
        ]
        # shared/ files and dirs outlive releases; each release links to them
        own = f"-o {q(s.user)} -g {q(s.user)}"
        links = [(f, f"[ -e {{0}} ] || install -m 640 {own} /dev/null {{0}}") for f in s.linked_files]
        links += [(d, f"install -d -m 755 {own} {{0}}") for d in s.linked_dirs]
        for path, create in links:
            shared, inside = q(f"{root}/shared/{path}"), q(f"{tmp}/{path}")
            cmds += [f'mkdir -p "$(dirname {shared})" "$(dirname {inside})"', create.format(shared),
                     f"rm -rf {inside} && ln -s {shared} {inside}"]
        cmds += [
            f"printf '%s\\n' {q(meta)} > {q(tmp)}/.provision-release",
            f"chown -R {owner} {q(tmp)} && chmod -R go-w {q(tmp)}",
            f"rm -rf {q(rel)} && mv -T {q(tmp)} {q(rel)}",
        ]
        return Change(cmds, summary=f"{self.release_id} ({len(self.source.files)} files)")


def live_slot(s: Settings, facts: Facts) -> str | None:
    m = re.search(rf"/run/{re.escape(s.name)}/([ab])/gunicorn\.sock", facts.content(s.upstream_file) or "")
    return m.group(1) if m else None


def slot_release(s: Settings, facts: Facts, slot: str) -> str | None:
    return linked_release(facts, f"{s.root}/slots/{slot}")


class Switch(Step):
    """Make ``target`` the live release without dropping a request (blue/green slots).

    Switches when there is no live instance, it is not running, it runs another
    release, or its unit or gunicorn config changed. Otherwise only repairs a
    ``current`` link or a second running instance left by an interrupted deploy.
    """

    barrier = True
    notify = ("switched",)

    def __init__(self, s: Settings, target: Callable[[Facts], str], action: str = "deploy", by: str = "",
                 restart_on: tuple[str, ...] = ("unit", "gunicorn-conf"), daemon_reload_on: tuple[str, ...] = ("unit",),
                 extra_facts: tuple = ()):
        self.s, self.target, self.action, self.by = s, target, action, by
        self.restart_on, self.daemon_reload_on, self.extra_facts = restart_on, daemon_reload_on, extra_facts

    @property
    def name(self):
        return f"switch {self.s.name}"

    def units(self) -> dict[str, str]:
        return {slot: f"{self.s.name}@{slot}" for slot in SLOTS}

    def facts(self):
        s = self.s
        return [("content", s.upstream_file), ("file", f"{s.root}/current"), *self.extra_facts,
                *[("file", f"{s.root}/slots/{slot}") for slot in SLOTS],
                *[("service", u) for u in self.units().values()]]

    def plan(self, facts, notified):
        s = self.s
        target = self.target(facts)
        live = live_slot(s, facts)
        state = facts.service(self.units()[live]) if live else None
        running = bool(state and state["active"])
        if live is None or not running or slot_release(s, facts, live) != target or notified & set(self.restart_on):
            slot = "b" if live == "a" else "a"
            unit_state = facts.service(self.units()[slot]) or {}
            args = {"app": s.name, "root": s.root, "slot": slot, "old": live or "", "release": target,
                    "health_path": s.health_path, "host": host_header(s), "timeout": s.health_timeout,
                    "action": self.action, "by": self.by,
                    "daemon_reload": bool(notified & set(self.daemon_reload_on)) or not unit_state.get("loaded")}
            return Change([f"python3 -c {q(SWITCH_PY)} {q(json.dumps(args, sort_keys=True))}"],
                          summary=f"{target} -> slot {slot}")
        cmds = []
        if current_release(s, facts) != target:
            cmds += symlink_commands(f"{s.root}/current", f"releases/{target}")
        other = "b" if live == "a" else "a"
        other_state = facts.service(self.units()[other])
        if other_state and (other_state["active"] or other_state["enabled"]):
            cmds.append(f"systemctl disable --quiet --now {q(self.units()[other])}")
        return Change(cmds, summary="repair") if cmds else None


def host_header(s: Settings) -> str:
    return "" if s.server_name == "_" else s.server_name.split()[0].replace("*", "www")


class Prune(Step):
    """Keep the newest ``keep_releases`` releases, never the live or the previous one;
    drop partial uploads and virtualenvs no kept release uses."""

    def __init__(self, s: Settings, target: Callable[[Facts], str]):
        self.s, self.target = s, target

    @property
    def name(self):
        return f"prune {self.s.root}/releases"

    def facts(self):
        return [("ls", f"{self.s.root}/releases"), ("file", f"{self.s.root}/current")]

    def doomed(self, facts: Facts) -> list[str]:
        names = facts.ls(f"{self.s.root}/releases") or []
        partial = [n for n in names if n.endswith(".provision-tmp")]
        releases = sorted(set(n for n in names if n not in partial) | {self.target(facts)})
        keep = set(releases[-self.s.keep_releases:]) | {self.target(facts)}
        previous = current_release(self.s, facts)
        if previous:
            keep.add(previous)
        return partial + [r for r in releases if r not in keep]

    def plan(self, facts, notified):
        doomed = self.doomed(facts)
        if not doomed and "switched" not in notified:
            return None
        root = self.s.root
        cmds = [f"rm -rf {' '.join(q(root + '/releases/' + d) for d in doomed)}"] if doomed else []
        # A virtualenv stays while any release links to it (rollbacks need theirs).
        cmds.append(
            f"for v in {q(root)}/venvs/*/; do [ -d \"$v\" ] || continue; k=$(basename \"$v\"); "
            f"used=; for l in {q(root)}/releases/*/.venv; do [ \"$(readlink \"$l\")\" = \"../../venvs/$k\" ] "
            f"&& used=1 && break; done; [ -n \"$used\" ] || rm -rf \"$v\"; done"
        )
        return Change(cmds, summary=f"remove {len(doomed)}" if doomed else "unused virtualenvs")


def rollback_target(s: Settings, to: str | None) -> Callable[[Facts], str]:
    def target(facts: Facts) -> str:
        releases = [n for n in (facts.ls(f"{s.root}/releases") or []) if not n.endswith(".provision-tmp")]
        if to:
            if to not in releases:
                raise ProvisionError(f"no release {to!r} on the host; `fab releases` lists them")
            return to
        live = current_release(s, facts)
        earlier = [r for r in sorted(releases) if live is None or r < live]
        if not earlier:
            raise ProvisionError("no earlier release to roll back to; `fab releases` lists them")
        return earlier[-1]

    return target
