"""The app's health monitor (``app.monitor``): a root systemd timer on the host that checks the app
through nginx every ``monitor`` seconds, as the deploy's health check does; after
``monitor_failures`` failures in a row it restarts the live slot's unit and POSTs
``monitor_webhook`` (``remote/monitor.py`` runs there). Here: its files and units as steps,
installed only when they differ and removed when the setting goes away. Pure."""

from __future__ import annotations

import json

from . import remote
from .layout import MONITOR_DIR, NGINX_LOCAL, PROVISION_VAR, SLOTS, Layout
from .release import host_header
from .steps import Change, Directory, File, Service, Step, q

CHANGED = "monitor-unit"  # notified by the monitor's unit files: systemd reloads, the timer restarts
CHECK_TIMEOUT = 5  # seconds a check waits for the app's answer
RESTART_TIMEOUT = 15  # seconds `systemctl restart --no-block` may take (a busy systemd)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The monitor runs as root (it restarts units): everything else it does not need is closed
# (systemd-analyze security rates it). It writes its own directory only.
HARDENING = """NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=strict
ProtectHome=true
PrivateDevices=true
DevicePolicy=closed
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
MemoryDenyWriteExecute=true
CapabilityBoundingSet=
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
UMask=0077
RemoveIPC=true
KeyringMode=private"""


def config(s) -> dict:
    """What the monitor reads (root's alone on the host: the webhook is a secret)."""
    lay = s.layout
    return {"app": s.name, "url": NGINX_LOCAL + s.health_path, "host": host_header(s), "timeout": CHECK_TIMEOUT,
            "restart_timeout": RESTART_TIMEOUT,
            "failures": s.monitor_failures, "webhook": s.monitor_webhook, "state": lay.monitor_state,
            "upstream_file": lay.upstream_file, "lock": lay.lock, "slots": slots(lay)}


def slots(lay: Layout) -> dict:
    """Each slot as the monitor knows it: its address as the upstream file names it (a socket's, or a
    container app's local port: how the monitor tells the live slot), its unit, its link."""
    return {slot: {"address": lay.address(slot), "unit": lay.unit(slot), "link": lay.slot_link(slot)}
            for slot in SLOTS}


def service_unit(lay: Layout, every: int) -> bytes:
    return (f"# Managed by provision: changes here are overwritten on the next deploy.\n"
            f"[Unit]\nDescription=provision: health monitor of {lay.name}\nAfter=network.target nginx.service\n\n"
            f"[Service]\nType=oneshot\nEnvironment=PATH={PATH}\n"
            f"ExecStart=/usr/bin/python3 {lay.monitor_program} {lay.monitor_config}\n"
            f"TimeoutStartSec={max(30, every * 2)}\nReadWritePaths={lay.monitor_dir}\n{HARDENING}\n").encode()


def timer_unit(lay: Layout, every: int) -> bytes:
    """Every ``every`` seconds, to the second: the first check that long after the timer starts (at boot
    too), each next one that long after the last one started."""
    return (f"# Managed by provision: changes here are overwritten on the next deploy.\n"
            f"[Unit]\nDescription=provision: health monitor of {lay.name}, every {every}s\n\n"
            f"[Timer]\nOnActiveSec={every}s\nOnUnitActiveSec={every}s\nAccuracySec=1s\n\n"
            f"[Install]\nWantedBy=timers.target\n").encode()


class MonitorGone(Step):
    """No monitor (app.monitor off): its timer stopped and disabled, its units and directory removed."""

    def __init__(self, lay: Layout):
        self.lay = lay

    @property
    def name(self):
        return f"no health monitor {self.lay.monitor_unit}"

    def facts(self):
        return [("file", self.lay.monitor_timer_file), ("file", self.lay.monitor_service_file),
                ("file", self.lay.monitor_dir)]

    def plan(self, facts, notified):
        lay = self.lay
        if all(facts.file(p) is None for p in (lay.monitor_timer_file, lay.monitor_service_file, lay.monitor_dir)):
            return None
        units = f"{q(lay.monitor_unit + '.timer')} {q(lay.monitor_unit + '.service')}"
        return Change([f"systemctl disable --now --quiet {units} 2>/dev/null || true",
                       f"rm -rf {q(lay.monitor_timer_file)} {q(lay.monitor_service_file)} {q(lay.monitor_dir)} "
                       f"{q(lay.timers_wants + '/' + lay.monitor_unit + '.timer')}",
                       "systemctl daemon-reload"], summary="remove")


def steps(s) -> list[Step]:
    """The monitor as the settings want it: installed and running, or gone."""
    lay = s.layout
    if not s.monitor:
        return [MonitorGone(lay)]
    return [
        Directory(PROVISION_VAR, owner="root", group="root", mode=0o755),
        Directory(MONITOR_DIR, owner="root", group="root", mode=0o700),
        Directory(lay.monitor_dir, owner="root", group="root", mode=0o700),
        File(lay.monitor_program, remote.source("monitor.py").encode(), mode=0o700),
        File(lay.monitor_config, (json.dumps(config(s), indent=1, sort_keys=True) + "\n").encode(), mode=0o600,
             sensitive=True),
        File(lay.monitor_service_file, service_unit(lay, s.monitor), notify=(CHANGED,)),
        File(lay.monitor_timer_file, timer_unit(lay, s.monitor), notify=(CHANGED,)),
        Service(f"{lay.monitor_unit}.timer", restart_on=(CHANGED,), daemon_reload_on=(CHANGED,)),
    ]
