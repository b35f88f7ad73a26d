"""Facts: what a host is like, asked for by steps as ``(kind, arg)`` pairs and gathered in one
round trip by ``remote/facts.py`` (a stdlib python3 program run on the host)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Iterable

from .errors import ProvisionError, StepFailed
from .remote import python

if TYPE_CHECKING:
    from .ssh import Remote
    from .steps import Step

Fact = tuple  # (kind, arg)


class Facts:
    """Answers of the remote fact gatherer, looked up by (kind, arg)."""

    def __init__(self, answers: dict[Fact, object]):
        self._answers = dict(answers)

    def __getitem__(self, key: Fact):
        return self._answers[key]

    def file(self, path: str) -> dict | None:
        return self._answers[("file", path)]

    def content(self, path: str) -> str | None:
        return self._answers[("content", path)]

    def files(self, path: str) -> dict[str, str | None] | None:
        return self._answers[("files", path)]

    def content_below(self, base: str, rel: str) -> str | None:
        return self._answers[below(base, rel)]

    def package(self, name: str) -> bool:
        return bool(self._answers[("package", name)])

    def ls(self, path: str) -> list[str] | None:
        return self._answers[("ls", path)]

    def user(self, name: str) -> dict | None:
        return self._answers[("user", name)]

    def service(self, name: str) -> dict | None:
        return self._answers[("service", name)]

    def command(self, cmd: str) -> int:
        return self._answers[("command", cmd)]

    def http(self, url: str, host: str = "", expect: tuple[str, tuple[str, ...]] | None = None) -> int:
        return self._answers[("http", http_fact_arg(url, host, expect))]


def below(base: str, rel: str) -> Fact:
    """The fact of the text of ``base/rel``, read without following any symlink below ``base``."""
    return ("content_below", f"{base}\0{rel}")


def http_fact_arg(url: str, host: str, expect: tuple[str, tuple[str, ...]] | None) -> str:
    return json.dumps([url, host, *((expect[0], list(expect[1])) if expect else ())])


def collect_facts(steps: Iterable["Step"]) -> list[Fact]:
    seen: dict[Fact, None] = {}
    for s in steps:
        for f in s.facts():
            seen.setdefault(tuple(f), None)
    return list(seen)


def gather(remote: Remote, keys: list) -> Facts:
    rc, out, err = remote.exec(remote.sudo + python("facts.py", keys), timeout=120)
    if rc != 0:
        if "a password is required" in err or "a terminal is required" in err:
            raise ProvisionError(f"{remote.label}: sudo needs a password for {remote.user}; connect as root "
                                 "or allow passwordless sudo for that user")
        if rc == 127:
            raise ProvisionError(f"{remote.label}: python3 is not installed on the host; install it "
                                 "(apt-get install python3) and retry")
        raise StepFailed(f"{remote.label}: gathering facts failed (rc {rc}): {err.strip()[-500:]}")
    answers = json.loads(out)["facts"]
    return Facts({tuple(k): v for k, v in zip(keys, answers)})
