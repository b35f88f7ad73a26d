"""`fab check` pins the host key on every connection it makes, and runs on hosts given by address.

Two droplets: A (the real host) and B (an impostor with other host keys, reached through a
forwarder that sends the first connection to A and every later one to B)."""

import os
import re
import select
import socket
import threading
import time

import pytest

from .conftest import Host

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(sandbox, tmp_path_factory):
    prefix = os.environ.get("PROVISION_TEST_PREFIX", "it-")  # as the droplet fixture: runs side by side
    names = [f"{prefix}check-a", f"{prefix}check-b"]
    try:
        droplets = [sandbox.up(n) for n in names]
        inv = tmp_path_factory.mktemp("inv") / "inventory.ini"
        inv.write_text(sandbox.inventory())
        yield [Host(d, sandbox, inv) for d in droplets]
    finally:
        for n in names:
            sandbox.down(n)


class Forwarder:
    """127.0.0.1:<random port>: the first connection goes to ``first``, every later one to ``then``.
    Stops by itself after ``lifetime`` seconds, or when the ``with`` block ends."""

    def __init__(self, first: tuple[str, int], then: tuple[str, int], lifetime: float = 120):
        self.first, self.then = first, then
        self.deadline = time.monotonic() + lifetime
        self.sent: list[str] = []  # where each connection went, by address
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> "Forwarder":
        self.threads[0].start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for t in list(self.threads):
            t.join(timeout=5)

    def _running(self) -> bool:
        return not self.stopped.is_set() and time.monotonic() < self.deadline

    def _accept(self) -> None:
        with self.listener:
            while self._running():
                try:
                    client, _ = self.listener.accept()
                except socket.timeout:
                    continue
                dest = self.then if self.sent else self.first
                self.sent.append(dest[0])
                try:
                    upstream = socket.create_connection(dest, timeout=5)
                except OSError:
                    client.close()
                    continue
                t = threading.Thread(target=self._pipe, args=(client, upstream), daemon=True)
                self.threads.append(t)
                t.start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with a, b:
            while self._running():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for src in ready:
                    try:
                        data = src.recv(65536)
                        if not data:
                            return
                        (b if src is a else a).sendall(data)
                    except OSError:  # a side hung up hard (a refused host key does)
                        return


def host_keys(h: Host) -> list[str]:
    """The droplet's host keys as the sandbox recorded them: "TYPE BASE64" each."""
    lines = h.sandbox.known_hosts.read_text().splitlines()
    return [l.split(" ", 1)[1] for l in lines if l.split(" ", 1)[0] == h.address]


def root_logins(h: Host) -> int:
    """Accepted root logins in the droplet's sshd log (this command's own included)."""
    return int(h.sh("journalctl -u ssh --no-pager -o cat | grep -c '^Accepted publickey for root' || true"))


def test_check_refuses_a_host_whose_key_changes_after_the_first_connection(pair, tmp_path):
    a, b = pair
    with Forwarder(first=(a.address, 22), then=(b.address, 22)) as fwd:
        known = tmp_path / "known_hosts"
        known.write_text("".join(f"[127.0.0.1]:{fwd.port} {k}\n" for k in host_keys(a)))
        inv = tmp_path / "inventory.ini"
        inv.write_text(f"impostor host=127.0.0.1 port={fwd.port} user=root key={a.sandbox.key} "
                       f"known_hosts={known}\n")
        logins_before = root_logins(b)
        assert logins_before >= 1  # the count sees logins: its own at least
        res = a.fab("-H", "impostor", "check", env={"FABRIC_INVENTORY": str(inv)}, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("error: impostor: host key of 127.0.0.1 has CHANGED (now "), out
    assert "refusing to connect" in line
    assert "passed" not in res.stdout and "Traceback" not in out
    # A once (the key matched), then B once, refused at the key exchange: no retry, no login.
    assert fwd.sent == [a.address, b.address], out
    assert root_logins(b) == logins_before + 1  # + the count's own login: `fab check` never got in on B


def test_check_by_address_runs_the_checks(pair, tmp_path):
    a = pair[0]
    key = str(a.sandbox.key)
    res = a.fab("-H", a.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr

    # The address is in the inventory: that host's settings, known_hosts and alias.
    res = a.fab("-H", f"root@{a.address}", "-i", key, "check", timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"test_hello_answers_its_greeting[{a.name}] PASSED" in res.stdout, out
    assert re.search(r"\b\d+ passed\b", res.stdout) and "failed" not in res.stdout, out

    # No inventory at all: the address is the alias, the key from -i, host keys from ~/.ssh/known_hosts.
    empty = tmp_path / "empty.ini"
    empty.write_text("")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/known_hosts").write_text("".join(f"{a.address} {k}\n" for k in host_keys(a)))
    env = {"FABRIC_INVENTORY": str(empty), "HOME": str(home)}
    res = a.fab("-H", f"root@{a.address}", "-i", key, "check", env=env, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"test_hello_answers_its_greeting[root@{a.address}] PASSED" in res.stdout, out
    assert "KeyError" not in out and "No authentication methods" not in out
    assert re.search(r"\b\d+ passed\b", res.stdout) and "failed" not in res.stdout, out

    # ... and a host whose key is not there is refused with one line, before any check.
    (home / ".ssh/known_hosts").write_text("")
    res = a.fab("-H", f"root@{a.address}", "-i", key, "check", env=env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    [line] = res.stderr.strip().splitlines()
    assert f"host key of {a.address} is unknown" in line
    assert "passed" not in res.stdout
