"""Steps: desired state in, shell commands out.

A step names the facts it needs (``facts()``), and turns the gathered facts
into a :class:`Change` (``plan()``), or ``None`` when the host already is as
desired.  Nothing here touches a host: the runner gathers the facts of all
steps in one round trip and runs every change in one script.

``notify`` tags let later steps react to earlier changes (a service restarts
when its unit changed); ``plan()`` receives the tags set so far.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from . import remote, secrets
from .errors import ProvisionError
from .facts import Fact, Facts, collect_facts, http_fact_arg
from .layout import TMP

if TYPE_CHECKING:
    from .upload import Upload

q = shlex.quote


@dataclass
class Change:
    commands: list[str]
    summary: str = ""
    check: bool = False  # a verification: reported ok, not changed, when it passes
    background: bool = False  # runs alongside the following steps, until the next barrier step
    provides: tuple[str, ...] = ()  # extra notify tags, decided by the plan
    upload: Upload | None = None  # files sent beside the script; the commands find them in "$__upload"


class Step:
    name = "step"
    notify: tuple[str, ...] = ()
    barrier = False  # wait for every background change before this step runs

    def facts(self) -> list[Fact]:
        return []

    def plan(self, facts: Facts, notified: set[str]) -> Change | None:
        raise NotImplementedError

    def diff_facts(self, facts: Facts) -> list[Fact]:
        """More facts a dry run needs to show this step's change (gathered in a second round trip)."""
        return []

    def show_diff(self, facts: Facts, more: Facts) -> str:
        """What a dry run shows of this step's change below its line; ``more`` answers ``diff_facts``."""
        return ""

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _owner_fix(path: str, fact: dict | None, owner: str | None, group: str | None, mode: int | None) -> list[str]:
    """chown (never through a symlink: -h) and chmod of a path that is no symlink."""
    cmds = []
    want_owner = owner or (fact or {}).get("owner")
    want_group = group or (fact or {}).get("group")
    if fact is None or (owner and fact["owner"] != owner) or (group and fact["group"] != group):
        if owner or group:
            cmds.append(f"chown -h {q(want_owner or 'root')}:{q(want_group or want_owner or 'root')} {q(path)}")
    if mode is not None and (fact is None or fact["mode"] != mode):
        cmds.append(f"chmod {mode:o} {q(path)}")
    return cmds


def operators_link(fact: dict | None) -> bool:
    """A symlink root made (say, shared/uploads -> a mounted volume) is the operator's choice: kept
    as it is, never followed for chown/chmod. Any other symlink was planted and is replaced."""
    return bool(fact) and fact["type"] == "link" and fact["owner"] == "root"


def _replace_planted(path: str, fact: dict | None, want: str) -> tuple[list[str], dict | None]:
    """Commands that remove whatever is at ``path`` that is not a ``want`` ("dir"/"file"), and the
    fact that remains. Only ever run where the parent directory is root's, so the entry cannot be
    swapped between this check and the commands after it."""
    if fact is None or fact["type"] == want:
        return [], fact
    flag = "-rf" if fact["type"] == "dir" else "-f"  # rm never follows a symlink
    return [f"rm {flag} {q(path)}"], None


def _summary(before: dict | None, kept: dict | None) -> str:
    if before is not None and kept is None:
        return f"replace a {before['type']}"
    return "create" if kept is None else "fix owner/mode"


@dataclass(repr=False)
class Packages(Step):
    names: tuple[str, ...]
    notify: tuple[str, ...] = ("packages",)

    @property
    def name(self):
        return "packages " + " ".join(self.names)

    def facts(self):
        return [("package", n) for n in self.names]

    def plan(self, facts, notified):
        # "package:X" tags: installed by an earlier step of this run, after the facts were gathered
        missing = [n for n in self.names if not facts.package(n) and f"package:{n}" not in notified]
        if not missing:
            return None
        env = "DEBIAN_FRONTEND=noninteractive"
        update = [] if "packages" in notified else ["apt-get update -qq"]  # once a run is enough
        return Change(
            update + [
                f"{env} apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "
                + " ".join(q(n) for n in missing),
            ],
            summary="install " + " ".join(missing),
            provides=tuple(f"package:{n}" for n in missing),
        )


@dataclass(repr=False)
class User(Step):
    """A system user whose home is ``home``. An account of that name with another home is not one
    provision made (it makes them with this home): it is never taken over, planning refuses it."""

    user: str
    home: str
    shell: str = "/usr/sbin/nologin"
    notify: tuple[str, ...] = ()

    @property
    def name(self):
        return f"user {self.user}"

    def facts(self):
        return [("user", self.user)]

    def plan(self, facts, notified):
        u = facts.user(self.user)
        if u is None:
            return Change(
                [f"useradd --system --user-group --home-dir {q(self.home)} --no-create-home "
                 f"--shell {q(self.shell)} {q(self.user)}"],
                summary="create",
            )
        if u["home"] != self.home:
            raise ProvisionError(f"account {self.user} already exists on the host (home {u['home']}) and provision "
                                 "did not make it; choose another app name (app.name)")
        if u["shell"] != self.shell:
            return Change([f"usermod --shell {q(self.shell)} {q(self.user)}"], summary="update")
        return None


@dataclass(repr=False)
class Directory(Step):
    """A directory (never a symlink: one found in its place is removed, unless ``keep_root_links``
    and root made it), with owner, group and mode. Its parent must be root's."""

    path: str
    owner: str | None = None
    group: str | None = None
    mode: int | None = 0o755
    notify: tuple[str, ...] = ()
    keep_root_links: bool = False

    @property
    def name(self):
        return f"directory {self.path}"

    def facts(self):
        return [("file", self.path)]

    def plan(self, facts, notified):
        f = facts.file(self.path)
        if self.keep_root_links and operators_link(f):
            return None
        cmds, f = _replace_planted(self.path, f, "dir")
        if f is None:
            cmds.append(f"mkdir -p {q(self.path)}")
        cmds += _owner_fix(self.path, f, self.owner, self.group, self.mode)
        return Change(cmds, summary=_summary(facts.file(self.path), f)) if cmds else None


@dataclass(repr=False)
class RootsOnly(Step):
    """Refuses to plan anything for a tree root does not own: what another user could write
    (an older layout, where the app owned it) can be swapped for links while root works in it.
    ``hint`` says what to do instead."""

    paths: tuple[str, ...]
    hint: str

    @property
    def name(self):
        return f"owner of {self.paths[0]}"

    def facts(self):
        return [("file", p) for p in self.paths]

    def plan(self, facts, notified):
        for p in self.paths:
            f = facts.file(p)
            if f is not None and (f["owner"] != "root" or f.get("acl")):
                who = "has an ACL" if f["owner"] == "root" else f"belongs to {f['owner']}"
                raise ProvisionError(f"{p} {who}, so it is not root's alone; {self.hint}")
        return None


@dataclass(repr=False)
class Placeholder(Step):
    """A file whose content is not ours (``.env``, a database file): created empty when missing,
    owner and mode enforced, a planted symlink replaced. Its parent must be root's."""

    path: str
    owner: str = "root"
    group: str = "root"
    mode: int = 0o640
    notify: tuple[str, ...] = ()

    @property
    def name(self):
        return f"file {self.path}"

    def facts(self):
        return [("file", self.path)]

    def plan(self, facts, notified):
        f = facts.file(self.path)
        if operators_link(f):
            return None
        cmds, f = _replace_planted(self.path, f, "file")
        if f is None:
            cmds.append(f"install -m {self.mode:o} -o {q(self.owner)} -g {q(self.group)} /dev/null {q(self.path)}")
        else:
            cmds += _owner_fix(self.path, f, self.owner, self.group, self.mode)
        return Change(cmds, summary=_summary(facts.file(self.path), f)) if cmds else None


def _heredoc_write(path: str, data: bytes, owner: str = "root", group: str = "root", mode: int = 0o644) -> list[str]:
    """Commands that write ``data`` to ``path`` atomically: a fresh temporary file only root can
    read (a secret is never readable while it is written), given its owner and mode, then
    renamed into place."""
    tmp = path + TMP
    b64 = base64.encodebytes(data).decode()
    return [
        f"rm -f {q(tmp)} && (umask 077 && base64 -d > {q(tmp)}) <<'__PROVISION_EOF__'\n{b64}__PROVISION_EOF__",
        *_owner_fix(tmp, None, owner, group, mode),
        f"mv -f {q(tmp)} {q(path)}",
    ]


HIDDEN = "(content hidden: sensitive)"


def unified_diff(path: str, old: str | None, new: str) -> list[str]:
    """The lines of a unified diff of ``path``; ``old`` None: a new file."""
    lines = difflib.unified_diff(
        (old or "").splitlines(True), new.splitlines(True),
        fromfile=f"{path} (host)" if old is not None else "/dev/null", tofile=f"{path} (new)",
    )
    return [l[:-1] if l.endswith("\n") else l for l in lines]


def shown_diff(path: str, old: str | None, new: str, sensitive: bool) -> str:
    """What a dry run shows of a file's change: a unified diff, or only a note when the file
    is sensitive or either side holds a known secret. Then neither side is shown: the
    old content may hold an old secret that nothing knows any more."""
    if sensitive or secrets.holds_secret(new) or secrets.holds_secret(old or ""):
        return f"--- {path}\n+++ {path}\n{HIDDEN}\n"
    return "".join(l + "\n" for l in unified_diff(path, old, new))


class ShowsContentDiff:
    """A step on one file (``path``) whose dry run shows ``diff(old)``: against the file's content
    on the host."""

    def diff_facts(self, facts):
        return [("content", self.path)]

    def show_diff(self, facts, more):
        return self.diff(more.content(self.path))


@dataclass(repr=False)
class File(ShowsContentDiff, Step):
    path: str
    content: bytes
    owner: str | None = "root"
    group: str | None = "root"
    mode: int | None = 0o644
    notify: tuple[str, ...] = ()
    sensitive: bool = False  # never show the content in diffs

    @property
    def name(self):
        return f"file {self.path}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def facts(self):
        return [("file", self.path)]

    def plan(self, facts, notified):
        f = facts.file(self.path)
        if f is not None and f["type"] == "file" and f["sha256"] == self.sha256:
            cmds = _owner_fix(self.path, f, self.owner, self.group, self.mode)
            return Change(cmds, summary="fix owner/mode") if cmds else None
        cmds = []
        if f is not None and f["type"] == "dir":
            cmds.append(f"rm -rf {q(self.path)}")
        cmds += _heredoc_write(self.path, self.content, self.owner or "root", self.group or "root",
                               0o644 if self.mode is None else self.mode)
        return Change(cmds, summary="create" if f is None else "update")

    def diff(self, old: str | None) -> str:
        return shown_diff(self.path, old, self.content.decode("utf-8", "replace"), self.sensitive)


@dataclass(repr=False)
class Absent(Step):
    path: str
    notify: tuple[str, ...] = ()
    when: tuple[str, ...] = ()  # also remove when one of these tags was notified (e.g. a package just made it)

    @property
    def name(self):
        return f"absent {self.path}"

    def facts(self):
        return [("file", self.path)]

    def plan(self, facts, notified):
        if facts.file(self.path) is None and not notified & set(self.when):
            return None
        return Change([f"rm -rf {q(self.path)}"], summary="remove")


@dataclass(repr=False)
class Symlink(Step):
    path: str
    target: str
    notify: tuple[str, ...] = ()
    barrier: bool = False

    @property
    def name(self):
        return f"link {self.path}"

    def facts(self):
        return [("file", self.path)]

    def plan(self, facts, notified):
        f = facts.file(self.path)
        if f is not None and f["type"] == "link" and f["target"] == self.target:
            return None
        return Change(symlink_commands(self.path, self.target), summary=f"-> {self.target}")


def symlink_commands(path: str, target: str) -> list[str]:
    """Switch ``path`` to point at ``target`` atomically (temp link + rename)."""
    tmp = path + TMP
    return [f"ln -sfn {q(target)} {q(tmp)}", f"mv -Tf {q(tmp)} {q(path)}"]


@dataclass(repr=False)
class Lines(ShowsContentDiff, Step):
    """Ensure ``KEY<sep>VALUE`` lines in a file shared with others (e.g. /etc/environment);
    a value of None removes the key's lines."""

    path: str
    values: tuple[tuple[str, str | None], ...]
    sep: str = "="
    notify: tuple[str, ...] = ()
    sensitive: bool = False  # never show the content in diffs

    @property
    def name(self):
        return f"lines {self.path}"

    def facts(self):
        return [("content", self.path)]

    def render(self, old: str | None) -> str:
        want = dict(self.values)
        out, seen = [], set()
        for line in (old or "").splitlines():
            key = line.split(self.sep, 1)[0].strip()
            if key in want:
                if key in seen or want[key] is None:
                    continue
                line = f"{key}{self.sep}{want[key]}"
                seen.add(key)
            out.append(line)
        out += [f"{k}{self.sep}{v}" for k, v in self.values if k not in seen and v is not None]
        return "\n".join(out) + "\n"

    def plan(self, facts, notified):
        old = facts.content(self.path)
        new = self.render(old)
        if old == new:
            return None
        return Change(_heredoc_write(self.path, new.encode()), summary="update")

    def diff(self, old: str | None) -> str:
        return shown_diff(self.path, old, self.render(old), self.sensitive)


@dataclass(repr=False)
class Command(Step):
    """A command guarded by ``creates`` (a path) or ``unless`` (a command that succeeds when done)."""

    label: str
    commands: tuple[str, ...]
    creates: str | None = None
    unless: str | None = None
    when: tuple[str, ...] = ()  # run (also) when one of these tags was notified
    notify: tuple[str, ...] = ()
    background: bool = False  # run alongside later steps until the next barrier
    barrier: bool = False

    @property
    def name(self):
        return self.label

    def facts(self):
        out = []
        if self.creates:
            out.append(("file", self.creates))
        if self.unless:
            out.append(("command", self.unless))
        return out

    def plan(self, facts, notified):
        needed = bool(notified & set(self.when))
        made = facts.file(self.creates) if self.creates else None
        if self.creates and (made is None or made["owner"] != "root"):  # not root's: not made by us
            needed = True
        if self.unless and facts.command(self.unless) != 0:
            needed = True
        if not (self.creates or self.unless or self.when):
            needed = True
        return Change(list(self.commands), background=self.background) if needed else None


def drained(service: str, action: str, pidfile: str) -> str:
    """``systemctl <action> <service>`` of a master process (nginx), returning once its old workers
    have finished their requests and gone."""
    return remote.python("nginx_reload.py", {"service": service, "action": action, "pid_file": pidfile})


@dataclass(repr=False)
class Service(Step):
    """A systemd service enabled and running; restarted or reloaded when told.

    ``restart_on`` / ``reload_on`` are notify tags.  A service that is not
    running is started (which makes a restart moot).  ``check`` runs before a
    reload or restart (e.g. ``nginx -t``) so a bad config never takes a live
    service down.
    """

    service: str
    restart_on: tuple[str, ...] = ()
    reload_on: tuple[str, ...] = ()
    check: str | None = None
    daemon_reload_on: tuple[str, ...] = ()
    notify: tuple[str, ...] = ()
    pidfile: str | None = None  # a master process: a reload returns once its old workers are gone

    @property
    def name(self):
        return f"service {self.service}"

    def facts(self):
        return [("service", self.service)]

    def plan(self, facts, notified):
        s = facts.service(self.service) or {"loaded": False, "active": False, "enabled": False}
        cmds, what = [], []
        if notified & set(self.daemon_reload_on) or not s["loaded"]:
            cmds.append("systemctl daemon-reload")
        if not s["enabled"]:
            cmds.append(f"systemctl enable --quiet {q(self.service)}")
            what.append("enable")
        restart, reload = notified & set(self.restart_on), notified & set(self.reload_on)
        action = None
        if not s["active"]:
            # Facts predate this run: a package install may have started it since;
            # reload-or-restart loads the new config either way, without a full restart.
            action = "reload-or-restart" if restart or reload else "start"
        elif restart:
            action = "restart"
        elif reload:
            action = "reload"
        if action:
            if self.check:
                cmds.append(self.check)
            if self.pidfile and action != "start":
                cmds.append(drained(self.service, action, self.pidfile))
            else:
                cmds.append(f"systemctl {action} {q(self.service)}")
            what.append(action)
        if not what:
            return None
        return Change(cmds, summary=", ".join(what))




@dataclass(repr=False)
class HttpCheck(Step):
    """The service answers ``url`` with a 2xx status (retried up to ``timeout`` seconds), and,
    with ``expect`` (header, values), with that header one of the values: proof of who answered.

    Runs whenever anything changed in this run; otherwise the status gathered
    with the facts decides.
    """

    url: str
    host_header: str = ""
    timeout: int = 30
    expect: tuple[str, tuple[str, ...]] | None = None

    @property
    def name(self):
        return f"health {self.url}"

    def facts(self):
        return [("http", http_fact_arg(self.url, self.host_header, self.expect))]

    def command(self) -> str:
        return remote.python("http_check.py", {"url": self.url, "host": self.host_header, "timeout": self.timeout,
                                               "expect": list(self.expect) if self.expect else None})

    def plan(self, facts, notified):
        status = facts.http(self.url, self.host_header, self.expect)
        if notified or not (200 <= status < 300):
            return Change([self.command()], summary="answers", check=True)
        return None


class Recipe:
    """What a run does to a host: its steps, once the facts have decided which release they are
    about (``target``: the release to make live; None when there is none).

    The runner gathers :meth:`facts` in its one round trip, calls :meth:`target` once, and hands
    that value to :meth:`steps`. A step's facts never depend on the target, so ``steps(None)``
    tells which facts the steps need."""

    def target_facts(self) -> list[Fact]:
        return []

    def target(self, facts: Facts) -> str | None:
        return None

    def steps(self, target: str | None) -> list[Step]:
        raise NotImplementedError

    def facts(self) -> list[Fact]:
        return list(dict.fromkeys([*map(tuple, self.target_facts()), *collect_facts(self.steps(None))]))

    def notes(self, facts: Facts) -> list[str]:
        """Lines worth the user's attention that the facts tell, printed once per host, dry run or not."""
        return []

    def resend_all(self) -> Recipe | None:
        """The same recipe sending every file it uploads, none taken from the host's copies (a step
        found them changed since provision wrote them); None: it reuses nothing."""
        return None


class Steps(Recipe):
    """Steps that need no target."""

    def __init__(self, steps: Iterable[Step]):
        self._steps = list(steps)

    def steps(self, target):
        return self._steps


@dataclass
class Planned:
    step: Step
    change: Change | None

    @property
    def status(self) -> str:
        if self.change is None:
            return "ok"
        return "check" if self.change.check else "change"


def plan(steps: Iterable[Step], facts: Facts) -> list[Planned]:
    """Decide every step from the facts, in order, propagating notify tags."""
    notified: set[str] = set()
    out = []
    for s in steps:
        change = s.plan(facts, notified)
        if change is not None and not change.commands:
            change = None
        if change is not None and not change.check:
            notified |= set(s.notify) | set(change.provides)
            notified.add("*changed*")
        out.append(Planned(s, change))
    return out
