"""The runner's dry run against a fake host: what it prints."""

import io
import json
import re
import shlex
import tarfile
from pathlib import Path

import pytest

from provision import config as cfg
from provision.errors import ProvisionError
from provision.output import Printer, summary_line
from provision.runner import HostResult, run_steps
from provision.app import Deploy
from provision.release import Release, manifest_path, meta_path, release_files
from provision.source import scan
from provision.facts import below
from provision.steps import Directory, File, Lines, User

ROOT = Path(__file__).resolve().parents[2]
OS = {"id": "debian", "version": "12", "apt": True, "systemd": True, "python": "3.11"}


class FakeRemote:
    """Answers the fact gatherer from a dict; records anything else it is asked to run."""

    label, sudo, round_trips = "web1", "", 0

    def __init__(self, answers: dict):
        self.answers = answers
        self.ran = []

    def exec(self, command, stdin=b"", timeout=None, on_line=None):
        self.round_trips += 1
        if not command.startswith("python3 -c "):
            self.ran.append(command)
            return 0, "", ""
        keys = json.loads(shlex.split(command)[-1])
        return 0, json.dumps({"facts": [self.answers[tuple(k)] for k in keys]}), ""


def test_dry_run_after_a_password_change_shows_neither_password():
    new, old = "http://bob:new-pw@proxy:3128", "http://bob:old-pw@proxy:3128"
    cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, {"proxy": new}), ROOT)  # settings make new-pw a known secret
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


def test_a_problem_planning_finds_names_the_host_and_nothing_is_applied():
    steps = [Directory("/srv/alice"), User("alice", home="/srv/alice")]
    host = FakeRemote({("os", ""): OS, ("file", "/srv/alice"): None,
                       ("user", "alice"): {"uid": 1000, "home": "/home/alice", "shell": "/bin/bash", "group": "alice"}})
    with pytest.raises(ProvisionError, match="^web1: account alice already exists") as e:
        run_steps(host, steps, printer=Printer(io.StringIO()))
    assert e.value.code == 2
    assert host.ran == []  # the directory planned before it was not made either


def test_a_dry_run_a_host_refused_says_so():
    refused = HostResult("web1", error="web1: account alice already exists ...", code=2)
    assert summary_line(refused, dry_run=True) == "web1: dry run stopped, nothing was touched (0.0s)"
    assert summary_line(HostResult("web1"), dry_run=True) == "web1: dry run: nothing would change (0.0s)"


def test_dry_run_gathers_the_old_contents_of_every_diff_in_one_more_round_trip(tmp_path):
    (tmp_path / "app.py").write_text("print('new')\n")
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), ROOT)
    release = Release(s, scan(tmp_path), "r1", "venvkey", {})
    live = "/srv/hello/current"
    host = FakeRemote({
        ("os", ""): OS,
        ("file", "/etc/x"): None, ("content", "/etc/x"): None,
        ("content", meta_path(s)): json.dumps({"id": "r0"}),
        ("content", manifest_path(s)): json.dumps({"app.py": "0", "gone.py": "0"}),
        ("file", live): {"type": "link", "target": "releases/r0", "owner": "root"},
        ("file", f"{live}/.provision"): {"type": "dir", "owner": "root"},
        below(live, "app.py"): "print('old')\n",
    })
    out = io.StringIO()
    result = run_steps(host, [File("/etc/x", b"x\n"), release], dry_run=True, printer=Printer(out))
    assert result.round_trips == 2 and not result.done
    text = out.getvalue()
    assert ("web1: would   release /srv/hello/releases (r1 (1 files), 1 changed, 0 added, 1 removed; sent 1 "
            "file (0.3 kB))\n") in text
    assert "+++ /etc/x (new)\n@@ -0,0 +1 @@\n+x\n" in text
    assert "changed app.py\n--- app.py (host)\n+++ app.py (new)\n@@ -1 +1 @@\n-print('old')\n+print('new')\n" in text
    assert "removed gone.py\n" in text


class Answers(dict):
    def __missing__(self, key):
        return None  # a fresh host: nothing there


class ResendingHost(FakeRemote):
    """Refuses the first upload the way release_tree.py does when a live file was changed by hand."""

    def __init__(self, answers):
        super().__init__(answers)
        self.sent = []

    def exec(self, command, stdin=b"", timeout=None, on_line=None, then=None, on_sent=None):
        if then is None:
            return super().exec(command, stdin, timeout, on_line)
        self.round_trips += 1
        with tarfile.open(fileobj=io.BytesIO(then.read()), mode="r:gz") as tar:
            self.sent.append(sorted(n for n in tar.getnames() if not n.startswith(".provision/")))
        script = stdin.decode()
        step = next(m.group(1) for m in re.finditer(r"^s(\d+)\(\) \{\n(.*?)^\}$", script, re.M | re.S)
                    if "release_tree.py" in m.group(2))
        if len(self.sent) == 1:
            return 75, f'@@fail {step} 75\n@@out @@resend 1 "same.py"\n', ""
        return 0, "".join(f"@@ok {i} 0 0\n" for i in re.findall(r"^  __(?:step|bg) (\d+)$", script, re.M)), ""


def test_a_release_whose_live_files_were_changed_on_the_host_is_sent_whole(tmp_path):
    for name, text in (("app.py", "print('new')\n"), ("same.py", "x = 1\n"), ("requirements.txt", "flask\n")):
        (tmp_path / name).write_text(text)
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path)), ROOT)
    src = scan(tmp_path)
    files = release_files(s, src)
    live = "/srv/hello/current"
    host = ResendingHost(Answers({
        ("os", ""): OS,
        ("content", meta_path(s)): json.dumps({"id": "r0"}),
        ("content", manifest_path(s)): json.dumps(dict(files, **{"app.py": "0"})),
        ("file", live): {"type": "link", "target": "releases/r0", "owner": "root"},
        ("file", f"{live}/.provision"): {"type": "dir", "owner": "root"},
    }))
    out = io.StringIO()
    result = run_steps(host, Deploy(s, src, "r1"), printer=Printer(out))
    assert host.sent == [["app.py"], sorted(files)]  # the changed file; then, refused, every file
    assert "web1: files of the live release were changed on the host since provision wrote them; sending the " \
           "whole release\n" in out.getvalue()
    assert not result.error and host.round_trips == 4
