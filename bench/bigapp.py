"""The big reference app of the benchmark: examples/hello plus thousands of files, as a grown Django
or Flask project has them (modules, templates, static assets; some binary), written deterministically
so every run and every tool ships the same bytes.

    make_big_app(dest)           # examples/hello + 3,000 files, ~36 MB, under dest
    touch_one_line(dest, "x")    # a one-line change in app.py
    make_big_file(dest, 200)     # examples/hello + one 200 MB file (incompressible)
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples/hello"
WORDS = ("def class return import self request response model view field query user order item cache "
         "session template static value index update create delete render context settings config").split()
BINARY_SHARE = 10  # one file in ten is binary (images, fonts): incompressible


def _text(rng: random.Random, size: int) -> bytes:
    lines, n = [], 0
    while n < size:
        line = "    " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f"  # {rng.random():.6f}\n"
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


def make_big_app(dest: Path, files: int = 3000, megabytes: int = 36, seed: int = 13) -> Path:
    """examples/hello copied to ``dest`` plus ``files`` files (~``megabytes`` MB in all) in folders of 30."""
    dest = Path(dest)
    shutil.copytree(HELLO, dest)
    rng = random.Random(seed)
    average = megabytes * 1_000_000 // files
    for i in range(files):
        folder = dest / "bigpkg" / f"part{i // 30:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = rng.randint(average // 2, average * 3 // 2)
        if i % BINARY_SHARE == 0:
            (folder / f"asset{i:04d}.bin").write_bytes(rng.randbytes(size))
        else:
            (folder / f"mod{i:04d}.py").write_bytes(_text(rng, size))
    for folder in {p.parent for p in (dest / "bigpkg").rglob("*.py")}:
        (folder / "__init__.py").touch()
    (dest / "bigpkg/__init__.py").touch()
    return dest


def touch_one_line(app: Path, text: str) -> None:
    """Change the greeting line of the app's app.py to ``text`` (one line of one file)."""
    app_py = Path(app) / "app.py"
    lines = app_py.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(("return \"Hello", "return 'Hello")))
    lines[at] = f"    return {text + chr(10)!r}\n"
    app_py.write_text("".join(lines))


def make_big_file(dest: Path, megabytes: int = 200, seed: int = 7) -> Path:
    """examples/hello copied to ``dest`` plus one incompressible file of ``megabytes`` MB (a model, a
    data set), written in 1 MB blocks."""
    dest = Path(dest)
    shutil.copytree(HELLO, dest)
    rng = random.Random(seed)
    with open(dest / "model.bin", "wb") as fh:
        for _ in range(megabytes):
            fh.write(rng.randbytes(1_000_000))
    return dest
