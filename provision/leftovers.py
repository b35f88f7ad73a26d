"""Data the live release holds that a new release will not have: files written inside it since it
went live (its manifest does not list them) that look like an app's data, SQLite files and
Flask's ``instance/`` folder. Reported at each deploy and dry run, never acted on: the fact
gatherer lists them without following any link below the release."""

from __future__ import annotations

import json

from .config import Settings
from .facts import Fact, Facts
from .layout import RELEASE_DIR

DATA = ("*.sqlite", "*.sqlite3", "*.db", "instance/*", "*/instance/*")  # paths in a release, lower case
LISTED = 50  # paths the fact answers with, at most
SHOWN = 5  # names the warning shows


def data_fact(s: Settings) -> Fact:
    """The live release's files that its manifest does not list and that look like data."""
    return ("unlisted", json.dumps({"dir": s.layout.current, "manifest": f"{RELEASE_DIR}/manifest.json",
                                    "skip": [RELEASE_DIR], "match": list(DATA), "max": LISTED}, sort_keys=True))


def left_behind(s: Settings, facts: Facts) -> tuple[list[str], bool]:
    """What the fact found, by name: an ``instance/`` folder once, SQLite files each; and whether
    there is more than it listed."""
    found = facts[data_fact(s)] or {"paths": [], "more": False}
    names: dict[str, None] = {}
    for path in found["paths"]:
        parts = path.split("/")
        at = parts.index("instance") if "instance" in parts[:-1] else None
        names["/".join(parts[:at + 1]) + "/" if at is not None else path] = None
    return list(names), found["more"]


def data_warning(s: Settings, facts: Facts) -> str | None:
    """One line naming the data the live release holds and the fix; None when it holds none."""
    names, more = left_behind(s, facts)
    if not names:
        return None
    linked = (*s.linked_dirs, *s.linked_files)
    kept = all(any(n.rstrip("/") == p or n.startswith(p + "/") for p in linked) for n in names)
    fix = (f"app.linked_dirs / linked_files keep them in {s.layout.shared}/ from this release on: copy them there"
           if kept else "not shipped; keep them with app.linked_dirs / linked_files")
    shown = ", ".join(names[:SHOWN]) + (", ..." if more or len(names) > SHOWN else "")
    return f"the live release holds data a new release will not have: {shown} ({fix})"
