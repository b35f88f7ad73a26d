"""The host itself as a transport: what a push-to-deploy runs on the host (provision/receive.py).

:class:`Local` has :class:`provision.ssh.Remote`'s interface (``exec``, ``label``,
``round_trips``, ``sudo``, ``user``, ``close``), so the runner, the facts and the deploy lock run
unchanged: each command is ``bash -c COMMAND`` in a child process, as the user this program runs as
(root, for a push: the hook runs it through sudo).
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import threading
from typing import BinaryIO, Callable

from .errors import StepFailed


class Local:
    """This machine, running commands as the current user (no sudo when root)."""

    def __init__(self, label: str):
        self.label, self.round_trips = label, 0

    @property
    def user(self) -> str:
        return getpass.getuser()

    @property
    def sudo(self) -> str:
        return "" if os.geteuid() == 0 else "sudo -n "

    def close(self) -> None:
        pass

    def exec(self, command: str, stdin: bytes = b"", timeout: float | None = None,
             on_line: Callable[[str], None] | None = None, then: BinaryIO | None = None,
             on_sent: Callable[[int], None] | None = None) -> tuple[int, str, str]:
        """As Remote.exec: run ``command`` with ``stdin`` then what ``then`` reads on its stdin;
        (rc, stdout, stderr), ``on_line`` seeing each line of stdout as it comes."""
        self.round_trips += 1
        proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)  # its own group: a timeout kills all of it
        err = bytearray()

        def feed():
            try:
                proc.stdin.write(stdin)
                sent = 0
                for block in iter(lambda: then.read(1 << 18), b"") if then else ():
                    proc.stdin.write(block)
                    sent += len(block)
                    if on_sent:
                        on_sent(sent)
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass

        def drain():
            for block in iter(lambda: proc.stderr.read1(65536), b""):
                err.extend(block)

        timed_out = threading.Event()

        def expire():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # bash and what it started (they hold stdout open)
            except ProcessLookupError:
                pass

        threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
        for t in threads:
            t.start()
        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        out = bytearray()
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                if on_line:
                    start = out.rfind(b"\n") + 1
                    for line in (out[start:] + chunk).split(b"\n")[:-1]:
                        on_line(line.decode("utf-8", "replace"))
                out += chunk
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
        for t in threads:
            t.join(timeout=5)
        if timed_out.is_set():
            raise StepFailed(f"{self.label}: `{command[:60]}` timed out after {timeout:.0f}s")
        return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
