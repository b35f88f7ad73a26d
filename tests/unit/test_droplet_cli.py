"""``fab droplet.*``'s work (provision.cli.droplet) with a provider faked in the process: which droplet
destroy acts on, which lines it removes, how inventory and known_hosts files are written."""

import multiprocessing
from pathlib import Path

import pytest
from fabric import Config
from invoke import Context, Exit

import provision.cli.droplet as cd
from provision.providers import Droplet, Provider

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEvWo2fU4JEprQPJEGN43M6ct7tANUK8A1AHp0zF88jk"


class Fake(Provider):
    name = "digitalocean"

    def __init__(self, droplets=()):
        self.droplets, self.destroyed = list(droplets), []

    def list(self):
        return list(self.droplets)

    def destroy(self, d):
        self.destroyed.append(d.id)


@pytest.fixture
def proj(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def context(proj):
    return Context(Config(overrides={"inventory": str(proj / "inventory.ini")}))


def destroy(proj, fake, name, provider="digitalocean"):
    cd.load = lambda kind: fake
    try:
        cd.destroy_droplet(context(proj), name, provider, yes=True)
    except Exit as e:
        return e.code, str(e.message)
    finally:
        cd.load = __import__("provision.providers", fromlist=["load"]).load
    return 0, ""


def test_destroy_acts_on_the_recorded_id_never_another_droplet_of_that_name(proj):
    line = "db1 host=203.0.113.20 user=deploy  # droplet: provider=digitalocean id=42\n"
    (proj / "inventory.ini").write_text("[droplets]\n" + line)
    other = Fake([Droplet("db1", "99", "digitalocean", "198.51.100.7")])  # 42 deleted in the panel; 99 another db1
    assert destroy(proj, other, "db1") == (0, "")
    assert other.destroyed == []  # only the line (of the gone droplet) goes
    (proj / "inventory.ini").write_text("[droplets]\n" + line)
    two = Fake([Droplet("db1", "99", "digitalocean", "198.51.100.7"), Droplet("db1", "42", "digitalocean",
                                                                            "203.0.113.20")])
    assert destroy(proj, two, "db1") == (0, "") and two.destroyed == ["42"]


def test_destroy_refuses_an_id_whose_address_differs_or_another_provider(proj):
    text = "[droplets]\ndb1 host=203.0.113.20 user=deploy  # droplet: provider=digitalocean id=42\n"
    (proj / "inventory.ini").write_text(text)
    fake = Fake([Droplet("db1", "42", "digitalocean", "198.51.100.7")])
    code, msg = destroy(proj, fake, "db1")
    assert code == 2 and "not destroyed" in msg and fake.destroyed == []
    code, msg = destroy(proj, fake, "db1", provider="sandbox")
    assert code == 2 and "records 'db1' as made at digitalocean, not sandbox" in msg
    assert (proj / "inventory.ini").read_text() == text


def test_destroy_leaves_a_hand_written_line_and_its_key(proj):
    text = "[web]\nweb1 host=203.0.113.10 user=deploy\n"
    (proj / "inventory.ini").write_text(text)
    kh = proj / "home/.ssh/known_hosts"
    kh.write_text(f"203.0.113.10 {KEY}\n")
    fake = Fake([Droplet("web1", "7", "digitalocean", "203.0.113.10")])
    code, msg = destroy(proj, fake, "web1")
    assert code == 2 and "no `# droplet:` comment" in msg and len(msg.splitlines()) == 1
    assert fake.destroyed == [] and (proj / "inventory.ini").read_text() == text and kh.read_text() == f"203.0.113.10 {KEY}\n"


def test_ctrl_d_at_the_destroy_prompt_is_not_destroyed(proj, monkeypatch):
    (proj / "inventory.ini").write_text("[droplets]\ndb1 host=203.0.113.20  # droplet: provider=digitalocean id=42\n")
    fake = Fake([Droplet("db1", "42", "digitalocean", "203.0.113.20")])
    monkeypatch.setattr(cd.sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(cd.sys.stdout, "isatty", lambda: True, raising=False)

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    cd.load = lambda kind: fake
    try:
        with pytest.raises(Exit) as e:
            cd.destroy_droplet(context(proj), "db1", None)
    finally:
        cd.load = __import__("provision.providers", fromlist=["load"]).load
    assert (e.value.code, e.value.message) == (1, "db1: not destroyed") and fake.destroyed == []


def _add(args):
    inv, i = args
    from provision import droplets as plan

    line = plan.host_line(f"d{i}", f"10.231.0.{i}", "deploy", "k", None, "sandbox", f"d{i}")
    cd._edit(Path(inv), lambda text: plan.add_host(text, line, f"d{i}", False, f"10.231.0.{i}"))


def test_concurrent_edits_keep_every_line_and_a_symlink(tmp_path):
    real = tmp_path / "real.ini"
    real.write_text("# mine\n[web]\nweb1 host=203.0.113.10\n")
    real.chmod(0o640)
    inv = tmp_path / "inventory.ini"
    inv.symlink_to(real)
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_add, [(str(inv), i) for i in range(1, 41)])
    text = real.read_text()
    assert sum(1 for line in text.splitlines() if line.startswith("d")) == 40 and "web1 host=203.0.113.10" in text
    assert inv.is_symlink() and real.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [".real.ini.lock", "inventory.ini", "real.ini"]


class Creating(Fake):
    name = "sandbox"
    defaults: dict = {}

    def __init__(self, failure):
        super().__init__()
        self.failure = failure

    def get(self, name):
        return None

    def create(self, spec):
        return Droplet(spec.name, "4711", self.name)

    def wait_ready(self, droplet, timeout):
        raise self.failure


@pytest.mark.parametrize("failure, code", [(KeyboardInterrupt(), 130), (OSError(28, "No space left on device"), None)])
def test_ctrl_c_or_an_os_error_after_the_droplet_exists_says_how_to_remove_it(proj, capsys, failure, code):
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(proj / "mine")], check=True)
    (proj / "inventory.ini").write_text("")
    cd.load = lambda kind: Creating(failure)
    try:
        with pytest.raises((Exit, OSError)) as e:
            cd.create_droplet(context(proj), "dropfix-web", "sandbox", key=str(proj / "mine"))
    finally:
        cd.load = __import__("provision.providers", fromlist=["load"]).load
    assert getattr(e.value, "code", None) == code if code else isinstance(e.value, OSError)
    assert ("dropfix-web: droplet dropfix-web, id 4711, exists at sandbox: remove it with `fab droplet.destroy "
            "--provider sandbox --name dropfix-web --yes`\n") in capsys.readouterr().err


class Remote:
    def __init__(self, answers):
        self.answers, self.ran = list(answers), []

    def exec(self, command, timeout=None):
        self.ran.append(command)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self):
        pass


@pytest.mark.parametrize("case", ["rotation fails", "login with the new key fails, the undo raises"])
def test_a_failed_host_key_rotation_leaves_the_address_untrusted(tmp_path, monkeypatch, case):
    from provision.errors import AuthFailed, ProvisionError

    kh = tmp_path / "known_hosts"
    kh.write_text(f"198.51.100.1 {KEY}\n203.0.113.10 {KEY}\n")
    if case == "rotation fails":
        main, logins = Remote([(1, "", "ssh-keygen: no space")]), []
    else:
        main, logins = Remote([(0, f"{KEY} \n", ""), OSError("connection lost")]), [AuthFailed("denied")]

    def connect(address, *a, **kw):
        if main.ran:
            raise logins.pop(0)
        return main

    monkeypatch.setattr(cd, "connect", connect)
    with pytest.raises(ProvisionError) as e:
        cd.replace_host_key("203.0.113.10", "deploy", "k", kh, "web9")
    assert e.value.code == 1 and "203.0.113.10's host key is no longer trusted" in str(e.value)
    assert kh.read_text() == f"198.51.100.1 {KEY}\n"


def test_the_rotation_command_puts_the_old_key_back_when_the_reload_fails(tmp_path, monkeypatch):
    import subprocess

    from provision import droplets as plan

    k = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    old = k.read_text(), (tmp_path / (k.name + ".pub")).read_text()
    monkeypatch.setattr(plan, "SSH_HOST_KEY", str(k))
    monkeypatch.setattr(plan, "ssh_reload", lambda: "false")
    res = subprocess.run(["sh", "-c", plan.rotate_host_key_command()], capture_output=True, text=True)
    assert res.returncode != 0 and res.stdout == ""
    assert (k.read_text(), (tmp_path / (k.name + ".pub")).read_text()) == old


def test_a_stale_key_in_the_users_known_hosts_goes_when_the_droplet_has_its_own_file(proj, monkeypatch, capsys):
    import subprocess

    from provision.errors import ProvisionError

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(proj / "mine")], check=True)
    (proj / "inventory.ini").write_text("")
    home_kh = proj / "home/.ssh/known_hosts"
    home_kh.write_text(f"198.51.100.1 {KEY}\n203.0.113.10,web1old {KEY}\n")

    class Ready(Creating):
        def create(self, spec):
            return Droplet(spec.name, "4711", self.name, "203.0.113.10", host_keys=(KEY,))

        def wait_ready(self, droplet, timeout):
            return droplet

    def no_login(*a, **kw):
        raise ProvisionError("no login", code=1)

    monkeypatch.setattr(cd, "wait_login", no_login)
    cd.load = lambda kind: Ready(None)
    try:
        with pytest.raises(Exit):
            cd.create_droplet(context(proj), "dropfix-web", "sandbox", key=str(proj / "mine"),
                              known_hosts=str(proj / "own_known_hosts"))
    finally:
        cd.load = __import__("provision.providers", fromlist=["load"]).load
    assert home_kh.read_text() == f"198.51.100.1 {KEY}\nweb1old {KEY}\n"
    assert (proj / "own_known_hosts").read_text() == f"203.0.113.10 {KEY}\n"
    assert "removed 203.0.113.10's old key from ~/.ssh/known_hosts" in capsys.readouterr().out


def test_a_sandbox_create_of_a_name_that_exists_is_refused_and_downs_nothing(tmp_path, monkeypatch):
    import json

    from provision.errors import ProvisionError
    from provision.providers.sandbox import SandboxProvider
    from provision.sandbox import Sandbox

    sb = Sandbox(tmp_path)
    (sb.machines / "dropfix-web").mkdir(parents=True)
    state = sb.machines / "dropfix-web/state.json"  # another run's droplet, being made or running
    state.write_text(json.dumps({"name": "dropfix-web", "address": "10.231.0.5", "pid": 0, "netns": "pv-dropfix-web",
                                 "veth": "pvh5"}))
    downs = []
    monkeypatch.setattr(sb, "prepare", lambda: None)
    monkeypatch.setattr(sb, "down", downs.append)
    with pytest.raises(ProvisionError, match="sandbox already has a droplet 'dropfix-web'"):
        SandboxProvider(sb).create(cd.Spec(name="dropfix-web", user_data="#cloud-config\nusers: []\n"))
    assert downs == [] and state.exists()
