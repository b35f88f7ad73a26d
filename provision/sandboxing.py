"""The app's sandbox, defined once: the ``[Service]`` lines of the web unit (``app@.service.j2``)
about its environment and its confinement. Every other process of the app takes them over: its
processes' and timers' units copy them (:mod:`provision.processes`), the release command and
``fab run`` pass them to systemd-run as properties (:func:`provision.appenv.app_process`).

And how `fab check` reads systemd's rating of a unit's sandbox (``systemd-analyze security``):
its exposure, from 0.0 (confined) to 10.0 (exposed); the kit's units stay at or below
:data:`MAX_EXPOSURE`. Pure: unit text and command output in, lines and numbers out.
"""

from __future__ import annotations

import re
import shlex

# The web unit's lines a process, a timer and systemd-run take over: its environment and its sandboxing.
HARDENING_RE = re.compile(
    r"(Environment|EnvironmentFile|UnsetEnvironment|PassEnvironment|LoadCredential\w*|SetCredential\w*|"
    r"NoNewPrivileges|Private\w+|Protect\w+|Restrict\w+|ReadOnly\w*|ReadWrite\w*|Inaccessible\w*|\w*ExecPaths|"
    r"TemporaryFileSystem|Bind\w*Paths|CapabilityBoundingSet|AmbientCapabilities|SystemCall\w+|LockPersonality|"
    r"MemoryDenyWriteExecute|UMask|Limit\w+|RemoveIPC|KeyringMode|Device\w+|IPAddress\w+|SecureBits|ProcSubset|"
    r"Personality)=")
MAX_EXPOSURE = 3.0
EXPOSURE_RE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")
COLOR_RE = re.compile(r"\x1b\[[0-9;]*m")


def hardening(app_unit: str) -> list[str]:
    """The web unit's environment and sandboxing lines (those that are not about its slot: no %i)."""
    out, section = [], ""
    for line in app_unit.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and HARDENING_RE.match(line) and "%i" not in line and "%I" not in line:
            out.append(line)
    return out


def run_properties(app_unit: str, writable: tuple[str, ...] = ()) -> list[str]:
    """systemd-run's arguments that give a transient service the web unit's environment and sandbox;
    ``writable``: directories it may write besides the app's data dirs (the unit's ReadWritePaths=)."""
    lines = [*hardening(app_unit), *(f"ReadWritePaths={p}" for p in writable)]
    return [arg for line in lines for arg in ("-p", line)]


def exposure_command(unit: str) -> str:
    return f"systemd-analyze security --no-pager {shlex.quote(unit)}"


def exposure(output: str, unit: str) -> float | None:
    """The overall exposure :func:`exposure_command` reports for ``unit``; None when it reports none."""
    for found in EXPOSURE_RE.finditer(COLOR_RE.sub("", output)):
        if found.group(1) == unit:
            return float(found.group(2))
    return None


def exposure_problem(unit: str, rc: int, output: str) -> str | None:
    """Why ``unit``'s sandbox fails the check (one line: the unit, its score, how to see why), or None."""
    score = exposure(output, unit)
    if rc != 0 or score is None:
        last = COLOR_RE.sub("", output).strip().splitlines()[-1:] or ["no output"]
        return f"{unit}: no exposure level from `{exposure_command(unit)}` (exit {rc}: {last[0][:200]})"
    if score > MAX_EXPOSURE:
        return (f"{unit}: exposure {score} is above {MAX_EXPOSURE}; `{exposure_command(unit)}` on the host lists "
                "what its unit leaves open (deploy again to get the kit's sandbox, or tighten your app@.service.j2)")
    return None
