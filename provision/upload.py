"""What crosses the wire beside the apply script: a release's files, as one gzipped tar.

The runner sends the script, then this stream, on the apply's one SSH channel (see
:func:`provision.script.loader`); the host keeps it in a root-only spool file for the script's
steps (``$__upload``). Only the files a host lacks are in it (:class:`provision.release.Release`
picks them), so a one-line change sends one file, whatever the size of the app. Built once per
distinct content and shared by every host that needs the same files up to :data:`IN_MEMORY` bytes
of content (kept in memory); larger ones are compressed as they are sent, for each host: memory
stays bounded whatever the file sizes.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import ProvisionError
from .source import Source

IN_MEMORY = 8 << 20


@dataclass(frozen=True)
class Upload:
    source: Source
    paths: tuple[str, ...]  # the source's files to send
    extra: tuple[tuple[str, bytes], ...] = ()  # more members: (name in the tar, content)
    failures: list = field(default_factory=list, compare=False, hash=False)  # a piped upload's

    @property
    def raw_size(self) -> int:
        """Bytes of file content it carries (before compression)."""
        return sum(self.source.size(p) for p in self.paths) + sum(len(d) for _, d in self.extra)

    @property
    def key(self) -> str:
        h = hashlib.sha256(self.source.digest.encode())
        for p in self.paths:
            h.update(b"\0p" + p.encode())
        for name, data in self.extra:
            h.update(b"\0e" + name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()

    def open(self) -> tuple[BinaryIO, int | None]:
        """A fresh reader of the gzipped tar, and its size in bytes (None: not known beforehand).

        Up to IN_MEMORY bytes of content it is built once and shared by every host that needs it;
        beyond, it is made as it is sent, for each host (a thread compresses into a pipe the
        sender reads): memory stays a buffer, and compressing overlaps sending."""
        if self.raw_size <= IN_MEMORY:
            return _built.get(self)
        r, w = os.pipe()
        level = compression_level(self.source, self.paths)

        def produce() -> None:
            with open(w, "wb") as out:
                try:
                    self.source.write_tar(out, self.paths, dict(self.extra), compresslevel=level)
                except (BrokenPipeError, ValueError):  # the reader stopped: the host went away
                    pass
                except ProvisionError as e:  # the stream ends short: the host's tar fails; the runner says why
                    self.failures.append(e)

        threading.Thread(target=produce, daemon=True, name="upload").start()
        return open(r, "rb"), None


def compression_level(source: Source, paths: tuple[str, ...], sample: int = 1 << 16, largest: int = 20) -> int:
    """gzip's level for a large upload: 1 (fast: large uploads are dominated by their large
    files), 0 when samples of its largest files do not compress (media, models, archives:
    compressing them costs seconds and saves nothing)."""
    big = sorted(paths, key=source.size, reverse=True)[:largest]
    raw = packed = 0
    for rel in big:
        if rel in source.links:
            continue
        with open(source.path(rel), "rb") as fh:
            data = fh.read(sample)
        raw, packed = raw + len(data), packed + len(zlib.compress(data, 1))
    return 0 if raw and packed > 0.9 * raw else 1


@dataclass
class _Built:
    """Uploads built so far in this process, by content: several hosts, one compression. Only
    uploads of at most IN_MEMORY bytes of content come here (larger ones are piped per host)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    done: dict[str, bytes] = field(default_factory=dict)
    building: dict[str, threading.Lock] = field(default_factory=dict)

    def get(self, upload: Upload) -> tuple[BinaryIO, int]:
        key = upload.key
        with self.lock:
            one = self.building.setdefault(key, threading.Lock())
        with one:  # the first host builds it, the others wait for it
            if key not in self.done:
                buf = io.BytesIO()
                upload.source.write_tar(buf, upload.paths, dict(upload.extra))
                self.done[key] = buf.getvalue()
        data = self.done[key]
        return io.BytesIO(data), len(data)


_built = _Built()


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def describe(upload: Upload) -> str:
    n = len(upload.paths)
    return f"{n} file{'s' * (n != 1)} ({megabytes(upload.raw_size)})"
