"""The app user is hostile: nothing it can write decides what root does.

Plays a compromised app (user `hello`) and a hostile local user (`nobody`) on one droplet:
tampering with code and configs, symlinks planted wherever the app can write (and where an
older layout let it), direct connections to the app's socket, a forged deploy lock, a deploy
holder killed with SIGKILL. Routine deploys, rollbacks and --break-lock must change nothing
outside the app's data and kill nothing but a real deploy. Order matters: one droplet.
"""

import json
import shlex
import subprocess
import time

import pytest

from .conftest import FAB, ROOT
from .test_releases import app_with, get

pytestmark = pytest.mark.integration

# What root must never change on the app's behalf: ownership and modes of system paths, file contents.
ROOT_STATE = ("stat -c '%n %F %U %G %a' /etc /etc/systemd/system /etc/shadow /etc/passwd /root /usr/bin; "
              "sha256sum /etc/shadow /etc/passwd; find /etc /usr /root ! -user root -print")
DATA = ("/srv/hello/shared/log", "/srv/hello/shared/uploads")


def as_user(droplet, command: str, user: str = "hello") -> tuple[int, str]:
    rc, out, err = droplet.run(f"runuser -u {user} -- sh -c {shlex.quote(command)}")
    return rc, out + err


def test_the_app_user_writes_only_its_data(droplet):
    res = droplet.fab("-H", droplet.name, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    rc, out = as_user(droplet, "find /srv/hello /etc/systemd/system /etc/nginx /run/provision -writable ! -type l 2>/dev/null")
    writable = set(out.split())
    assert writable and all(p.startswith(DATA) for p in writable), writable
    for attempt in (
        "echo 'import os' >> /srv/hello/current/app.py",  # its code
        "touch /srv/hello/current/.venv/bin/gunicorn",  # its virtualenv
        "echo 'workers = 99' >> /srv/hello/current/.provision/gunicorn.conf.py",  # its config
        "echo forged >> /srv/hello/releases.log",
        "echo 'server unix:/tmp/evil.sock;' > /etc/nginx/provision/hello.upstream",  # where traffic goes
        "echo PATH=/tmp >> /srv/hello/shared/.env",  # its environment, which root reads
        "mv /srv/hello/shared/log /srv/hello/shared/log.old",  # to plant a link in its place
        "ln -s /etc/shadow /srv/hello/current.provision-tmp",
        "ln -s /etc/systemd/system /srv/hello/releases/evil",
        "mkdir /etc/systemd/system/hello@a.service.d",
    ):
        rc, out = as_user(droplet, attempt)
        assert rc != 0, f"the app could: {attempt}"
    check = droplet.fab("-H", droplet.name, "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_no_local_user_reaches_the_app_but_through_nginx(droplet):
    slot = droplet.live_slot()
    probe = ("python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
             "s.sendall(b\"GET / HTTP/1.0\\r\\n\\r\\n\"); print(s.recv(100))' /run/provision/hello/" + slot + ".sock")
    for user in ("nobody", "hello"):
        rc, out = as_user(droplet, probe, user)
        assert rc != 0 and "Permission denied" in out, (user, out)
    assert get(droplet.address) == "Hello from provision!"


def test_planted_symlinks_change_nothing_outside_the_apps_data(droplet, tmp_path):
    # Where an older layout let the app write (it owned /srv/hello): links in root's places...
    droplet.sh("cd /srv/hello && rm -rf shared/log && ln -s /etc/systemd/system shared/log && "
               "rm -f shared/.env && ln -s /etc/shadow shared/.env && ln -s /etc/shadow current.provision-tmp && "
               "chown -h hello:hello shared/log shared/.env current.provision-tmp")
    # ...and, as the app, in every directory it can still write.
    rc, out = as_user(droplet, "for d in $(find /srv/hello/shared -writable -type d); do "
                               "ln -s /etc/shadow $d/.env; ln -s /etc $d/log; ln -s /root $d/x; done")
    assert rc == 0, out
    before = droplet.sh(ROOT_STATE)
    plan = droplet.fab("-H", droplet.name, "deploy", "--dry-run")
    assert "would   directory /srv/hello/shared/log (replace a link)" in plan.stdout, plan.stdout
    assert "would   file /srv/hello/shared/.env (replace a link)" in plan.stdout
    for args in (["deploy", "--source", app_with(tmp_path, "v2")], ["rollback"], ["deploy", "--break-lock"]):
        res = droplet.fab("-H", droplet.name, *args)
        assert res.returncode == 0, res.stdout + res.stderr
    assert droplet.sh(ROOT_STATE) == before
    assert droplet.sh("stat -c '%F %U' /srv/hello/shared/log /srv/hello/shared/.env").split("\n")[:2] == [
        "directory hello", "regular empty file root"]
    assert not droplet.run("test -L /srv/hello/current.provision-tmp")[0] == 0
    # the app's environment holds nothing read through a link
    env = droplet.sh(f"cat /proc/$(systemctl show -p MainPID --value hello@{droplet.live_slot()})/environ")
    assert "root:" not in env
    assert get(droplet.address) == "Hello from provision!"


def test_a_refused_release_leaves_the_live_one_as_it_was_across_restarts(droplet, tmp_path):
    res = droplet.fab("-H", droplet.name, "deploy", "--source", app_with(tmp_path, "stable"))
    assert res.returncode == 0, res.stdout + res.stderr
    refused = droplet.fab("-H", droplet.name, "deploy", "--source", app_with(tmp_path, "never"),
                          env={"FABRIC_APP_WSGI": "app:nosuch"})
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert get(droplet.address) == "Hello stable"
    # a reboot, as far as the app goes: every app unit stopped, then what is enabled at boot started
    droplet.sh("systemctl stop 'hello@*'; systemctl daemon-reload; cd /etc/systemd/system && "
               "systemctl start $(ls sockets.target.wants multi-user.target.wants | grep '^hello@')")
    deadline = time.monotonic() + 20
    while True:
        try:
            assert get(droplet.address) == "Hello stable"
            break
        except Exception:  # noqa: BLE001 - the app is starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    res = droplet.fab("-H", droplet.name, "rollback")  # the refused release's config breaks no other release
    assert res.returncode == 0, res.stdout + res.stderr
    assert get(droplet.address) in {"Hello from provision!", "Hello v2"}


def test_a_forged_lock_holds_nothing_and_break_lock_kills_no_one(droplet):
    droplet.sh("systemd-run --quiet --unit=victim sleep 300")
    victim = droplet.sh("systemctl show -p MainPID --value victim").strip()
    nginx = droplet.sh("cat /run/nginx.pid").strip()
    forged = json.dumps({"user": "mallory", "pid": int(victim)})
    # a local user holds every lock file it can reach, naming a victim as the holder
    droplet.sh("systemd-run --quiet --uid=nobody --unit=forger flock /run/lock/provision-hello.lock sleep 300")
    as_user(droplet, f"echo '{forged}' > /run/lock/provision-hello.lock.holder", "nobody")
    for path in ("/run/provision/hello.deploy", "/run/provision/hello/evil"):
        rc, out = as_user(droplet, f"echo '{forged}' > {path}", "nobody")
        assert rc != 0, f"nobody could write {path}"
    try:
        res = droplet.fab("-H", droplet.name, "deploy", "--break-lock")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "mallory" not in res.stdout + res.stderr
        assert droplet.sh("systemctl is-active victim").strip() == "active"
        assert droplet.sh("cat /run/nginx.pid").strip() == nginx
    finally:
        droplet.run("systemctl stop victim forger")


def slow_app(tmp_path) -> str:
    """An app that takes 4 s to import: the deploy sits in the switch's health gate."""
    return app_with(tmp_path, "slow", body="import time\n\ntime.sleep(4)\n" +
                    (ROOT / "examples/hello/app.py").read_text().replace("Hello from provision!", "Hello slow"))


def kill_holder_mid_deploy(droplet, tmp_path) -> None:
    """Start a deploy, then SIGKILL its remote holder (the script's main shell) mid-switch."""
    proc = subprocess.Popen([FAB, "-H", droplet.name, "deploy", "--source", slow_app(tmp_path)], cwd=ROOT,
                            env=droplet.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        rc = 1
        while rc != 0 and time.monotonic() < deadline:  # until the switch runs
            time.sleep(0.1)
            rc, out, _ = droplet.run("pgrep -f '^python3 -c # provision: switch.py' >/dev/null && "
                                     "cat /run/provision/hello.deploy")
        pid = json.loads(out)["pid"]
        droplet.sh(f"kill -KILL {pid}")
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_killed_with_sigkill_neither_blocks_nor_names_a_dead_pid(droplet, tmp_path):
    kill_holder_mid_deploy(droplet, tmp_path)
    t0 = time.monotonic()
    res = droplet.fab("-H", droplet.name, "deploy", "--source", app_with(tmp_path, "after kill"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "waited for an interrupted deploy" in res.stdout
    assert time.monotonic() - t0 < 30
    assert get(droplet.address) == "Hello after kill"


def test_break_lock_stops_exactly_the_deploy_of_a_killed_holder(droplet, tmp_path):
    kill_holder_mid_deploy(droplet, tmp_path)
    res = droplet.fab("-H", droplet.name, "deploy", "--break-lock", "--source", app_with(tmp_path, "broken in"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "took over the deploy lock" in res.stdout
    assert get(droplet.address) == "Hello broken in"
    assert droplet.run("systemctl is-active --quiet provision-deploy-hello.scope")[0] != 0


def test_a_tree_an_older_layout_gave_the_app_is_refused_and_left_alone(droplet):
    """Older layouts let the app own /srv/hello: root must not work in there (the app could swap
    any entry for a link between provision's look and its act); the deploy says what to do."""
    droplet.sh("chown hello:hello /srv/hello/shared")
    try:
        before = droplet.sh("find /etc /srv -xdev -printf '%p %u %m %s\\n' | sort | sha256sum")
        res = droplet.fab("-H", droplet.name, "deploy")
        assert res.returncode == 2, res.stdout + res.stderr
        [line] = res.stderr.strip().splitlines()
        assert "/srv/hello/shared belongs to hello" in line and "mv /srv/hello /srv/hello.old" in line
        assert droplet.sh("find /etc /srv -xdev -printf '%p %u %m %s\\n' | sort | sha256sum") == before
    finally:
        droplet.sh("chown root:root /srv/hello/shared")


def test_proxy_credentials_stay_in_root_only_files(droplet):
    proxy = {"FABRIC_APP_PROXY": "http://bob:s3cret@10.231.0.1:8888"}
    res = droplet.fab("-H", droplet.name, "deploy", "-v", env=proxy)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "s3cret" not in res.stdout + res.stderr
    found = droplet.sh("grep -rlsF s3cret /etc /srv /run /var/log /root /tmp | xargs -r stat -c '%a %U %n'")
    assert found.strip(), "the proxy setting did not reach the host"
    for line in found.strip().splitlines():
        mode, owner, path = line.split(" ", 2)
        assert owner == "root" and int(mode, 8) & 0o004 == 0, line  # not world-readable
    assert "s3cret" not in droplet.sh("journalctl --no-pager -q")
    res = droplet.fab("-H", droplet.name, "deploy")  # back to the sandbox's own settings
    assert res.returncode == 0, res.stdout + res.stderr
