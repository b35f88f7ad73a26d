"""The one place that acts: runs a list of steps against a host over Fabric.

Round trips per host: one to gather every fact, one to apply every change
(none when nothing changes); a dry run applies nothing, and gathers what its
diffs need (old contents) in its second, if they need anything.  Output is a line per step and a per-host
summary; the result object carries the same for callers and tests.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import select
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paramiko
from fabric import Connection

from . import secrets
from .errors import ProvisionError, StepFailed, Unreachable
from .remote import python
from .lock import Lock, describe_holder
from .script import build_script, parse_report
from .steps import Facts, Planned, Step, collect_facts, plan

@dataclass
class Remote:
    """A connected host: runs commands, with sudo when not root."""

    conn: Connection
    label: str
    round_trips: int = 0

    @property
    def sudo(self) -> str:
        return "" if self.conn.user == "root" else "sudo -n "

    def exec(self, command: str, stdin: bytes = b"", timeout: float | None = None,
             on_line: Callable[[str], None] | None = None) -> tuple[int, str, str]:
        """Run one command, feeding ``stdin``; returns (rc, stdout, stderr).
        ``on_line`` sees each line of stdout as it arrives (live progress)."""
        self.round_trips += 1
        transport = self.conn.client.get_transport()
        chan = transport.open_session(timeout=30)
        chan.exec_command(command)
        out, err = bytearray(), bytearray()

        def feed():
            try:
                chan.sendall(stdin)
                chan.shutdown_write()
            except (OSError, EOFError, paramiko.SSHException):
                pass

        sender = threading.Thread(target=feed, daemon=True)
        sender.start()
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            if chan.recv_ready():
                chunk = chan.recv(65536)
                if on_line:
                    start = out.rfind(b"\n") + 1
                    for line in (out[start:] + chunk).split(b"\n")[:-1]:
                        on_line(line.decode("utf-8", "replace"))
                out += chunk
                continue
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                continue
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if deadline and time.monotonic() > deadline:
                chan.close()
                raise StepFailed(f"{self.label}: `{command[:60]}` timed out after {timeout:.0f}s")
            select.select([chan], [], [], 0.2)
        rc = chan.recv_exit_status()
        sender.join(timeout=5)
        chan.close()
        return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(f"unknown host key for {hostname}")
        self.hostname, self.key = hostname, key


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown host keys are refused, or with ``accept_new`` recorded (OpenSSH's accept-new).
    A changed key never reaches this policy: paramiko refuses it (BadHostKeyException)."""

    _write = threading.Lock()

    def __init__(self, record_to: str, accept_new: bool):
        self.record_to, self.accept_new = record_to, accept_new

    def missing_host_key(self, client, hostname, key):
        if not self.accept_new:
            raise UnknownHostKey(hostname, key)
        with self._write:
            os.makedirs(os.path.dirname(self.record_to) or ".", mode=0o700, exist_ok=True)
            with open(self.record_to, "a") as fh:
                fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


def connect(host: str, user: str, port: int, key: str | None, known_hosts: str | None,
            config=None, label: str | None = None, timeout: float = 10, accept_new_host_key: bool = False) -> Remote:
    """Open an SSH connection, turning every way it can fail into one clear line.

    Host keys are checked against ~/.ssh/known_hosts and the host's ``known_hosts``
    setting, if any (where new keys are then recorded)."""
    label = label or host
    connect_kwargs = {"timeout": timeout, "banner_timeout": timeout, "auth_timeout": timeout}
    if key:
        connect_kwargs["key_filename"] = [os.path.expanduser(key)]
    conn = Connection(host, user=user, port=port, config=config, connect_kwargs=connect_kwargs)
    conn.client.load_system_host_keys()
    record_to = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
    if known_hosts and os.path.exists(record_to):
        try:
            conn.client.load_host_keys(record_to)
        except (OSError, paramiko.SSHException) as e:
            raise ProvisionError(f"{label}: cannot read known_hosts file {known_hosts}: {e}; fix the "
                                 "`known_hosts` setting")
    conn.client.set_missing_host_key_policy(HostKeyPolicy(record_to, accept_new_host_key))
    where = f"{user}@{host}:{port}"
    known_as = host if port == 22 else f"[{host}]:{port}"  # as known_hosts files name it
    try:
        conn.open()
    except paramiko.BadHostKeyException as e:
        raise ProvisionError(f"{label}: host key of {host} has CHANGED (now {fingerprint(e.key)}); refusing to "
                             f"connect: this may be an attack. If the host was rebuilt, remove the old key with "
                             f"`ssh-keygen -R {shlex.quote(known_as)} -f {record_to}` and retry with "
                             "--accept-new-host-key")
    except UnknownHostKey as e:
        raise ProvisionError(f"{label}: host key of {host} is unknown ({fingerprint(e.key)}); check that "
                             f"fingerprint, then retry with --accept-new-host-key to record it in {record_to}")
    except paramiko.AuthenticationException:
        raise ProvisionError(f"{label}: SSH authentication failed for {where}; check the user and the key "
                             "(-i KEY or `key=` in the inventory)")
    except paramiko.SSHException as e:
        raise Unreachable(f"{label}: SSH to {where} failed: {e}; check the address and that sshd runs")
    except socket.gaierror:
        raise Unreachable(f"{label}: host name {host!r} does not resolve; check -H or `host=` in the inventory")
    except (OSError, EOFError) as e:
        causes = list(getattr(e, "errors", {}).values()) or [e]  # paramiko: one error per address tried
        if any(getattr(x, "errno", None) == errno.ECONNREFUSED for x in causes):
            raise Unreachable(f"{label}: connection refused by {host}:{port}: nothing listens there; check the "
                              "port and that sshd runs")
        reason = getattr(causes[0], "strerror", None) or str(causes[0]) or type(causes[0]).__name__
        raise Unreachable(f"{label}: cannot reach {where}: {reason}; check the address, port and firewall")
    return Remote(conn, label)


def gather(remote: Remote, keys: list) -> Facts:
    rc, out, err = remote.exec(remote.sudo + python("facts.py", keys), timeout=120)
    if rc != 0:
        if "a password is required" in err or "a terminal is required" in err:
            raise ProvisionError(f"{remote.label}: sudo needs a password for {remote.conn.user}; connect as root "
                                 "or allow passwordless sudo for that user")
        if rc == 127:
            raise ProvisionError(f"{remote.label}: python3 is not installed on the host; install it "
                                 "(apt-get install python3) and retry")
        raise StepFailed(f"{remote.label}: gathering facts failed (rc {rc}): {err.strip()[-500:]}")
    answers = json.loads(out)["facts"]
    return Facts({tuple(k): v for k, v in zip(keys, answers)})


@dataclass
class HostResult:
    host: str
    planned: list[Planned] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    failed_step: int | None = None
    error: str = ""
    duration: float = 0.0
    round_trips: int = 0
    code: int = 1  # exit code this host's failure stands for
    skipped: bool = False

    @property
    def changed(self) -> int:
        return sum(1 for i, p in enumerate(self.planned) if p.status == "change" and i in self.done)

    @property
    def ok(self) -> int:
        return sum(1 for i, p in enumerate(self.planned) if p.status != "change" and
                   (p.change is None or i in self.done))

    @property
    def failed(self) -> bool:
        return bool(self.error)

    def changed_steps(self) -> list[str]:
        return [p.step.name for i, p in enumerate(self.planned) if p.status == "change" and i in self.done]


class Printer:
    """All output of a run goes through here, so that secrets are masked in every line."""

    def __init__(self, stream=None, verbose: bool = False):
        self.stream = stream or sys.stdout
        self.verbose = verbose
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:  # hosts run in threads: one whole line at a time
            print(secrets.mask(text), file=self.stream, flush=True)

    def error(self, text: str) -> None:
        """A host's one-line problem (unreachable, refused key, ...), on stderr."""
        with self._lock:
            print(secrets.mask(f"error: {text}"), file=sys.stderr, flush=True)

    def step(self, host: str, status: str, p: Planned, seconds: float | None = None) -> None:
        summary = f" ({p.change.summary})" if p.change is not None and p.change.summary else ""
        timing = f" [{seconds:.2f}s]" if self.verbose and seconds is not None else ""
        self.line(f"{host}: {status:<7} {p.step.name}{summary}{timing}")
        if self.verbose and p.change is not None:
            for c in p.change.commands:
                if "__PROVISION_EOF__" in c:  # a payload: show the command, not the data
                    c = c.split("\n", 1)[0] + " … (payload)"
                lines = c.split("\n")
                if len(lines) > 4:  # an inline script: its first and last lines say what it is
                    lines = [lines[0], f"… ({len(lines) - 2} more lines)", lines[-1]]
                self.line("    $ " + "\n      ".join(lines))


def run_steps(remote: Remote, steps: list[Step], *, dry_run: bool = False, printer: Printer | None = None,
              env: dict[str, str] | None = None, lock: Lock | None = None, _retry: bool = True) -> HostResult:
    printer = printer or Printer()
    start = time.monotonic()
    result = HostResult(remote.label)
    facts = gather(remote, [("os", "")] + collect_facts(steps))
    osf = facts[("os", "")]
    if not (osf["apt"] and osf["systemd"]):
        missing = " and ".join(w for w, ok in (("apt", osf["apt"]), ("systemd", osf["systemd"])) if not ok)
        raise ProvisionError(f"{remote.label}: unsupported OS ({osf['id'] or 'unknown'} {osf['version']}): no "
                             f"{missing}; provision manages Debian and Ubuntu hosts with apt and systemd")
    try:
        result.planned = planned = plan(steps, facts)
    except ProvisionError as e:  # found while planning, before anything was applied
        raise ProvisionError(f"{remote.label}: {e}", e.code) from None
    if dry_run:
        # What the diffs need beyond the plan's facts (old contents): one more round trip at most
        changing = [p for p in planned if p.status == "change"]
        wanted = list(dict.fromkeys(f for p in changing for f in p.step.diff_facts(facts)))
        more = gather(remote, wanted) if wanted else Facts({})
        for p in planned:
            printer.step(remote.label, "would" if p.status == "change" else p.status, p)
            d = p.step.show_diff(facts, more) if p.status == "change" else ""
            if d:
                printer.line(d.rstrip("\n"))
        result.duration = time.monotonic() - start
        result.round_trips = remote.round_trips
        return result
    for p in planned:  # what is already as desired, known before anything runs
        if p.change is None:
            printer.step(remote.label, "ok", p)
    if any(p.change is not None for p in planned):
        script = build_script(planned, env, lock)

        def progress(line: str) -> None:  # a line per step as it completes: every done step passes here
            if line.startswith("@@ok "):
                i = int(line.split()[1])
                p = planned[i]
                printer.step(remote.label, "ok" if p.change.check else "changed", p, parse_report(line).seconds.get(i))

        rc, out, err = remote.exec(f"{remote.sudo}bash -s", script.encode(), timeout=1800, on_line=progress)
        report = parse_report(out)
        if report.waited and _retry:
            # An interrupted deploy finished its step meanwhile: plan again from fresh facts.
            printer.line(f"{remote.label}: waited for an interrupted deploy to finish its step; planning again")
            return run_steps(remote, steps, dry_run=dry_run, printer=printer, env=env, lock=lock, _retry=False)
        result.done = report.done
        if report.stale is not None:
            printer.line(f"{remote.label}: took over the deploy lock left by {describe_holder(report.stale)}")
        if report.locked_by is not None:
            result.error = (f"{remote.label}: another deploy holds the lock: {describe_holder(report.locked_by)}; "
                            "wait for it, or if it is stuck re-run with --break-lock")
        elif rc != 0:
            result.failed_step = report.failed
            if report.failed is not None:
                name = planned[report.failed].step.name
                result.error = (f"{remote.label}: step `{name}` failed (exit {report.rc})"
                                + (f"\n  command: {report.command}" if report.command else "")
                                + ("\n  " + report.output.replace("\n", "\n  ") if report.output else ""))
            else:
                result.error = f"{remote.label}: remote script failed (exit {rc}): {err.strip()[-500:]}"
    if result.failed_step is not None:
        printer.step(remote.label, "FAILED", planned[result.failed_step])
    result.duration = time.monotonic() - start
    result.round_trips = remote.round_trips
    if result.error:
        printer.line(result.error)
    return result
