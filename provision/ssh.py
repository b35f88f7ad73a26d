"""SSH: connecting to a host (host keys checked, every failure one clear line) and running
commands on it, with sudo when the login user is not root."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

import paramiko
from fabric import Connection

from .errors import AuthFailed, ProvisionError, StepFailed, Unreachable


@dataclass
class Remote:
    """A connected host: runs commands, with sudo when not root."""

    conn: Connection
    label: str
    round_trips: int = 0

    @property
    def user(self) -> str:
        return self.conn.user

    @property
    def sudo(self) -> str:
        return "" if self.conn.user == "root" else "sudo -n "

    def close(self) -> None:
        self.conn.close()

    def exec(self, command: str, stdin: bytes = b"", timeout: float | None = None,
             on_line: Callable[[str], None] | None = None, then: BinaryIO | None = None,
             on_sent: Callable[[int], None] | None = None) -> tuple[int, str, str]:
        """Run one command, feeding ``stdin`` then what ``then`` reads (an upload, in blocks:
        ``on_sent`` sees the bytes of it sent so far); returns (rc, stdout, stderr).
        ``on_line`` sees each line of stdout as it arrives (live progress)."""
        self.round_trips += 1
        transport = self.conn.client.get_transport()
        try:
            if transport is None or not transport.is_active():
                raise EOFError("the connection is closed")
            chan = transport.open_session(timeout=30)
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:  # one host's problem, never a traceback
            raise Unreachable(f"{self.label}: lost the SSH connection ({e or type(e).__name__}); check the host "
                              "and run the command again") from None
        out, err = bytearray(), bytearray()

        def feed():
            try:
                chan.sendall(stdin)
                sent = 0
                for block in iter(lambda: then.read(1 << 18), b"") if then else ():
                    chan.sendall(block)
                    sent += len(block)
                    if on_sent:
                        on_sent(sent)
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


class KnownHosts:
    """known_hosts files, each parsed once per process (again when it changes). paramiko's own
    loading parses a whole file per connection, every line into a key, comparing each with all
    before it: for a fleet of 50 sandbox droplets (150 lines) that was most of fab's CPU, serialised
    by the GIL, before any host was reached."""

    _lock = threading.Lock()
    _parsed: dict[str, tuple[tuple, paramiko.HostKeys]] = {}

    @classmethod
    def keys(cls, path: str) -> paramiko.HostKeys:
        """The keys of file ``path`` (empty when there is none); OSError or paramiko.SSHException
        when it cannot be read."""
        def stamp():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            return st.st_ino, st.st_size, st.st_mtime_ns

        before = stamp()
        with cls._lock:
            hit = cls._parsed.get(path)
        if hit and hit[0] == before:
            return hit[1]
        for _ in range(3):  # a file written in place while it was read: read it again
            keys = paramiko.HostKeys(path) if before else paramiko.HostKeys()
            after = stamp()
            if after == before:
                break
            before = after
        with cls._lock:
            cls._parsed[path] = (before, keys)
        return keys

    @classmethod
    def known(cls, name: str, own: str | None) -> dict[str, paramiko.PKey]:
        """The keys of host ``name`` (as known_hosts files name it) as paramiko would find them:
        from ~/.ssh/known_hosts (passed over when unreadable), else from the host's own file ``own``
        (OSError or paramiko.SSHException when that cannot be read)."""
        for path in (os.path.expanduser("~/.ssh/known_hosts"), own):
            if path is None:
                continue
            try:
                entry = cls.keys(path).lookup(name)
            except (OSError, paramiko.SSHException):
                if path == own:
                    raise
                continue
            if entry:
                return dict(entry.items())
        return {}


# Fabric's Connection uses the invoke Config it is given as its own, and invoke rebuilds a config's
# data whenever one of its values is set: with 50 hosts connecting at once from one shared config, a
# connection once read it empty ("No attribute or config key found for 'authentication'"). Each
# connection gets a copy, made one at a time.
_CONFIG_LOCK = threading.Lock()


def known_name(conn: Connection) -> str:
    """A host as known_hosts files name it, and as paramiko looks it up: after ~/.ssh/config's
    HostName and Port (an alias is never the name its key is known by)."""
    return conn.host if conn.port == 22 else f"[{conn.host}]:{conn.port}"


def connect(host: str, user: str, port: int, key: str | None, known_hosts: str | None,
            config=None, label: str | None = None, timeout: float = 10, accept_new_host_key: bool = False) -> Remote:
    """Open an SSH connection, turning every way it can fail into one clear line.

    Host keys are checked against ~/.ssh/known_hosts and the host's ``known_hosts``
    setting, if any (where new keys are then recorded)."""
    label = label or host
    connect_kwargs = {"timeout": timeout, "banner_timeout": timeout, "auth_timeout": timeout}
    if key:
        connect_kwargs["key_filename"] = [os.path.expanduser(key)]
    with _CONFIG_LOCK:  # a Connection keeps the config it is given: each gets its own copy (see _CONFIG_LOCK)
        own = config.clone() if config is not None else None
        conn = Connection(host, user=user, port=port, config=own, connect_kwargs=connect_kwargs)
    record_to = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
    known_as = known_name(conn)
    try:
        found = KnownHosts.known(known_as, record_to if known_hosts else None)
    except (OSError, paramiko.SSHException) as e:
        raise ProvisionError(f"{label}: cannot read known_hosts file {known_hosts}: {e}; fix the "
                             "`known_hosts` setting")
    for kind, hostkey in found.items():
        conn.client.get_host_keys().add(known_as, kind, hostkey)
    conn.client.set_missing_host_key_policy(HostKeyPolicy(record_to, accept_new_host_key))
    where = f"{user}@{host}:{port}"
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
        raise AuthFailed(f"{label}: SSH authentication failed for {where}; check the user and the key "
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
