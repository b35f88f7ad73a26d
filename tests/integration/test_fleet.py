"""Fleets on three droplets: groups in parallel, rolling batches, unreachable hosts,
host-key safety, and every kind of bad input (one line, right exit code, nothing changed)."""

import json
import re
import shutil
import subprocess
import time

import pytest

from provision.sandbox import NETWORK

from .conftest import FAB, PREFIX, ROOT, Host

pytestmark = pytest.mark.integration
# droplet names; beside the default prefix (it-) another run uses its own (see conftest)
F = "fl-" if PREFIX == "it-" else f"{PREFIX}fl-"
NAMES = [f"{F}1", f"{F}2", f"{F}3"]
CHECKSUM = "find /etc /srv -xdev -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum"
UNUSED = str(NETWORK.network_address + 250)  # in the test range, never given to a droplet


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    droplets = [sandbox.up(n) for n in NAMES]
    base = sandbox.inventory()
    inv = tmp / "inventory.ini"
    inv.write_text(base + "\n[web]\n" + "\n".join(NAMES) + "\n")
    hosts = [Host(d, sandbox, inv) for d in droplets]
    try:
        yield hosts
    finally:
        for n in NAMES:
            sandbox.down(n)


def fab(host, *args, inventory=None, env=None, **kw):
    env = dict(env or {}, **({"FABRIC_INVENTORY": str(inventory)} if inventory else {}))
    return host.fab(*args, env=env, **kw)


def summary(path):
    return {r["host"]: r for r in json.loads(path.read_text())}


def test_group_deploys_in_parallel(fleet, tmp_path):
    one = fleet[0]
    t0 = time.monotonic()
    res = one.fab("-H", "web", "deploy", "--json", str(tmp_path / "s.json"))
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    s = summary(tmp_path / "s.json")
    assert set(s) == set(NAMES) and not any(r["failed"] for r in s.values())
    assert wall < 0.75 * sum(r["duration"] for r in s.values())  # they overlapped
    for h in fleet:
        assert "Hello from provision!" in h.sh("python3 -c \"import urllib.request as u; "
                                               "print(u.urlopen('http://127.0.0.1/').read().decode())\"")
    inv = one.fab("-H", "web", "inventory")
    assert [l.split()[0] for l in inv.stdout.splitlines()] == NAMES


BARRIER = """import os, pathlib, time


def test_every_host_checked_at_once(host):
    arrived = pathlib.Path(os.environ["CHECK_BARRIER"])
    (arrived / host.backend.get_pytest_id()).touch()
    deadline = time.monotonic() + 120
    while len(list(arrived.iterdir())) < int(os.environ["CHECK_HOSTS"]):
        assert time.monotonic() < deadline, "the other hosts' checks did not run meanwhile"
        time.sleep(0.1)
"""


def test_check_and_releases_run_hosts_in_parallel_each_hosts_output_whole(fleet, tmp_path):
    one = fleet[0]
    app = tmp_path / "hello"
    shutil.copytree(ROOT / "examples/hello", app)
    (app / "checks/test_barrier.py").write_text(BARRIER)  # passes only when every host's checks run at once
    (tmp_path / "arrived").mkdir()
    res = one.fab("-H", "web", "check", "--source", str(app), timeout=300,
                  env={"CHECK_BARRIER": str(tmp_path / "arrived"), "CHECK_HOSTS": str(len(NAMES))})
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in (tmp_path / "arrived").iterdir()) == NAMES
    parts = re.split(r"^== (\S+) ==$", res.stdout, flags=re.M)
    assert parts[0] == "" and parts[1::2] == NAMES, res.stdout  # a block per host, in the selection's order
    for name, block in zip(NAMES, parts[2::2]):
        assert set(re.findall(r"::test_\w+\[([^\]]+)\] (?:PASSED|SKIPPED|FAILED)", block)) == {name}, block
        assert f"test_every_host_checked_at_once[{name}] PASSED" in block, block
        [summary_line] = re.findall(r"^=+ (.* in [\d.]+s) =+$", block, re.M)
        assert "passed" in summary_line and "failed" not in summary_line, block

    res = one.fab("-H", "web", "releases")
    assert res.returncode == 0, res.stdout + res.stderr
    heads = re.findall(r"^(\S+): (\d+) release\(s\)", res.stdout, re.M)
    assert [h for h, _ in heads] == NAMES, res.stdout
    blocks = re.split(r"^\S+: \d+ release\(s\).*$", res.stdout, flags=re.M)[1:]
    for (_, count), block in zip(heads, blocks):  # each host's releases right under it
        assert len(block.strip("\n").splitlines()) == int(count) >= 1 and block.count("*") == 1, res.stdout


def test_serial_batches_without_a_transaction_stop_after_a_failed_batch(fleet, tmp_path):
    inv = tmp_path / "inv.ini"
    inv.write_text(fleet[0].inventory.read_text().replace(
        f"{F}2 host={fleet[1].address}", f"{F}2 host={fleet[1].address} health_path=/missing health_timeout=2"))
    res = fab(fleet[0], "-H", "web", "deploy", "--no-atomic", "--serial", "1", "--json", str(tmp_path / "s.json"),
              inventory=inv)
    assert res.returncode == 1
    s = summary(tmp_path / "s.json")
    assert not s[f"{F}1"]["failed"] and s[f"{F}2"]["failed"] and s[f"{F}3"]["failed"]
    assert f"{F}3: skipped" in res.stdout, res.stdout
    assert f"{F}2: FAILED  health http://127.0.0.1/missing" in res.stdout, res.stdout
    assert re.search(rf"^{F}3 .* skipped$", res.stdout, re.M)


def test_one_unreachable_host_does_not_stop_the_others(fleet, tmp_path):
    inv = tmp_path / "inv.ini"
    inv.write_text(fleet[0].inventory.read_text().replace("[web]\n", f"[web]\nghost host={UNUSED}\n"))
    res = fab(fleet[0], "-H", "web", "deploy", "--json", str(tmp_path / "s.json"), inventory=inv, timeout=120)
    assert res.returncode == 3, res.stdout + res.stderr
    s = summary(tmp_path / "s.json")
    assert s["ghost"]["failed"] and not any(s[n]["failed"] for n in NAMES)
    [line] = res.stderr.strip().splitlines()
    assert f"ghost: cannot reach root@{UNUSED}:22" in line


def test_host_keys_unknown_refused_accept_new_recorded_changed_always_refused(fleet, tmp_path):
    h = fleet[1]
    known = tmp_path / "known_hosts"
    known.write_text("")
    inv = tmp_path / "inv.ini"
    inv.write_text(h.inventory.read_text().replace(f"known_hosts={h.sandbox.known_hosts}", f"known_hosts={known}"))
    before = h.sh(CHECKSUM)
    res = fab(h, "-H", f"{F}2", "deploy", inventory=inv)
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert "host key of" in line and "is unknown" in line and "SHA256:" in line and "--accept-new-host-key" in line
    assert h.sh(CHECKSUM) == before
    ok = fab(h, "-H", f"{F}2", "deploy", "--accept-new-host-key", inventory=inv)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert known.read_text().startswith(h.address + " ")
    assert fab(h, "-H", f"{F}2", "deploy", inventory=inv).returncode == 0
    assert fab(h, "-H", f"{F}2", "check", inventory=inv).returncode == 0
    # the key changes (say, a man in the middle): refused, even with --accept-new-host-key
    other = fleet[0].droplet.rootfs / "etc/ssh/ssh_host_ed25519_key.pub"
    kind, blob = other.read_text().split()[:2]
    known.write_text(f"{h.address} {kind} {blob}\n")
    bad = fab(h, "-H", f"{F}2", "deploy", "--accept-new-host-key", inventory=inv)
    assert bad.returncode == 2
    [line] = bad.stderr.strip().splitlines()
    assert "CHANGED" in line and "ssh-keygen -R" in line
    check = fab(h, "-H", f"{F}2", "check", inventory=inv)  # fab check verifies keys too
    assert check.returncode == 2 and "CHANGED" in check.stderr


def add_user(h, name, sudoers, password=None):
    h.sh(f"id {name} >/dev/null 2>&1 || (useradd -m -s /bin/bash {name} "
         + (f"&& echo {name}:{password} | chpasswd " if password else "")
         + f"&& echo '{name} {sudoers}' > /etc/sudoers.d/{name} && mkdir -p ~{name}/.ssh "
         f"&& cp /root/.ssh/authorized_keys ~{name}/.ssh/ && chown -R {name}: ~{name}/.ssh)")


@pytest.fixture(scope="module")
def accounts(fleet):
    """deployer on fl-1: sudo with a password; ops on fl-3: passwordless sudo."""
    add_user(fleet[0], "deployer", "ALL=(ALL) ALL", password="secret")
    add_user(fleet[2], "ops", "ALL=(ALL) NOPASSWD: ALL")


@pytest.fixture
def unchanged(fleet):
    """Every host byte-identical after the test."""
    before = [h.sh(CHECKSUM) for h in fleet]
    yield
    assert [h.sh(CHECKSUM) for h in fleet] == before


def bad_inventory(tmp_path, fleet, extra):
    inv = tmp_path / "inv.ini"
    inv.write_text(fleet[0].inventory.read_text() + extra)
    return inv


@pytest.mark.parametrize("case", [
    "malformed inventory", "unknown alias", "empty selection", "duplicate host", "port out of range",
    "missing source", "missing requirements", "undefined template variable", "wrong key", "connection refused",
    "sudo password",
])
def test_bad_input_is_one_line_with_the_fix_and_changes_nothing(fleet, accounts, tmp_path, unchanged, case):
    h = fleet[0]
    args, inv, env, code, message = ["-H", f"{F}1", "deploy"], None, {}, 2, ""
    if case == "malformed inventory":
        inv, message = bad_inventory(tmp_path, fleet, "[web\n"), "malformed section header"
    elif case == "unknown alias":
        args[1], message = f"{F}9", f"unknown host or group '{F}9'"
    elif case == "empty selection":
        args, message = ["deploy"], "no hosts selected"
    elif case == "duplicate host":
        args[1], message = f"web,{F}1", "selected twice"
    elif case == "port out of range":
        args[1], message = f"root@{h.address}:70000", "out of range"
    elif case == "missing source":
        args, message = args + ["--source", str(tmp_path / "nope")], "no such directory"
    elif case == "missing requirements":
        (tmp_path / "app").mkdir()
        (tmp_path / "app" / "app.py").write_text("app = None\n")
        args, message = args + ["--source", str(tmp_path / "app")], "requirements.txt"
    elif case == "undefined template variable":
        for t in (ROOT / "provision/templates").iterdir():
            shutil.copy(t, tmp_path / t.name)
        (tmp_path / "app@.service.j2").write_text("User={{ app_user }}\n")
        env, message = {"FABRIC_APP_TEMPLATES": str(tmp_path)}, "'app_user' is undefined"
    elif case == "wrong key":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
        inv = bad_inventory(tmp_path, fleet, f"\n[other]\n{F}1b host={h.address} key={tmp_path / 'k'} known_hosts={h.sandbox.known_hosts}\n")
        args[1], message = f"{F}1b", "authentication failed"
    elif case == "connection refused":
        args[1], code, message = f"root@{h.address}:2222", 3, "connection refused by"
    elif case == "sudo password":
        inv = bad_inventory(tmp_path, fleet, f"\n[other]\n{F}1d host={h.address} user=deployer key={h.sandbox.key} known_hosts={h.sandbox.known_hosts}\n")
        args[1], message = f"{F}1d", "sudo needs a password"
    res = fab(h, *args, inventory=inv, env=env)
    assert res.returncode == code, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_unsupported_os_is_refused(fleet):
    h = fleet[2]
    h.sh("chmod -x /usr/bin/apt-get")
    try:
        res = h.fab("-H", f"{F}3", "deploy")
    finally:
        h.sh("chmod +x /usr/bin/apt-get")
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert "unsupported OS" in line and "no apt" in line


def test_name_that_does_not_resolve(fleet):
    # inside a droplet's network namespace nothing outside the test range is reachable,
    # so the failed lookup sends no traffic anywhere
    h = fleet[0]
    res = subprocess.run(["ip", "netns", "exec", h.droplet.netns, FAB, "-H", "root@no-such-host.invalid", "deploy"],
                         cwd=ROOT, env=h.env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stdout + res.stderr
    [line] = res.stderr.strip().splitlines()
    assert "does not resolve" in line


def test_deploy_as_a_sudo_user_status_and_logs(fleet, accounts, tmp_path):
    h = fleet[2]
    app = tmp_path / "hello"
    shutil.copytree(ROOT / "examples/hello", app)
    (app / "app.py").write_text((app / "app.py").read_text().replace("Hello from provision!", "Hello from ops"))
    inv = bad_inventory(tmp_path, fleet, f"\n[ops]\n{F}3o host={h.address} user=ops key={h.sandbox.key} known_hosts={h.sandbox.known_hosts}\n")
    res = fab(h, "-H", f"{F}3o", "deploy", "--source", str(app), inventory=inv)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed switch hello" in res.stdout
    status = h.fab("-H", "web", "status")
    assert status.returncode == 0, status.stderr
    for n in NAMES:
        assert re.search(rf"^{n}: release \S+; hello@[ab] running, nginx running", status.stdout, re.M)
    assert "by ops@" in status.stdout or "by root@" in status.stdout
    logs = h.fab("-H", f"{F}3", "logs", "--lines", "5")
    assert logs.returncode == 0 and re.search(rf"^{F}3 \| ", logs.stdout, re.M)
