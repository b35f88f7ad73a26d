"""`fab droplet.create --provider sandbox`, then `fab -H NAME deploy`, in a project of its own: the droplet
comes up with the deploy user and the operator's key (the cloud-init user data's users section),
its host key recorded before the first connection (strict checking, no --accept-new-host-key), its
line in inventory.ini among the file's other lines; `droplet.destroy` refuses without a terminal or
--yes, then removes the droplet and its line. And the same with --bootstrap. Times are printed
(pytest -s), never asserted.

Traffic goes to the droplets' own addresses only; every wait is bounded; droplets are torn down by
name."""

import os
import re
import select
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import FAB, PREFIX, ROOT

pytestmark = pytest.mark.integration

INVENTORY = """\
# hosts of this project
[web]
old1 host=203.0.113.5 user=deploy  # never contacted: only kept
"""


@pytest.fixture
def project(tmp_path, sandbox):
    """An app's repository: the example app, a fabfile, fabric.yaml, an inventory with a line of its own,
    an operator key of its own."""
    for f in ("app.py", "requirements.txt"):
        shutil.copy(ROOT / "examples/hello" / f, tmp_path / f)
    (tmp_path / "fabfile.py").write_text("from provision.tasks import ns  # noqa: F401\n")
    (tmp_path / "fabric.yaml").write_text("tasks:\n  executor_class: provision.hosts.Executor\napp:\n  name: hello\n")
    (tmp_path / "inventory.ini").write_text(INVENTORY)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator", "-f", str(tmp_path / "op_key")],
                   check=True)
    return tmp_path


def fab_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}


def fab(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([FAB, *args], cwd=project, env=fab_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def fab_on_terminal(project: Path, *args: str, answer: str, timeout: float = 60) -> tuple[int, str]:
    """fab on a terminal of its own (a pty): ``answer`` typed once it asks. (exit status, what it showed)"""
    master, slave = os.openpty()
    proc = subprocess.Popen([FAB, *args], cwd=project, env=fab_env(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    shown, typed, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal's other end closed: fab is done
                break
            if not chunk:
                break
            shown += chunk
            if not typed and b"to confirm: " in shown:
                os.write(master, answer.encode() + b"\n")
                typed = True
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), shown.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def create(project: Path, name: str, *more: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = fab(project, "droplet.create", "--provider", "sandbox", "--name", name, "--key", str(project / "op_key"),
              "--known-hosts", str(project / "known_hosts"), *more)
    return res, time.monotonic() - t0


def host_keys(sandbox, name: str) -> set[str]:
    """The droplet's own host keys, read from its root file system."""
    d = sandbox.get(name)
    return {" ".join(p.read_text().split()[:2]) for p in (Path(d.rootfs) / "etc/ssh").glob("ssh_host_*_key.pub")}


def answer(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/", timeout=10) as r:
        return r.read().decode()


def test_create_then_deploy_then_destroy(project, sandbox):
    name = PREFIX + "web1"
    try:
        res, seconds = create(project, name)
        assert res.returncode == 0, res.stderr + res.stdout
        d = sandbox.get(name)
        ready = re.search(r"ready in ([\d.]+)s", res.stdout)
        print(f"\ndroplet.create (sandbox): {seconds:.1f}s with fab's start, ready in {ready.group(1)}s")

        # Its line, after the file's own lines; its provider in a comment.
        text = (project / "inventory.ini").read_text()
        assert text.startswith(INVENTORY)
        assert re.search(rf"^\[droplets\]\n{name} host={re.escape(d.address)} user=deploy key={project}/op_key "
                         rf"known_hosts={project}/known_hosts proxy=\S+ ca_bundle=\S+  # droplet: provider=sandbox "
                         rf"id={name}$", text, re.M), text
        # The droplet's own host keys, recorded before any connection to it as the deploy user.
        recorded = {" ".join(l.split()[1:3]) for l in (project / "known_hosts").read_text().splitlines()
                    if l.split()[0] == d.address}
        assert recorded == host_keys(sandbox, name) and recorded

        # The same name again: refused before anything starts.
        again, _ = create(project, name)
        assert again.returncode == 2 and again.stderr.strip().startswith(f"error: inventory already has a host {name!r}")

        # The sandbox's own inventory (written by fab sandbox.up/down, read after inventory.ini) leaves it out:
        # its root login would replace the deploy user's.
        res = fab(project, "sandbox.down", "--name", PREFIX + "nosuch")
        assert res.returncode == 0 and (project / ".sandbox/inventory.ini").exists()
        assert f"\n{name} " not in (project / ".sandbox/inventory.ini").read_text()
        assert f"deploy@{d.address}:22" in fab(project, "-H", name, "inventory").stdout

        # Deploy as the deploy user, host keys checked strictly (no --accept-new-host-key).
        t0 = time.monotonic()
        res = fab(project, "-H", name, "deploy")
        assert res.returncode == 0, res.stderr + res.stdout[-2000:]
        print(f"fab deploy after droplet.create: {time.monotonic() - t0:.1f}s")
        assert "Hello" in answer(d.address)

        # No terminal and no --yes: refused in one line, the droplet and its line stay.
        res = fab(project, "droplet.destroy", "--name", name)
        assert res.returncode == 2
        assert res.stderr.strip() == (f"error: droplet.destroy asks before destroying {name}, and there is no terminal "
                                      "to ask on; pass --yes to destroy it without asking")
        assert sandbox.get(name) is not None and f"\n{name} " in (project / "inventory.ini").read_text()

        # On a terminal it asks; an answer that is not the droplet's name destroys nothing.
        rc, shown = fab_on_terminal(project, "droplet.destroy", "--name", name, answer="y")
        assert f"Destroy droplet {name} at sandbox ({d.address}) and its line in inventory.ini?" in shown
        assert rc == 1 and f"{name}: not destroyed" in shown, shown
        assert sandbox.get(name) is not None

        res = fab(project, "droplet.destroy", "--name", name, "--yes")  # the provider: from its inventory line
        assert res.returncode == 0, res.stderr
        assert sandbox.get(name) is None
        assert (project / "inventory.ini").read_text() == INVENTORY + "\n[droplets]\n"
        assert d.address not in (project / "known_hosts").read_text()
    finally:
        sandbox.down(name)


def test_create_with_bootstrap(project, sandbox):
    name = PREFIX + "boot1"
    try:
        res, seconds = create(project, name, "--bootstrap")
        assert res.returncode == 0, res.stderr + res.stdout[-2000:]
        print(f"\ndroplet.create --bootstrap (sandbox): {seconds:.1f}s with fab's start")
        assert f"{name}: bootstrapped: root's login is off" in res.stdout
        res = fab(project, "-H", name, "deploy")
        assert res.returncode == 0, res.stderr + res.stdout[-2000:]
        assert "Hello" in answer(sandbox.get(name).address)
        rc, shown = fab_on_terminal(project, "droplet.destroy", "--name", name, answer=name)
        assert rc == 0 and f"{name}: destroyed; removed from inventory.ini" in shown, shown
        assert sandbox.get(name) is None
    finally:
        sandbox.down(name)


def test_digitalocean_user_data_under_real_cloud_init(sandbox, tmp_path):
    """The user data DigitalOcean gets, run by Debian's own cloud-init (installed through the proxy, its
    NoCloud seed in /var/lib/cloud/seed/nocloud): schema valid, the deploy user with the key and sudo,
    and the droplet's SSH host key the one made locally, so a strict first connection passes."""
    from invoke.util import yaml

    from provision import droplets as plan
    from provision.cli.droplet import replace_host_key
    from provision.errors import ProvisionError
    from provision.providers.digitalocean import new_host_key
    from provision.ssh import connect

    name = PREFIX + "cloudinit"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "op", "-f", str(tmp_path / "op")], check=True)
    private, public = new_host_key()
    text = plan.user_data("deploy", [(tmp_path / "op.pub").read_text().strip()], (private, public))
    assert yaml.safe_load(text)["ssh_keys"]["ed25519_public"] == public
    try:
        d = sandbox.up(name)
        root = connect(d.address, "root", 22, str(sandbox.key), str(sandbox.known_hosts))
        proxy = f"-o Acquire::http::Proxy={sandbox.proxy_url} -o Acquire::https::Proxy={sandbox.proxy_url}"
        seed = "/var/lib/cloud/seed/nocloud"
        t0 = time.monotonic()
        try:
            rc, out, err = root.exec(
                f"set -e; apt-get {proxy} update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get {proxy} install "
                f"-y -q --no-install-recommends cloud-init >/dev/null; mkdir -p {seed}; cat > {seed}/user-data; "
                f"printf 'instance-id: {name}-1\\nlocal-hostname: {name}\\n' > {seed}/meta-data; "
                # the sandbox's base has no locales: C.UTF-8 is always there (system config, not user data)
                "printf 'datasource_list: [NoCloud, None]\\nlocale: C.UTF-8\\n' > /etc/cloud/cloud.cfg.d/90-sandbox.cfg; "
                f"cloud-init schema --config-file {seed}/user-data; "
                "for stage in 'init --local' init 'modules --mode config' 'modules --mode final'; do "
                "cloud-init $stage >>/var/log/provision-cloud-init.log 2>&1; done; cloud-init status --wait; cloud-init schema --system; "
                # sshd started before cloud-init here (unlike a first boot, where cloud-init runs before ssh.service)
                "systemctl restart ssh", stdin=text.encode(), timeout=400)
        finally:
            root.close()
        assert rc == 0, out + err
        print(f"\ncloud-init installed and run in {time.monotonic() - t0:.1f}s")
        keys = sorted(p.name for p in (Path(d.rootfs) / "etc/ssh").glob("ssh_host_*"))
        assert keys == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]  # the image's own keys gone
        known = tmp_path / "known_hosts"
        known.write_text(f"{d.address} {' '.join(public.split()[:2])}\n")  # only the key made here
        deploy = connect(d.address, "deploy", 22, str(tmp_path / "op"), str(known))
        try:
            assert deploy.exec("sudo -n id -u")[1] == "0\n"
            assert deploy.exec("sudo -n passwd -S deploy")[1].split()[1] == "L"  # password locked
        finally:
            deploy.close()

        # What droplet.create does next: the key the user data gave (readable from the metadata service)
        # replaced over the checked connection; from then on only the new one is trusted.
        new = replace_host_key(d.address, "deploy", str(tmp_path / "op"), known, name)
        assert new != " ".join(public.split()[:2])
        assert known.read_text() == f"{d.address} {new}\n"
        on_host = (Path(d.rootfs) / "etc/ssh/ssh_host_ed25519_key.pub").read_text()
        assert " ".join(on_host.split()[:2]) == new
        assert sorted(p.name for p in (Path(d.rootfs) / "etc/ssh").glob("ssh_host_*")) == keys  # no .old left
        connect(d.address, "deploy", 22, str(tmp_path / "op"), str(known)).close()
        stale = tmp_path / "stale"
        stale.write_text(f"{d.address} {' '.join(public.split()[:2])}\n")
        with pytest.raises(ProvisionError, match="has CHANGED"):  # sshd no longer offers the user data's key
            connect(d.address, "deploy", 22, str(tmp_path / "op"), str(stale))
    finally:
        sandbox.down(name)
