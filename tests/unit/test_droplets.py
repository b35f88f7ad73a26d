"""fab droplet.*'s decisions: the cloud-init user data, the provider, the inventory line edits,
known_hosts lines, destroy's confirmation rule."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest
from invoke.util import yaml

from provision import droplets as plan
from provision.errors import ProvisionError
from provision.inventory import Inventory
from provision.providers.digitalocean import new_host_key
from provision import secrets

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEvWo2fU4JEprQPJEGN43M6ct7tANUK8A1AHp0zF88jk"


# -- user data -------------------------------------------------------------------------------------
def test_user_data_gives_the_deploy_user_the_key_and_passwordless_sudo():
    text = plan.user_data("deploy", [KEY + " me@laptop"])
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert doc["users"] == [{"name": "deploy", "shell": "/bin/bash", "lock_passwd": True,
                             "sudo": "ALL=(ALL) NOPASSWD:ALL", "ssh_authorized_keys": [KEY + " me@laptop"]}]
    assert "ssh_keys" not in doc  # no host key asked for: the image's own keys stay


def test_user_data_keeps_a_key_comment_with_yaml_characters_as_data():
    odd = KEY + " me: #laptop - 'x'"
    doc = yaml.safe_load(plan.user_data("ops", [odd]))
    assert doc["users"][0]["ssh_authorized_keys"] == [odd]
    assert doc["users"][0]["name"] == "ops"


def test_user_data_with_a_host_key_replaces_the_images_keys():
    private, public = new_host_key()
    doc = yaml.safe_load(plan.user_data("deploy", [KEY], (private, public)))
    assert doc["ssh_keys"] == {"ed25519_private": private, "ed25519_public": public}
    assert doc["ssh_deletekeys"] is True and doc["ssh_genkeytypes"] == ["ed25519"]


def test_user_data_without_a_key_is_refused():
    with pytest.raises(ProvisionError, match="no public key to give deploy"):
        plan.user_data("deploy", [])


def test_users_section_reads_back_what_user_data_writes():
    assert plan.users_section(plan.user_data("deploy", [KEY])) == [
        {"name": "deploy", "shell": "/bin/bash", "sudo": "ALL=(ALL) NOPASSWD:ALL", "keys": [KEY]}]


@pytest.mark.parametrize("text, why", [
    ("users: []\n", "not a #cloud-config"),
    ("#cloud-config\nusers:\n  - name: 'a b'\n", "without a valid name"),
    ("#cloud-config\nusers:\n  - default\n", "without a valid name"),
])
def test_users_section_refuses_what_it_does_not_know(text, why):
    with pytest.raises(ProvisionError, match=why):
        plan.users_section(text)


def test_new_host_key_is_an_ed25519_pair_and_its_private_half_a_secret():
    private, public = new_host_key()
    import io
    k = paramiko.Ed25519Key.from_private_key(io.StringIO(private))
    assert public.split()[:2] == [k.get_name(), k.get_base64()]
    assert secrets.mask(f"oops {private.strip()} here") == "oops **** here"


# -- providers -------------------------------------------------------------------------------------
def test_provider_is_the_flag_else_the_recorded_one_never_a_guess():
    assert plan.choose_provider("sandbox") == "sandbox"
    assert plan.choose_provider(None, "digitalocean") == "digitalocean"
    assert plan.choose_provider("sandbox", "digitalocean") == "sandbox"
    with pytest.raises(ProvisionError, match="name the provider: --provider sandbox or --provider digitalocean"):
        plan.choose_provider(None)
    with pytest.raises(ProvisionError, match="unknown provider 'aws'; use one of: sandbox, digitalocean"):
        plan.choose_provider("aws")


# -- inventory.ini -----------------------------------------------------------------------------------
INVENTORY = """\
# production
[web]
web1 host=203.0.113.10 user=deploy  # the old one

[web:vars]
web2=not-a-host

[droplets]
# made by fab droplet.create
db1 host=203.0.113.20 user=deploy key=~/.ssh/id_ed25519  # droplet: provider=digitalocean id=42

; trailing comment
"""


def line(name="new1", address="203.0.113.30", **kw):
    return plan.host_line(name, address, "deploy", "~/.ssh/id_ed25519", kw.get("known_hosts"), "digitalocean", "77",
                          kw.get("extra"))


def test_host_line_parses_as_an_inventory_host_with_its_provider_in_a_comment():
    text = line(known_hosts="/tmp/k h", extra={"proxy": "http://10.231.0.1:8888"})
    inv = Inventory().parse("[droplets]\n" + text + "\n")
    t = inv.target("new1")
    assert (t.host, t.user, t.key, t.known_hosts) == ("203.0.113.30", "deploy", "~/.ssh/id_ed25519", "/tmp/k h")
    assert t.vars == {"proxy": "http://10.231.0.1:8888"}
    found = plan.find_host(text, "new1")
    assert (found.provider, found.droplet_id, found.host) == ("digitalocean", "77", "203.0.113.30")


def test_a_new_host_goes_at_the_end_of_the_droplets_group_every_other_line_kept():
    out = plan.add_host(INVENTORY, line(), "new1", replace=False, address="203.0.113.30")
    assert out.splitlines() == INVENTORY.splitlines()[:10] + [line()] + INVENTORY.splitlines()[10:]
    assert Inventory().parse(out).target("new1").host == "203.0.113.30"


def test_a_new_host_makes_the_group_when_the_file_has_none():
    assert plan.add_host("", line(), "new1", False, "203.0.113.30") == f"[droplets]\n{line()}\n"
    out = plan.add_host("[web]\nweb1 host=a\n\n\n", line(), "new1", False, "203.0.113.30")
    assert out == f"[web]\nweb1 host=a\n\n[droplets]\n{line()}\n"


def test_an_existing_name_is_refused_unless_replace_or_the_same_address():
    with pytest.raises(ProvisionError, match=r"inventory already has a host 'web1' \(host=203.0.113.10\).*--replace"):
        plan.check_name_free(INVENTORY, "web1", replace=False)
    plan.check_name_free(INVENTORY, "web1", replace=False, address="203.0.113.10")
    out = plan.add_host(INVENTORY, line("web1"), "web1", replace=True, address="203.0.113.30")
    assert out.splitlines()[2] == line("web1") and out.count("web1 ") == 1
    assert out.splitlines()[3:] == INVENTORY.splitlines()[3:]


def test_a_vars_line_is_not_a_host():
    assert plan.find_host(INVENTORY, "web2") is None
    plan.check_name_free(INVENTORY, "web2", replace=False)


def test_recorded_providers_are_those_of_droplet_lines():
    assert plan.recorded_providers(INVENTORY) == ["digitalocean"]
    two = INVENTORY + line("s1").replace("digitalocean", "sandbox") + "\n" + line("d2") + "\n# x  # droplet: provider=y\n"
    assert plan.recorded_providers(two) == ["digitalocean", "sandbox"]
    assert plan.recorded_providers("[web]\nweb1 host=a\n") == []


def test_the_sandbox_inventory_leaves_out_droplets_created_here():
    sandbox = ("# Written by `fab sandbox.up`; local sandbox droplets.\n[sandbox]\nweb1 host=10.231.0.10 user=root key=k\n"
               "s1 host=10.231.0.11 user=root key=k\n\n[sandbox:vars]\nproxy=http://10.231.0.1:8888\n")
    mine = "[droplets]\n" + plan.host_line("s1", "10.231.0.11", "deploy", "op", None, "sandbox", "s1") + "\n"
    assert plan.without_created(sandbox, mine) == sandbox.replace("s1 host=10.231.0.11 user=root key=k\n", "")
    assert plan.without_created(sandbox, INVENTORY) == sandbox  # web1 there is not a sandbox droplet


def test_remove_host_takes_only_its_line():
    out = plan.remove_host(INVENTORY, "db1")
    assert out.splitlines() == [l for l in INVENTORY.splitlines() if not l.startswith("db1 ")]
    assert plan.remove_host(INVENTORY, "nope") == INVENTORY


# -- known_hosts -------------------------------------------------------------------------------------
def test_record_keys_replaces_the_addresses_old_lines_only():
    old = "203.0.113.30 ssh-ed25519 OLD\nother ssh-rsa X\n[203.0.113.30]:2222 ssh-ed25519 Y\n"
    out = plan.record_keys(old, "203.0.113.30", ["ssh-ed25519 NEW", "ecdsa-sha2-nistp256 E"])
    assert out == ("other ssh-rsa X\n[203.0.113.30]:2222 ssh-ed25519 Y\n203.0.113.30 ssh-ed25519 NEW\n"
                   "203.0.113.30 ecdsa-sha2-nistp256 E\n")
    assert plan.forget_keys(out, "203.0.113.30") == "other ssh-rsa X\n"  # the machine is gone: every port's


def test_stale_keys_go_hashed_or_in_a_list_of_names_and_paramiko_then_finds_the_new_one(tmp_path):
    import paramiko

    hashed = paramiko.HostKeys.hash_host("203.0.113.30")
    hashed_port = paramiko.HostKeys.hash_host("[203.0.113.30]:2222")
    old = (f"{hashed} ssh-ed25519 {KEY_B64}\n203.0.113.30,web1old ssh-ed25519 {KEY_B64}\n"
           f"[203.0.113.30]:22 ssh-ed25519 {KEY_B64}\n{hashed_port} ssh-ed25519 {KEY_B64}\n"
           "# comment\n")
    assert plan.names_address(old, "203.0.113.30") and not plan.names_address(old, "203.0.113.31")
    new = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0wMeUDIxIEEq1Tnnwxx5lnvRFgS3ISbw0Dd+nHxsSS"
    out = plan.record_keys(old, "203.0.113.30", [new])
    assert out == (f"web1old ssh-ed25519 {KEY_B64}\n{hashed_port} ssh-ed25519 {KEY_B64}\n"
                   f"# comment\n203.0.113.30 {new}\n")
    (tmp_path / "kh").write_text(out)
    found = paramiko.HostKeys(str(tmp_path / "kh")).lookup("203.0.113.30")
    assert found["ssh-ed25519"].get_base64() == new.split()[1]
    assert plan.forget_keys(out, "203.0.113.30").splitlines() == out.splitlines()[:3]
    # a hashed entry hides its port: destroy passes the inventory line's port= to find it
    assert out.splitlines()[1].startswith(hashed_port)
    assert plan.forget_keys(out, "203.0.113.30", (2222,)).splitlines() == [out.splitlines()[0], "# comment"]


def test_destroy_knows_the_inventory_lines_port():
    text = "[droplets]\nweb1 host=203.0.113.30 port=2222 user=deploy  # droplet: provider=sandbox id=x\nweb2 host=203.0.113.31\n"
    assert plan.find_host(text, "web1").port == 2222
    assert plan.find_host(text, "web2").port == 22


# -- confirmation ------------------------------------------------------------------------------------
def test_destroy_goes_on_with_yes_asks_on_a_terminal_refuses_otherwise():
    assert plan.confirm_rule(yes=True, interactive=False) == "go"
    assert plan.confirm_rule(yes=False, interactive=True) == "ask"
    assert plan.confirm_rule(yes=False, interactive=False) == "refuse"
    assert plan.confirmed(" web1\n", "web1")
    assert not plan.confirmed("y", "web1")


# -- the command line: mistakes stop in one line, before any provider is asked ----------------------
ROOT = Path(__file__).resolve().parents[2]
KEY_B64 = "AAAAC3NzaC1lZDI1NTE5AAAAIEvWo2fU4JEprQPJEGN43M6ct7tANUK8A1AHp0zF88jk"
FAB = Path(sys.executable).parent / "fab"
TOKEN = "dop_v1_" + "0badc0ffee" * 6


def fab(project, *args, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FABRIC_", "DIGITALOCEAN_"))}
    # A request to the API that a mistake should have stopped would fail here, never leave the machine.
    environ.update({"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}, **env)
    return subprocess.run([str(FAB), *args], cwd=project, env=environ, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def project(tmp_path):
    shutil.copy(ROOT / "fabfile.py", tmp_path)
    shutil.copy(ROOT / "fabric.yaml", tmp_path)
    (tmp_path / "inventory.ini").write_text(INVENTORY)
    return tmp_path


@pytest.mark.parametrize("args, env, line", [
    (["droplet.create", "--name", "web9"], {}, "name the provider: --provider sandbox or --provider digitalocean"),
    (["droplet.create", "--provider", "sandbox"], {}, "name the droplet: --name web1 (it becomes its inventory alias)"),
    (["droplet.create", "--provider", "linode", "--name", "web9"], {}, "unknown provider 'linode'; use one of: "
     "sandbox, digitalocean"),
    (["droplet.create", "--provider", "digitalocean", "--name", "web1"], {"DIGITALOCEAN_TOKEN": TOKEN},
     "inventory already has a host 'web1' (host=203.0.113.10); pick another --name, or pass --replace to point that "
     "line at the new droplet"),
    (["droplet.create", "--provider", "digitalocean", "--name", "web9"], {},
     "set DIGITALOCEAN_TOKEN to a DigitalOcean API token (the control panel's API page)"),
    (["droplet.create", "--provider", "digitalocean", "--name", "web9", "--timeout", "soon"], {},
     "--timeout 'soon': give seconds, from 1 to 3600"),
    (["droplet.list"], {}, "set DIGITALOCEAN_TOKEN to a DigitalOcean API token (the control panel's API page)"),
    (["droplet.destroy", "--name", "db1"], {}, "droplet.destroy asks before destroying db1, and there is no terminal "
     "to ask on; pass --yes to destroy it without asking"),
])
def test_mistakes_stop_in_one_line(project, args, env, line):
    res = fab(project, *args, **env)
    assert (res.returncode, res.stderr, res.stdout) == (2, f"error: {line}\n", "")
    assert (project / "inventory.ini").read_text() == INVENTORY


def test_app_deploy_user_is_checked_before_anything(project):
    (project / "fabric.yaml").write_text((project / "fabric.yaml").read_text() + "  deploy_user: root\n")
    res = fab(project, "droplet.create", "--provider", "digitalocean", "--name", "web9", DIGITALOCEAN_TOKEN=TOKEN)
    assert (res.returncode, res.stderr) == (2, "error: invalid setting app.deploy_user='root': that is a system "
                                               "account; choose another login name, e.g. deploy\n")


def test_a_key_the_deploy_user_will_not_get_is_refused(project):
    for name in ("mine", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(project / name)], check=True)
    (project / "fabric.yaml").write_text((project / "fabric.yaml").read_text() + "  deploy_keys: other.pub\n")
    res = fab(project, "droplet.create", "--provider", "digitalocean", "--name", "web9", "--key", str(project / "mine"),
              DIGITALOCEAN_TOKEN=TOKEN)
    assert (res.returncode, res.stderr) == (2, f"error: the key {project}/mine is not among app.deploy_keys, which the "
                                               f"droplet's deploy gets: provision could not log in; add "
                                               f"{project}/mine.pub to deploy_keys, or pass --key with one of them\n")


def test_the_api_unreachable_is_one_line_exit_3(project):
    """Everything decided, the provider's first question fails (here: its proxy, a closed local port)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(project / "mine")], check=True)
    res = fab(project, "droplet.create", "--provider", "digitalocean", "--name", "web9", "--key", str(project / "mine"),
              DIGITALOCEAN_TOKEN=TOKEN)
    assert res.returncode == 3 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: digitalocean: cannot reach the API while listing droplets: ")
    assert res.stderr.endswith("; check the network\n") and TOKEN not in res.stderr + res.stdout
