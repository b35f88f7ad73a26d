"""The app's environment on a real host: plain variables (app.env), secrets (env.set, root-only on
the host, never printed), the release command (migrations into SQLite in a linked dir, refusing a
release when it fails) and `fab run -- CMD`. One droplet, in order; a small WSGI app of its own.
"""

import fcntl
import hashlib
import json
import os
import pty
import secrets as random
import select
import subprocess
import termios
import time

import pytest

from .conftest import FAB, ROOT
from .test_releases import Load, get

pytestmark = pytest.mark.integration

APP = '''\
import hashlib
import os
import sqlite3


def app(environ, start_response):
    db = sqlite3.connect("data/app.db")
    migrations = db.execute("select count(*) from migrations").fetchone()[0]
    token = os.environ.get("API_TOKEN")
    digest = hashlib.sha256(token.encode()).hexdigest()[:16] if token else "none"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"greeting={os.environ.get('GREETING')} token={digest} migrations={migrations} v={VERSION}\\n".encode()]


VERSION = 1
'''
MIGRATE = '''\
import os
import sqlite3

db = sqlite3.connect("data/app.db")
db.execute("create table if not exists migrations (release text, user text)")
db.execute("insert into migrations values (?, ?)", (os.getcwd(), os.environ.get("USER")))
db.commit()
print("migrated", db.execute("select count(*) from migrations").fetchone()[0], "as", os.environ.get("USER"))
'''
TOKEN, TOKEN2 = f"tok-{random.token_hex(12)}", f"tok-{random.token_hex(12)}"


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = tmp_path_factory.mktemp("envapp")
    (d / "app.py").write_text(APP)
    (d / "migrate.py").write_text(MIGRATE)
    (d / "requirements.txt").write_text("")
    return d


@pytest.fixture(scope="module")
def fab(droplet, app):
    settings = {"FABRIC_APP_NAME": "envapp", "FABRIC_APP_SOURCE": str(app), "FABRIC_APP_ENV": "GREETING=hi-plain",
                "FABRIC_APP_LINKED_DIRS": "data,log", "FABRIC_APP_RELEASE_COMMAND": "python migrate.py"}

    def run(*args, env=None, **kw):
        return droplet.fab("-H", droplet.name, *args, env={**settings, **(env or {})}, **kw)
    return run


def secret_free(res, *values):
    text = res.stdout + res.stderr
    return not any(v in text for v in values or (TOKEN, TOKEN2))


def test_secrets_set_before_the_first_deploy_reach_the_app(droplet, fab):
    res = fab("env.set", f"API_TOKEN={TOKEN}", "OTHER=x y")
    assert res.returncode == 0, res.stdout + res.stderr
    assert secret_free(res)
    listed = fab("env.list")
    assert listed.returncode == 0, listed.stderr
    assert f"{droplet.name}: API_TOKEN=**** (secret)" in listed.stdout
    assert f"{droplet.name}: GREETING=hi-plain (app.env)" in listed.stdout and secret_free(listed)
    res = fab("deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{droplet.name} | migrated 1 as envapp" in res.stdout, res.stdout  # the release command's output
    assert secret_free(res)
    assert get(droplet.address) == f"greeting=hi-plain token={digest(TOKEN)} migrations=1 v=1"
    again = fab("deploy")  # nothing changed: the release command does not run again
    assert again.returncode == 0 and "no changes, nothing restarted" in again.stdout, again.stdout
    assert "migrated" not in again.stdout and get(droplet.address).endswith("migrations=1 v=1")


def test_run_passes_stdin_and_exit_status_with_the_apps_environment(droplet, fab):
    code = ("import hashlib, os, sys; t = os.environ['API_TOKEN']; "
            "print(os.environ['GREETING'], hashlib.sha256(t.encode()).hexdigest()[:16], os.environ['USER'], "
            "sys.executable, os.getcwd(), sys.stdin.read().upper()); sys.exit(7)")
    res = fab("run", "--", "python", "-c", code, input="from stdin")
    assert res.returncode == 7, res.stdout + res.stderr
    live = droplet.sh("readlink -f /srv/envapp/current").strip()  # the live release itself
    assert res.stdout.split() == ["hi-plain", digest(TOKEN), "envapp", "/srv/envapp/current/.venv/bin/python",
                                  live, "FROM", "STDIN"], res.stdout
    assert fab("run", "--", "true").returncode == 0
    missing = fab("run", "--", "no-such-command")
    assert missing.returncode == 127, missing.stdout + missing.stderr


def test_a_secret_change_restarts_through_the_switch_without_failed_requests(droplet, fab):
    slot = droplet.live_slot("envapp")
    with Load(droplet.address, clients=5, limit=60) as load:
        res = fab("env.set", f"API_TOKEN={TOKEN2}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert secret_free(res)
    print(f"requests during env.set: {load.ok} ok, {len(load.failed)} failed")
    assert load.failed == [] and load.ok > 20
    assert droplet.live_slot("envapp") != slot
    assert get(droplet.address) == f"greeting=hi-plain token={digest(TOKEN2)} migrations=1 v=1"
    last = json.loads(droplet.sh("tail -n 1 /srv/envapp/releases.log"))
    assert last["action"] == "restart"


def test_secrets_are_in_no_world_readable_file_nor_the_journal(droplet):
    found = droplet.sh(f"grep -rlsF -e {TOKEN} -e {TOKEN2} /etc /srv /run /var/log /root /tmp /home "
                       "| xargs -r stat -c '%a %U %n'")
    assert found.strip().splitlines() == ["600 root /srv/envapp/secrets.env"], found
    assert TOKEN2 not in droplet.sh("journalctl --no-pager -q") and TOKEN2 not in droplet.sh("ps auxww")


def test_a_failing_release_command_refuses_the_release(droplet, fab, app):
    before = droplet.sh("readlink /srv/envapp/current")
    (app / "app.py").write_text(APP.replace("VERSION = 1", "VERSION = 2"))
    failing = "python -c 'import sys; print(\"migration boom\"); sys.exit(3)'"
    with Load(droplet.address, clients=5, limit=60) as load:
        res = fab("deploy", env={"FABRIC_APP_RELEASE_COMMAND": failing})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "migration boom" in res.stdout and "release command failed (exit 3)" in res.stdout, res.stdout
    assert load.failed == [] and load.seen == {f"greeting=hi-plain token={digest(TOKEN2)} migrations=1 v=1"}
    assert droplet.sh("readlink /srv/envapp/current") == before
    last = json.loads(droplet.sh("tail -n 1 /srv/envapp/releases.log"))
    assert last["action"] == "refused" and last["release"] not in before
    res = fab("deploy")  # the working command: the new code goes live, migrated
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address) == f"greeting=hi-plain token={digest(TOKEN2)} migrations=2 v=2"


def test_unset_removes_a_secret(droplet, fab):
    res = fab("env.unset", "API_TOKEN")
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address) == "greeting=hi-plain token=none migrations=2 v=2"
    listed = fab("env.list")
    assert "API_TOKEN" not in listed.stdout and f"{droplet.name}: OTHER=**** (secret)" in listed.stdout


def test_run_is_interactive_on_a_tty(droplet, app):
    """fab in a terminal of its own, as in a user's shell: the command gets a TTY and reads what is typed."""
    main, child = pty.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([FAB, "-H", droplet.name, "run", "--", "python", "-i", "-q"], cwd=ROOT,
                            env=droplet.env(FABRIC_APP_NAME="envapp", FABRIC_APP_SOURCE=str(app)),
                            stdin=child, stdout=child, stderr=child, preexec_fn=own_terminal)
    os.close(child)
    out, typed, deadline = b"", [b"import sys; print('tty', sys.stdin.isatty(), 6 * 7)\n", b"raise SystemExit(5)\n"], \
        time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([main], [], [], 0.2)[0]:
                try:
                    out += os.read(main, 4096)
                except OSError:  # fab exited: its side of the terminal is closed
                    break
            if typed and out.endswith(b">>> "):
                os.write(main, typed.pop(0))
        assert proc.wait(timeout=30) == 5, out
    finally:
        proc.kill()
        os.close(main)
    assert b"tty True 42" in out, out
