"""The executor's dry run against a fake host: what it prints."""

import io
import json
import shlex
from pathlib import Path

from provision import config as cfg
from provision.executor import Printer, run_steps
from provision.steps import File, Lines

ROOT = Path(__file__).resolve().parents[2]
OS = {"id": "debian", "version": "12", "apt": True, "systemd": True, "python": "3.11"}


class FakeRemote:
    """Answers the fact gatherer from a dict; runs nothing else."""

    label, sudo, round_trips = "web1", "", 0

    def __init__(self, answers: dict):
        self.answers = answers

    def exec(self, command, stdin=b"", timeout=None, on_line=None):
        keys = json.loads(shlex.split(command)[-1])
        return 0, json.dumps({"facts": [self.answers[tuple(k)] for k in keys]}), ""


def test_dry_run_after_a_password_change_shows_neither_password():
    new, old = "http://bob:new-pw@proxy:3128", "http://bob:old-pw@proxy:3128"
    cfg.build(cfg.layer(dict(cfg.DEFAULTS), {}, {}, {"proxy": new}), ROOT)  # settings make new-pw a known secret
    steps = [File("/etc/apt/apt.conf.d/80proxy", f'Acquire::http::Proxy "{new}";\n'.encode()),
             Lines("/etc/environment", (("http_proxy", new),))]
    host = FakeRemote({
        ("os", ""): OS,
        ("file", "/etc/apt/apt.conf.d/80proxy"): {"type": "file", "mode": 0o644, "owner": "root", "group": "root",
                                                  "sha256": "0"},
        ("content", "/etc/apt/apt.conf.d/80proxy"): f'Acquire::http::Proxy "{old}";\n',
        ("content", "/etc/environment"): f'PATH="/usr/bin"\nhttp_proxy={old}\n',
    })
    out = io.StringIO()
    run_steps(host, steps, dry_run=True, printer=Printer(out))
    text = out.getvalue()
    assert "old-pw" not in text and "new-pw" not in text
    assert text.count("(content hidden: sensitive)") == 2, text
