"""The app beside its web service: processes (workers), timers (cron), static files, maintenance.

Settings (validated here for :func:`provision.config.build`): ``static`` (URL prefix -> directory
in the release, served by nginx), ``processes`` (name -> command, plus a ``Procfile``'s lines other
than ``web`` and ``release``), ``timers`` (name -> {schedule, command}).

Each process is a systemd service, each timer a timer and its oneshot service, of the app's
user, running in the live release (its directory is written into the unit, so a new live release
changes the unit, and only then is the process restarted: after the switch moved traffic), with
the app's environment and virtualenv and the web unit's sandbox (:mod:`provision.sandboxing`).
Units of processes and timers dropped from the settings are stopped and removed. Pure: settings
and facts in, commands out.
"""

from __future__ import annotations

import html
import json
import re
import shlex
from pathlib import Path

from . import secrets
from .errors import ProvisionError
from .facts import Facts
from .layout import RELEASE_DIR, VENV, Layout
from .sandboxing import hardening
from .steps import Absent, Change, File, Step

q = shlex.quote
PROCFILE = "Procfile"
PROCFILE_WEB, PROCFILE_RELEASE = "web", "release"  # served by gunicorn; the release_command setting
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,30}")  # no '.': a unit name <app>.<name>.service stays unambiguous
PREFIX_RE = re.compile(r"/([A-Za-z0-9_.~-]+/)+")  # a URL path of one or more segments, between slashes
DIR_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
# OnCalendar= expressions: weekdays, dates, times, shorthands (daily, *:0/5, Mon..Fri 08:00, ... UTC)
SCHEDULE_RE = re.compile(r"[A-Za-z0-9*:/.,~ +-]{1,200}")
MAX_COMMAND = 4096
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MESSAGE = "This site is down for maintenance and will be back soon."


def _bad(key: str, value, why: str) -> ProvisionError:
    return ProvisionError(f"invalid setting app.{key}={value!r}: {why}")


def _mapping(key: str, value) -> dict:
    """A mapping; from the inventory or the environment, one JSON object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise _bad(key, value, "expected a mapping in fabric.yaml, or a JSON object in the inventory or "
                                   "environment") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _bad(key, value, "expected a mapping (in fabric.yaml: one `NAME: VALUE` line each)")
    return value


def command_problem(command) -> str | None:
    if not isinstance(command, str) or not command.strip():
        return "expected a shell command, e.g. python worker.py"
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in command):
        return "expected one line without control characters"
    if len(command) > MAX_COMMAND:
        return f"expected at most {MAX_COMMAND} characters"
    if secrets.holds_secret(command):  # it would be in a unit file, which every user can read
        return "it holds a secret (a var_* setting named like a password, token or key); give it to the app " \
               "through shared/.env"
    return None


def _name(key: str, name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise _bad(key, name, "use lowercase letters, digits, '-' or '_', starting with a letter (max 31)")
    return name


def parse_procfile(text: str, where: str = PROCFILE) -> dict[str, str]:
    """``name: command`` lines (blank lines and ``#`` comments skipped), as Heroku reads them."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        name, command = name.strip(), command.strip()
        why = None if sep else "expected `name: command`"
        if not why and name not in (PROCFILE_WEB, PROCFILE_RELEASE) and not NAME_RE.fullmatch(name):
            why = "a process name is lowercase letters, digits, '-' or '_', starting with a letter (max 31)"
        why = why or command_problem(command) or (f"{name!r} is there twice" if name in out else None)
        if why:
            raise ProvisionError(f"{where}, line {n}: {why}; fix that line")
        out[name] = command
    return out


def procfile(source: Path) -> dict[str, str]:
    """The app's ``Procfile`` lines; {} when it has none."""
    path = source / PROCFILE
    if not path.is_file():
        return {}
    try:
        return parse_procfile(path.read_text(), str(path))
    except UnicodeDecodeError:
        raise ProvisionError(f"{path} is not UTF-8 text; save it as UTF-8") from None


def processes_setting(value, from_procfile: dict[str, str]) -> dict[str, str]:
    """The ``processes`` setting over the Procfile's lines (a setting wins over a line of the same name)."""
    out = {k: v for k, v in from_procfile.items() if k not in (PROCFILE_WEB, PROCFILE_RELEASE)}
    for name, command in _mapping("processes", value).items():
        _name("processes", name)
        why = command_problem(command)
        if why:
            raise _bad(f"processes.{name}", command, why)
        out[name] = command.strip()
    return dict(sorted(out.items()))


def timers_setting(value, processes: dict[str, str]) -> dict[str, dict[str, str]]:
    out = {}
    for name, timer in _mapping("timers", value).items():
        _name("timers", name)
        if name in processes:
            raise _bad("timers", name, f"a process is named {name!r} too; give the timer another name")
        if not isinstance(timer, dict) or set(timer) != {"schedule", "command"}:
            raise _bad(f"timers.{name}", timer, "expected {schedule: <systemd OnCalendar, e.g. daily or *:0/15>, "
                                                "command: <shell command>}")
        schedule = timer["schedule"]
        if not isinstance(schedule, str) or not SCHEDULE_RE.fullmatch(schedule.strip()):
            raise _bad(f"timers.{name}.schedule", schedule, "expected a systemd calendar expression (man "
                                                            "systemd.time), e.g. daily, hourly, *:0/15 or Mon..Fri 08:00")
        why = command_problem(timer["command"])
        if why:
            raise _bad(f"timers.{name}.command", timer["command"], why)
        out[name] = {"schedule": schedule.strip(), "command": timer["command"].strip()}
    return dict(sorted(out.items()))


def static_setting(value, linked: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(URL prefix, directory in the release) pairs. A directory is the release's alone: never its
    own files (.provision, .venv) nor a linked file or dir (the app writes those)."""
    out = []
    for prefix, directory in _mapping("static", value).items():
        if not PREFIX_RE.fullmatch(prefix) or any(p in (".", "..") for p in prefix.split("/")):
            raise _bad("static", prefix, "expected a URL prefix between slashes, e.g. /static/ (not / alone)")
        if not isinstance(directory, str) or not DIR_RE.fullmatch(directory.strip("/")) or any(
                p in (".", "..") for p in directory.strip("/").split("/")):
            raise _bad(f"static.{prefix}", directory, "expected a directory inside the release, e.g. staticfiles")
        directory = directory.strip("/")
        for other in (RELEASE_DIR, VENV, *linked):
            if directory == other or directory.startswith(other + "/") or other.startswith(directory + "/"):
                raise _bad(f"static.{prefix}", directory, f"it holds or is {other!r}, which is provision's or the "
                                                          "app's own (linked); serve a directory of the release")
        out.append((prefix, directory))
    return tuple(sorted(out))


def unserved_static(s, site: str) -> None:
    """Stops a deploy whose nginx site (a template of the user's, say) serves no location for a ``static``
    prefix: the app would get those requests, and nothing would say why."""
    for prefix, directory in s.static:
        if f"location {prefix} " not in site:
            raise ProvisionError(f"app.static has {prefix}: {directory}, but your nginx-site.conf.j2 has no "
                                 f"`location {prefix}` for it; add the kit's static block (`python -m provision "
                                 "template nginx-site.conf.j2` shows it) or drop the setting")


def systemd_quote(command: str) -> str:
    """``command`` as one double-quoted word of an Exec= line: systemd then hands it to the shell as it is
    (no specifier or variable of systemd's own expanded)."""
    escaped = command.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _service(lay: Layout, user: str, what: str, release: str, command: str, app_unit: str, extra: list[str],
             engine: str, graceful_timeout: int) -> bytes:
    rel = lay.release(release)
    if lay.container:  # in a container of the release's image, named after the process (remote/container_run.py)
        name = lay.process_container(what.split()[-1])
        after = ["After=network-online.target docker.service", "Requires=docker.service"] if engine == "docker" else [
            "After=network-online.target"]  # docker's daemon runs the container (as for a slot)
        # stopped like a slot (container@.service.j2): `<engine> stop` gives it graceful_timeout, then KILL;
        # the engine's client (the main process) is left to end with its container. A oneshot stopped
        # while it runs gets no ExecStop: container-run.py stops its container on TERM.
        stop = [f"ExecStop=-/usr/bin/{engine} stop --time {graceful_timeout} {name}",
                f"ExecStopPost=-/usr/bin/{engine} rm -f {name}", "KillMode=mixed", "SuccessExitStatus=143 137",
                f"TimeoutStopSec={graceful_timeout + 10}"]
        lines = [
            "# Managed by provision: changes here are overwritten on the next deploy.",
            f"# Runs in release {release}'s image: each new live release rewrites it.",
            "[Unit]", f"Description={lay.name} {what} (container)", *after, "",
            "[Service]", "NoNewPrivileges=true",  # no PrivateTmp= (see container@.service.j2)
            f"ExecStart=/usr/bin/python3 -I {rel}/{RELEASE_DIR}/container-run.py once --name {name} -- "
            f"/bin/sh -c {systemd_quote(command)}", *stop, *extra,
        ]
        return ("\n".join(lines) + "\n").encode()
    lines = [
        "# Managed by provision: changes here are overwritten on the next deploy.",
        f"# Runs in release {release}: each new live release rewrites it.",
        "[Unit]", f"Description={lay.name} {what}", "After=network.target", "",
        "[Service]", f"User={user}", f"Group={user}", f"WorkingDirectory={rel}",
        f"Environment=PATH={rel}/{VENV}/bin:{PATH}", f"Environment=VIRTUAL_ENV={rel}/{VENV}",
        "Environment=PYTHONUNBUFFERED=1",
        f"EnvironmentFile=-{lay.release_env(rel)}",  # app.env, as the web unit has it from its slot
        *hardening(app_unit),
        f"ExecStart=/bin/sh -c {systemd_quote(command)}", *extra,
    ]
    return ("\n".join(lines) + "\n").encode()


def process_unit(lay: Layout, user: str, name: str, command: str, release: str, app_unit: str,
                 graceful_timeout: int, engine: str) -> bytes:
    """A long-running process: restarted when it exits; on stop every process of it (a container app's:
    its container) gets TERM, then ``graceful_timeout`` (plus a few seconds) to finish."""
    stop = [] if lay.container else ["KillMode=control-group", f"TimeoutStopSec={graceful_timeout + 5}"]
    return _service(lay, user, f"process {name}", release, command, app_unit, [
        *stop, "Restart=always", "RestartSec=1", "",
        "[Install]", "WantedBy=multi-user.target"], engine, graceful_timeout)


def timer_units(lay: Layout, user: str, name: str, timer: dict[str, str], release: str,
                app_unit: str, graceful_timeout: int, engine: str) -> dict[str, bytes]:
    """A timer and the oneshot service it starts, each run as long as it takes."""
    service = _service(lay, user, f"timer {name}", release, timer["command"], app_unit,
                       ["Type=oneshot", "TimeoutStartSec=infinity"], engine, graceful_timeout)
    timer_file = "\n".join([
        "# Managed by provision: changes here are overwritten on the next deploy.",
        "[Unit]", f"Description={lay.name} timer {name}", "",
        "[Timer]", f"OnCalendar={timer['schedule']}", "AccuracySec=1s", "",
        "[Install]", "WantedBy=timers.target"]) + "\n"
    return {lay.process_unit(name): service, lay.timer_unit(name): timer_file.encode()}


CHANGED = "app-units"  # notified by the step of any process or timer unit file that changed


def changed(unit: str) -> str:
    """The tag the step of ``unit``'s file notifies when it changed."""
    return f"unit:{unit}"


def calendar_check(schedule: str) -> str:
    """The command (a fact) that tells whether systemd on the host accepts a schedule."""
    return f"systemd-analyze calendar {q(schedule)}"


class AppUnits(Step):
    """The app's process and timer units loaded, enabled and running; a process restarted when its
    unit changed (a new live release), a timer re-armed when its schedule did; units of dropped
    processes and timers stopped and removed. Schedules are checked by the host's systemd."""

    def __init__(self, lay: Layout, running: tuple[str, ...], files: tuple[str, ...], schedules: dict[str, str]):
        # running: the units kept running (processes, timers); files: every unit file of the app
        self.lay, self.running, self.files, self.schedules = lay, running, files, schedules

    @property
    def name(self):
        return f"processes and timers of {self.lay.name}"

    def facts(self):
        return [("ls", self.lay.systemd_dir), *(("service", u) for u in self.running),
                *(("command", calendar_check(s)) for s in self.schedules.values())]

    def stale(self, facts: Facts) -> list[str]:
        pattern = re.compile(self.lay.app_units_re)
        return [n for n in facts.ls(self.lay.systemd_dir) or [] if pattern.fullmatch(n) and n not in self.files]

    def plan(self, facts, notified):
        for name, schedule in self.schedules.items():
            if facts.command(calendar_check(schedule)) == 1:  # 127: no systemd-analyze; the timer will say
                raise _bad(f"timers.{name}.schedule", schedule, "systemd on the host refuses it (`systemd-analyze "
                                                                "calendar` there says why); see man systemd.time")
        lay, cmds, what = self.lay, [], []
        stale = self.stale(facts)
        if stale:
            # a unit systemd never loaded (a file put there by hand) has nothing to stop
            cmds.append(f"systemctl stop {' '.join(q(u) for u in stale)} 2>/dev/null || true")
            cmds.append("rm -f " + " ".join(q(p) for u in stale for p in (
                lay.app_unit_file(u), f"{lay.wants}/{u}", f"{lay.timers_wants}/{u}")))
            what.append("remove " + " ".join(stale))
        states = {u: facts.service(u) or {"loaded": False, "active": False, "enabled": False} for u in self.running}
        enable = [u for u in self.running if not states[u]["enabled"]]
        if enable:  # enabling reloads systemd's configuration too
            cmds.append(f"systemctl enable --quiet {' '.join(q(u) for u in enable)}")
        elif stale or CHANGED in notified or not all(st["loaded"] for st in states.values()):
            cmds.append("systemctl daemon-reload")
        start = [u for u in self.running if not states[u]["active"]]
        restart = [u for u in self.running if states[u]["active"] and changed(u) in notified]
        for action, units in (("start", start), ("restart", restart)):
            if units:
                cmds.append(f"systemctl {action} {' '.join(q(u) for u in units)}")
                what.append(f"{action} {' '.join(units)}")
        if enable and not start and not restart:
            what.append("enable " + " ".join(enable))
        return Change(cmds, summary="; ".join(what)) if cmds else None


def unit_steps(s, release: str | None, app_unit: str) -> list[Step]:
    """The app's processes and timers running in ``release`` (placed after the switch), as steps:
    their unit files, then :class:`AppUnits`. ``s``: the app's settings."""
    lay, release = s.layout, release or "(none)"
    files: dict[str, bytes] = {}
    for name, command in s.processes.items():
        files[lay.process_unit(name)] = process_unit(lay, s.user, name, command, release, app_unit, s.graceful_timeout,
                                                     s.engine)
    for name, timer in s.timers.items():
        files.update(timer_units(lay, s.user, name, timer, release, app_unit, s.graceful_timeout, s.engine))
    running = (*map(lay.process_unit, s.processes), *map(lay.timer_unit, s.timers))
    # AppUnits even with none: the units of dropped processes and timers go
    return [*(File(lay.app_unit_file(u), content, notify=(changed(u), CHANGED)) for u, content in files.items()),
            AppUnits(lay, running, tuple(files), {n: t["schedule"] for n, t in s.timers.items()})]


# -- maintenance


def maintenance_page(message: str | None) -> bytes:
    """The page visitors see in maintenance when the live release has no maintenance.html."""
    text = html.escape(message or DEFAULT_MESSAGE)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Down for maintenance</title>"
            "</head>\n<body><h1>Down for maintenance</h1>\n<p>" + text + "</p></body></html>\n").encode()


class MaintenanceReady(Step):
    """Refuses to plan when the app's enabled nginx site does not test the maintenance file (never
    deployed, deployed by an older provision, or an nginx-site.conf.j2 of yours without it)."""

    def __init__(self, lay: Layout):
        self.lay = lay

    @property
    def name(self):
        return f"maintenance in {self.lay.site_enabled}"

    def facts(self):
        return [("content", self.lay.site_enabled)]

    def plan(self, facts, notified):
        site = facts.content(self.lay.site_enabled)
        if site is None or self.lay.maintenance_file not in site:
            raise ProvisionError(f"the nginx site of app {self.lay.name} has no maintenance mode ("
                                 + ("not deployed yet" if site is None else f"{self.lay.maintenance_file} is not in it")
                                 + "); deploy first (a template of your own: start it again from "
                                   "`python -m provision template nginx-site.conf.j2`)")
        return None


def maintenance_steps(lay: Layout, on: bool, message: str | None = None) -> list[Step]:
    """Maintenance on: the flag file (the default page) in place; off: gone. nginx tests it per request."""
    if not on:
        return [Absent(lay.maintenance_file)]
    return [MaintenanceReady(lay), File(lay.maintenance_file, maintenance_page(message))]
