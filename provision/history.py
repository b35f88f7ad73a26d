"""The release log (``releases.log`` on the host, one JSON object a line, appended by the switch):
what went live, was rolled back to or refused, when, by whom."""

from __future__ import annotations

import json
from dataclasses import dataclass

DONE = {"deploy": "deployed", "rollback": "rolled back to", "refused": "REFUSED"}  # actions, as `fab releases` says them


@dataclass
class History:
    """What the release log (``releases.log``, written by the switch) says about releases."""

    went_live: list[str]  # in order, one entry per switch to it (deploy or rollback)
    refused: set[str]
    first: dict[str, dict]  # each release's first entry: when, by whom

    @classmethod
    def read(cls, text: str | None) -> "History":
        went_live, refused, first = [], set(), {}
        for line in (text or "").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("release"), str):
                continue
            first.setdefault(entry["release"], entry)
            if entry.get("action") in ("deploy", "rollback"):
                went_live.append(entry["release"])
            elif entry.get("action") == "refused":
                refused.add(entry["release"])
        return cls(went_live, refused, first)

    def state(self, release: str) -> str:
        """live-at-some-time, refused (its health gate failed) or never-live (an interrupted deploy)."""
        if release in self.went_live:
            return "went live"
        return "refused" if release in self.refused else "never live"

    def before(self, live: str | None, present: list[str]) -> str | None:
        """The release that was live before ``live``, among those still ``present``."""
        seen_live = False
        for release in reversed(self.went_live):
            if release == live:
                seen_live = True
            elif (seen_live or live is None) and release in present:
                return release
        return None
