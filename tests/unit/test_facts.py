"""The remote fact gatherer is a real program: run it on this machine."""

import hashlib
import json
import subprocess
import sys

from provision import remote
from provision.facts import http_fact_arg
from provision.layout import Layout

SCRIPT = remote.source("facts.py")


def gather(keys):
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(keys)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["facts"]


def test_files_links_dirs_contents_commands(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"data")
    f.chmod(0o640)
    (tmp_path / "l").symlink_to("f")
    facts = gather([["file", str(f)], ["file", str(tmp_path / "l")], ["file", str(tmp_path)],
                    ["file", str(tmp_path / "missing")], ["content", str(f)], ["content", str(tmp_path / "nope")],
                    ["command", "true"], ["command", "exit 3"], ["os", ""]])
    ff, link, d, missing, content, no_content, ok, bad, osf = facts
    assert ff["type"] == "file" and ff["mode"] == 0o640 and ff["sha256"] == hashlib.sha256(b"data").hexdigest()
    assert link == dict(link, type="link", target="f")
    assert d["type"] == "dir"
    assert missing is None and no_content is None
    assert content == "data"
    assert (ok, bad) == (0, 3)
    assert set(osf) >= {"id", "apt", "systemd", "python"}


def test_users_and_unreachable_http():
    root, nobody = gather([["user", "root"], ["user", "no-such-user-xyz"]])
    assert root["uid"] == 0 and nobody is None
    # port 9 on loopback: nothing listens; the fact is 0, not an exception
    assert gather([["http", '["http://127.0.0.1:9/", ""]']]) == [0]


def test_packages_answer_per_name():
    facts = gather([["package", "no-such-package-xyz"]])
    assert facts == [False]


def test_http_fact_reports_status_codes_sends_the_host_header_and_checks_who_answered():
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers["Host"]))
            self.send_response(200 if self.path != "/no" else 404)
            self.send_header("X-Provision-Upstream", "unix:/run/provision/hello/a.sock")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        facts = gather([["http", json.dumps([f"{url}/ok", "example.test"])], ["http", json.dumps([f"{url}/no", ""])],
                        *[["http", http_fact_arg(f"{url}/ok", "", ("X-Provision-Upstream", tuple(lay.address(s) for s in "ab")))]
                          for lay in (Layout("hello"), Layout("other"), Layout("hello", container=True))]])
    finally:
        server.shutdown()
    assert facts == [200, 404, 200, 0, 0]  # the last two: answered, but not by that app
    assert seen[:2] == [("/ok", "example.test"), ("/no", url.split("//")[1])]


def test_files_of_a_directory_are_read_through_links(tmp_path):
    (tmp_path / "available").mkdir()
    (tmp_path / "available" / "hello").write_text("server {}\n")
    enabled = tmp_path / "enabled"
    enabled.mkdir()
    (enabled / "hello").symlink_to(tmp_path / "available" / "hello")
    (enabled / "gone").symlink_to(tmp_path / "available" / "nothing")
    (enabled / "mine").write_text("# mine\n")
    (enabled / "sub").mkdir()
    assert gather([["files", str(enabled)], ["files", str(tmp_path / "missing")]]) == [
        {"gone": None, "hello": "server {}\n", "mine": "# mine\n", "sub": None}, None]


def test_content_below_a_directory_follows_no_link_below_it(tmp_path):
    release = tmp_path / "releases/r1"
    (release / "pkg").mkdir(parents=True)
    (release / "pkg/app.py").write_text("print(1)\n")
    (release / "blob").write_bytes(b"\x00\x01")
    (tmp_path / "secret").write_text("root's\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/app.py").write_text("planted\n")
    (release / "link.py").symlink_to(tmp_path / "secret")
    (release / "uploads").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "current").symlink_to("releases/r1")  # the directory itself may be a link
    base = str(tmp_path / "current")
    asked = ["pkg/app.py", "blob", "link.py", "uploads/app.py", "../secret", "pkg", "missing.py"]
    assert gather([["content_below", f"{base}\0{rel}"] for rel in asked]) == ["print(1)\n"] + [None] * 6


def test_a_fifo_or_device_is_never_opened(tmp_path):
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would hang the facts until a writer came
    assert gather([["file", str(fifo)], ["content", str(fifo)], ["content", "/dev/null"]]) == [
        dict(gather([["file", str(fifo)]])[0], type="other"), None, None]


def test_unlisted_lists_data_files_the_manifest_does_not_name_and_follows_no_link(tmp_path):
    import os
    release = tmp_path / "releases/r1"
    for rel in ("app.py", "shipped.db", "instance/.keep", "pkg/mod.py", ".provision/unit", "pkg/__pycache__/m.pyc"):
        (release / rel).parent.mkdir(parents=True, exist_ok=True)
        (release / rel).write_text("x")
    (release / ".provision/manifest.json").write_text(json.dumps(
        {p: "0" for p in ("app.py", "shipped.db", "instance/.keep", "pkg/mod.py")}))
    (release / "instance/data.sqlite").write_text("new")  # written since the release went live
    (release / "pkg/cache.DB").write_text("new")
    (release / ".provision/old.db").write_text("provision's own")
    elsewhere = tmp_path / "shared/uploads"
    elsewhere.mkdir(parents=True)
    (elsewhere / "kept.sqlite3").write_text("kept")
    (release / "uploads").symlink_to(elsewhere)  # a linked dir: never walked
    (release / "link.db").symlink_to(elsewhere / "kept.sqlite3")  # a link: never reported
    os.mkfifo(release / "pipe.db")  # never opened
    (tmp_path / "current").symlink_to("releases/r1")

    def unlisted(base, max_=50, manifest=".provision/manifest.json"):
        return gather([["unlisted", json.dumps({"dir": str(base), "manifest": manifest, "skip": [".provision"],
                                                "match": ["*.sqlite", "*.sqlite3", "*.db", "instance/*"],
                                                "max": max_})]])[0]

    assert unlisted(tmp_path / "current") == {"paths": ["instance/data.sqlite", "pkg/cache.DB"], "more": False}
    assert unlisted(tmp_path / "current", max_=1) == {"paths": ["instance/data.sqlite"], "more": True}
    assert unlisted(tmp_path / "missing") is None
    assert unlisted(tmp_path / "current", manifest=".provision/unit") is None  # not a manifest
    (release / ".provision/manifest.json").unlink()
    (release / ".provision/manifest.json").symlink_to(tmp_path / "forged.json")
    (tmp_path / "forged.json").write_text("{}")
    assert unlisted(tmp_path / "current") is None  # a manifest is read through no link


def test_services_are_named_as_units_a_timer_too(tmp_path):
    """``systemctl show`` gets ``<name>.service`` for a bare name, a unit name with its type as it is."""
    import os
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\nshift 3\nfor u in \"$@\"; do\n  case $u in *.timer) s=active;; *) s=inactive;; esac\n"
                    "  printf 'Id=%s\\nLoadState=loaded\\nActiveState=%s\\nUnitFileState=enabled\\nMainPID=0\\n\\n' "
                    "\"$u\" \"$s\"\ndone\n")
    fake.chmod(0o755)
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([["service", "nginx"], ["service", "hello.tick.timer"],
                                                                     ["service", "hello.worker.service"]])],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"))
    nginx, timer, worker = json.loads(out.stdout)["facts"]
    assert timer == {"loaded": True, "active": True, "enabled": True, "pid": 0}  # not hello.tick.timer.service
    assert nginx["active"] is False and worker["active"] is False and worker["loaded"]


def test_unlisted_survives_a_tree_planted_to_exhaust_it(tmp_path):
    """A release holding a tree deeper than the walk goes (planted 1,000 deep, it raised
    RecursionError, which killed the whole gatherer): the fact says more was left out, and every
    other fact of the run is still gathered."""
    import os
    release = tmp_path / "r1"
    (release / ".provision").mkdir(parents=True)
    (release / ".provision/manifest.json").write_text("{}")
    here = os.open(release, os.O_RDONLY)
    for _ in range(100):  # deeper than MAX_DEPTH (64), shallow enough for pytest to clean up
        os.mkdir("d", dir_fd=here)
        inner = os.open("d", os.O_RDONLY, dir_fd=here)
        os.close(here)
        here = inner
    os.close(here)
    arg = json.dumps({"dir": str(release), "manifest": ".provision/manifest.json", "skip": [".provision"],
                      "match": ["*.db"], "max": 50})
    unlisted, listing = gather([["unlisted", arg], ["ls", str(release)]])
    assert unlisted == {"paths": [], "more": True} and listing == [".provision", "d"]
