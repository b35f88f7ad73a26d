"""Steps decide from recorded facts: facts in, commands out (no SSH)."""

import pytest

from provision.errors import ProvisionError
from provision.facts import Facts
from provision.facts import collect_facts
from provision.steps import (Absent, Command, Directory, File, HttpCheck, Lines, Packages, Placeholder, RootsOnly, Service, Symlink, User, plan)

FILE = {"type": "file", "mode": 0o644, "owner": "root", "group": "root", "mtime": 1.0,
        "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}  # sha256("hello")


def decide(step, answers, notified=()):
    facts = Facts({tuple(k): v for k, v in answers.items()})
    change = step.plan(facts, set(notified))
    return None if change is None else change.commands


def test_packages_installs_only_missing():
    step = Packages(("nginx", "python3-venv"))
    assert step.facts() == [("package", "nginx"), ("package", "python3-venv")]
    cmds = decide(step, {("package", "nginx"): True, ("package", "python3-venv"): False})
    assert cmds[0] == "apt-get update -qq"
    assert cmds[1].endswith("--force-confold python3-venv")
    assert decide(step, {("package", "nginx"): True, ("package", "python3-venv"): True}) is None


def test_user_created_when_missing_and_its_shell_fixed():
    step = User("hello", home="/srv/hello")
    assert "useradd --system" in decide(step, {("user", "hello"): None})[0]
    same = {"uid": 999, "home": "/srv/hello", "shell": "/usr/sbin/nologin", "group": "hello"}
    assert decide(step, {("user", "hello"): same}) is None
    assert decide(step, {("user", "hello"): dict(same, shell="/bin/bash")}) == [
        "usermod --shell /usr/sbin/nologin hello"]


def test_an_account_provision_did_not_make_is_never_taken_over():
    step = User("alice", home="/srv/alice")
    theirs = {"uid": 1000, "home": "/home/alice", "shell": "/bin/bash", "group": "alice"}
    with pytest.raises(ProvisionError) as e:
        decide(step, {("user", "alice"): theirs})
    assert str(e.value) == ("account alice already exists on the host (home /home/alice) and provision did not "
                            "make it; choose another app name (app.name)")


@pytest.mark.parametrize("fact,expected", [
    (None, ["mkdir -p /srv/a", "chown -h app:app /srv/a", "chmod 755 /srv/a"]),
    ({"type": "dir", "mode": 0o755, "owner": "app", "group": "app"}, None),
    ({"type": "dir", "mode": 0o777, "owner": "app", "group": "app"}, ["chmod 755 /srv/a"]),
    ({"type": "dir", "mode": 0o755, "owner": "root", "group": "root"}, ["chown -h app:app /srv/a"]),
    ({"type": "file", "mode": 0o644, "owner": "root", "group": "root"},
     ["rm -f /srv/a", "mkdir -p /srv/a", "chown -h app:app /srv/a", "chmod 755 /srv/a"]),
])
def test_directory(fact, expected):
    assert decide(Directory("/srv/a", owner="app", group="app"), {("file", "/srv/a"): fact}) == expected


PLANTED = {"type": "link", "target": "/etc/systemd/system", "mode": 0o777, "owner": "app", "group": "app"}


def test_directory_never_follows_a_planted_symlink():
    # the app replaced its log dir with a link to /etc/systemd/system: root removes the link
    # itself (rm -f never follows) and makes a directory; chown -h could not follow either
    cmds = decide(Directory("/srv/a/log", owner="app", group="app"), {("file", "/srv/a/log"): PLANTED})
    assert cmds == ["rm -f /srv/a/log", "mkdir -p /srv/a/log", "chown -h app:app /srv/a/log", "chmod 755 /srv/a/log"]
    # a link root made (an operator's mount) is kept, and never chowned through
    ops = dict(PLANTED, owner="root", target="/mnt/volume/uploads")
    assert decide(Directory("/srv/a/up", owner="app", keep_root_links=True), {("file", "/srv/a/up"): ops}) is None
    assert decide(Directory("/srv/a/up", owner="app"), {("file", "/srv/a/up"): ops})[0] == "rm -f /srv/a/up"


def test_placeholder_keeps_content_enforces_owner_and_replaces_planted_links():
    step = Placeholder("/srv/a/shared/.env", owner="root", group="app", mode=0o640)
    assert decide(step, {("file", step.path): None}) == ["install -m 640 -o root -g app /dev/null /srv/a/shared/.env"]
    assert decide(step, {("file", step.path): dict(FILE, group="app", mode=0o640)}) is None
    assert decide(step, {("file", step.path): dict(FILE, owner="app", group="app", mode=0o666)}) == [
        "chown -h root:app /srv/a/shared/.env", "chmod 640 /srv/a/shared/.env"]
    # .env replaced by a link to a root-only file: the link goes, an empty file takes its place
    assert decide(step, {("file", step.path): dict(PLANTED, target="/etc/shadow")}) == [
        "rm -f /srv/a/shared/.env", "install -m 640 -o root -g app /dev/null /srv/a/shared/.env"]


def test_command_creates_must_be_roots():
    step = Command("venv", ("build",), creates="/srv/a/venvs/k/.done")
    assert decide(step, {("file", step.creates): FILE}) is None
    assert decide(step, {("file", step.creates): dict(FILE, owner="app")}) == ["build"]  # not made by us


def test_file_unchanged_when_checksum_matches():
    step = File("/etc/x", b"hello")
    assert decide(step, {("file", "/etc/x"): FILE}) is None


def test_file_only_fixes_mode_when_content_matches():
    assert decide(File("/etc/x", b"hello", mode=0o600), {("file", "/etc/x"): FILE}) == ["chmod 600 /etc/x"]


def test_file_written_atomically_when_content_differs():
    cmds = decide(File("/etc/x", b"new\n"), {("file", "/etc/x"): FILE})
    # written where only root can read it, given owner and mode, then renamed: never readable half-way
    assert cmds[0].startswith("rm -f /etc/x.provision-tmp && (umask 077 && base64 -d > /etc/x.provision-tmp) "
                              "<<'__PROVISION_EOF__'\nbmV3Cg==\n")
    assert cmds[1:] == ["chown -h root:root /etc/x.provision-tmp", "chmod 644 /etc/x.provision-tmp",
                        "mv -f /etc/x.provision-tmp /etc/x"]


def test_file_diff_and_sensitive_masking():
    assert "+new" in File("/etc/x", b"new\n").diff("old\n")
    masked = File("/etc/secret", b"password=hunter2\n", sensitive=True).diff("password=old\n")
    assert "hunter2" not in masked and "old" not in masked and "hidden" in masked


def test_no_diff_of_a_file_holding_a_secret():
    from provision import secrets

    secrets.remember(("tok-new",))
    shown = File("/srv/a/settings.py", b"TOKEN = 'tok-new'\n").diff("TOKEN = 'tok-old'\n")
    assert "tok-" not in shown and "(content hidden: sensitive)" in shown
    # nor of one whose old content holds one (a secret taken out of a file)
    shown = File("/srv/a/settings.py", b"TOKEN = env('TOKEN')\n").diff("TOKEN = 'tok-new'\n")
    assert "TOKEN" not in shown and "(content hidden: sensitive)" in shown


def test_lines_diff_unless_sensitive():
    old = "PATH=/usr/bin\nTOKEN=old\n"
    assert "-TOKEN=old" in Lines("/etc/environment", (("TOKEN", "t"),)).diff(old)
    shown = Lines("/etc/environment", (("TOKEN", "t"),), sensitive=True).diff(old)
    assert "old" not in shown and "(content hidden: sensitive)" in shown


def test_symlink_switches_atomically_only_when_target_differs():
    step = Symlink("/srv/a/current", "releases/2")
    link = {"type": "link", "target": "releases/2", "mode": 0o777, "owner": "root", "group": "root"}
    assert decide(step, {("file", "/srv/a/current"): link}) is None
    cmds = decide(step, {("file", "/srv/a/current"): dict(link, target="releases/1")})
    assert cmds == ["ln -sfn releases/2 /srv/a/current.provision-tmp", "mv -Tf /srv/a/current.provision-tmp /srv/a/current"]


def test_absent_removes_existing_or_freshly_installed_paths():
    step = Absent("/etc/nginx/sites-enabled/default", when=("packages",))
    assert decide(step, {("file", step.path): None}) is None
    assert decide(step, {("file", step.path): FILE}) == [f"rm -rf {step.path}"]
    # nginx was installed in this very run, after the facts were gathered
    assert decide(step, {("file", step.path): None}, notified={"packages"}) == [f"rm -rf {step.path}"]


def test_lines_replaces_keys_keeps_the_rest():
    step = Lines("/etc/environment", (("http_proxy", "http://p:3128"), ("https_proxy", "http://p:3128")))
    old = 'PATH="/usr/bin"\nhttp_proxy=http://old:1\nhttp_proxy=dup\n'
    assert step.render(old) == 'PATH="/usr/bin"\nhttp_proxy=http://p:3128\nhttps_proxy=http://p:3128\n'
    assert decide(step, {("content", step.path): step.render(old)}) is None


def test_command_guards():
    creates = Command("build", ("make",), creates="/srv/done")
    assert decide(creates, {("file", "/srv/done"): FILE}) is None
    assert decide(creates, {("file", "/srv/done"): None}) == ["make"]
    unless = Command("x", ("do-x",), unless="test -e /x")
    assert decide(unless, {("command", "test -e /x"): 0}) is None
    assert decide(unless, {("command", "test -e /x"): 1}) == ["do-x"]
    handler = Command("update-ca", ("update-ca-certificates",), when=("ca",))
    assert decide(handler, {}) is None
    assert decide(handler, {}, notified={"ca"}) == ["update-ca-certificates"]


RUNNING = {"loaded": True, "active": True, "enabled": True, "pid": 42}


@pytest.mark.parametrize("state,notified,expected", [
    (RUNNING, (), None),
    (RUNNING, ("code",), ["nginx -t -q", "systemctl reload app"]),
    (RUNNING, ("code", "unit"), ["systemctl daemon-reload", "nginx -t -q", "systemctl restart app"]),
    (dict(RUNNING, active=False), (), ["nginx -t -q", "systemctl start app"]),
    (dict(RUNNING, enabled=False), (), ["systemctl enable --quiet app"]),
    ({"loaded": False, "active": False, "enabled": False, "pid": 0}, ("unit",),
     ["systemctl daemon-reload", "systemctl enable --quiet app", "nginx -t -q",
      "systemctl reload-or-restart app"]),
])
def test_service(state, notified, expected):
    step = Service("app", restart_on=("unit",), reload_on=("code",), daemon_reload_on=("unit",), check="nginx -t -q")
    assert decide(step, {("service", "app"): state}, notified) == expected


def test_health_check_runs_after_changes_or_when_unhealthy():
    step = HttpCheck("http://127.0.0.1/", timeout=5)
    key = ("http", '["http://127.0.0.1/", ""]')
    assert decide(step, {key: 200}) is None
    assert decide(step, {key: 502}) is not None
    assert decide(step, {key: 200}, notified={"*changed*"}) is not None


def test_plan_propagates_notify_tags_in_order():
    steps = [File("/etc/unit", b"x", notify=("unit",)),
             Service("app", restart_on=("unit",))]
    keys = collect_facts(steps)
    assert keys == [("file", "/etc/unit"), ("service", "app")]
    planned = plan(steps, Facts({("file", "/etc/unit"): None, ("service", "app"): RUNNING}))
    assert [p.status for p in planned] == ["change", "change"]
    assert planned[1].change.commands == ["systemctl restart app"]
    planned = plan(steps, Facts({("file", "/etc/unit"): dict(FILE, sha256=File("/e", b"x").sha256),
                                 ("service", "app"): RUNNING}))
    assert [p.status for p in planned] == ["ok", "ok"]


def test_printer_masks_secrets_in_every_line():
    import io

    from provision import secrets
    from provision.output import Printer

    secrets.remember(("s3cret", ""))
    out = io.StringIO()
    p = Printer(out)
    p.line("http_proxy=http://bob:s3cret@proxy:3128")
    assert out.getvalue() == "http_proxy=http://bob:****@proxy:3128\n"


def test_lines_removes_keys_whose_value_is_none():
    step = Lines("/etc/environment", (("http_proxy", None), ("no_proxy", "localhost")))
    old = "PATH=/bin\nhttp_proxy=http://bob:pw@proxy:3128\n"
    assert step.render(old) == "PATH=/bin\nno_proxy=localhost\n"
    assert step.render("PATH=/bin\nno_proxy=localhost\n") == "PATH=/bin\nno_proxy=localhost\n"


def test_a_tree_root_does_not_own_alone_is_refused_before_anything_runs():
    step = RootsOnly(("/srv/a", "/srv/a/releases"), hint="move it aside")
    mine = {"type": "dir", "mode": 0o755, "owner": "root", "group": "root", "acl": False}
    assert decide(step, {("file", "/srv/a"): mine, ("file", "/srv/a/releases"): None}) is None
    with pytest.raises(ProvisionError, match="^/srv/a/releases belongs to app, so it is not root's alone; move it"):
        decide(step, {("file", "/srv/a"): mine, ("file", "/srv/a/releases"): dict(mine, owner="app")})
    with pytest.raises(ProvisionError, match="^/srv/a has an ACL"):  # a default ACL would give the app new files
        decide(step, {("file", "/srv/a"): dict(mine, acl=True), ("file", "/srv/a/releases"): None})
