"""The secret values this process knows, and masking them out of text.

:func:`provision.config.secret_values` decides what is secret; building settings
remembers those values before validating anything.  Everything printed goes
through :func:`mask`: the output's Printer, the one-line errors of
``cli.guarded``, ``fab inventory``; a dry run shows no content of a file whose old
or new content :func:`holds_secret` (``steps.shown_diff``, ``release.Release.show_diff``),
nor of an app's file whose name :func:`looks_secret`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

MASK = "****"
SECRET_NAMES = (".env", ".env.*", "*.pem", "*.key", "id_*", "*secret*", "*credential*")
_known: set[str] = set()


def remember(values: Iterable[str]) -> None:
    _known.update(v for v in values if v)


def holds_secret(text: str) -> bool:
    return any(secret in text for secret in _known)


def looks_secret(path: str) -> bool:
    """A file whose name, or the name of a folder on its path, looks like it holds secrets."""
    return any(fnmatchcase(part.lower(), name) for part in path.split("/") for name in SECRET_NAMES)


def mask(text: str) -> str:
    """``text`` with every known secret shown as ****."""
    for secret in sorted(_known, key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(secret, MASK)
    return text
