"""The peers' part of `make bench`: pyinfra and Ansible on the same reference job as provision's
(bench/peers/: deploy.py for pyinfra, site.yml for Ansible), timed the same way, on fresh droplets.

Each run, for each peer, on a fresh droplet: a fresh deploy of examples/hello, a no-op, a one-line
change of app.py, then the big app (bench/bigapp.py: 3,000 more files, ~36 MB) deployed and changed
by one line (that last deploy is the "big-app change"). Then the no-op on 10 and on 50 droplets at
once, each already deployed by the tool (booted from a snapshot of one deployed droplet when the
sandbox has snapshots, else deployed fresh). Times are of the whole command, as a user sees them.

The peers come from PyPI into their own virtualenv, .bench/peers, made when missing; their versions
are printed with the figures.

Where the jobs are not like for like (the comparison is of the same end state, not the same
guarantees):
- provision switches releases with no downtime (two gunicorn slots behind nginx, socket-activated)
  and keeps the previous release for a rollback; the peers restart their one gunicorn in place
  (requests fail for a moment) and keep no previous release.
- provision's unit is sandboxed (ProtectSystem=strict and the rest); the peers' is plain. Both run
  2 gunicorn workers (provision's with 2 threads each, the peers' sync). provision's site adds
  security headers and maps; the peers' site only proxies, to 127.0.0.1:8000 (provision's: a unix socket).
- pyinfra's pip.packages takes no range (flask>=3,<4) as a package, and with requirements= runs
  `pip install -r` every time: its job installs the requirements only when the code changed
  (provision: when they changed), gunicorn as a package (checked by `pip freeze` each run).
  Ansible's pip module takes the requirements' lines as names and checks them each run; it needs
  python3-packaging on the host (one more apt package).
- provision's health check proves the answer came from the live release's socket; the peers' checks
  get a 200 from nginx on the host (uri / a python3 loop), also on a no-op, like provision's.
- provision builds the venv from Debian's pip wheel (no ensurepip) in the background while apt
  runs; the peers use `python3 -m venv` (ensurepip) after apt, one step after another.
- The peers ship code with rsync (files.rsync, ansible.posix.synchronize): their apt step installs
  rsync too (one more package than provision's), and rsync must be on this machine (installed
  with apt-get when missing). provision uploads over its SSH connection.
- Ansible's `apt` module installs python3-apt on a fresh host first (a cost of that module).
- Ansible's ControlPersist sockets live in a directory of each command's own: every command starts
  cold, as provision and pyinfra do (a second ansible-playbook within 60 s would reuse them).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bigapp import make_big_app, touch_one_line
from provision.errors import ProvisionError

ROOT = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).with_name("peers")
VENV = ROOT / ".bench/peers"
PIP_PACKAGES = ("pyinfra", "ansible")  # ansible bundles ansible.posix (synchronize): galaxy may be unreachable
VERSIONS = ("pyinfra", "ansible-core", "ansible")
FAB = str(Path(sys.executable).with_name("fab"))
FIGURES = (("fresh", "fresh"), ("noop", "no-op"), ("change", "one-line change"), ("big_change", "big-app change"))


@dataclass(frozen=True)
class Host:
    name: str
    address: str


class Tool:
    """One deploy tool: writes its inventory for ``hosts`` and runs its job on them."""

    name = ""

    def __init__(self, sb):
        self.sb, self.output = sb, ""

    def command(self, hosts: list[Host], app: Path, tmp: Path) -> tuple[list[str], dict, Path]:
        raise NotImplementedError

    def deploy(self, hosts: list[Host], app: Path, tmp: Path) -> float:
        argv, env, cwd = self.command(hosts, app, tmp)
        t0 = time.perf_counter()
        res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        self.output = res.stdout + res.stderr  # the last command's, to look at
        if res.returncode != 0:
            names = ",".join(h.name for h in hosts)
            sys.exit(f"bench: {self.name} on {names} failed:\n{res.stdout[-6000:]}{res.stderr[-4000:]}")
        return elapsed


class Provision(Tool):
    name = "provision"

    def command(self, hosts, app, tmp):
        inventory = tmp / "provision.ini"
        inventory.write_text(self.sb.inventory() + "\n[bench]\n" + "\n".join(h.name for h in hosts) + "\n")
        argv = [FAB, "-H", "bench", "deploy", "--source", str(app), "--parallel", str(len(hosts))]
        return argv, dict(os.environ, FABRIC_INVENTORY=str(inventory)), ROOT


class Pyinfra(Tool):
    name = "pyinfra"

    def command(self, hosts, app, tmp):
        inventory = tmp / "pyinfra_inventory.py"
        common = dict(ssh_user="root", ssh_key=str(self.sb.key), ssh_known_hosts_file=str(self.sb.known_hosts),
                      ssh_strict_host_key_checking="yes", app_src=str(app), proxy=self.sb.proxy_url,
                      ca_bundle=str(self.sb.extra_ca()))
        inventory.write_text("hosts = " + repr([(h.name, dict(common, ssh_hostname=h.address)) for h in hosts]) + "\n")
        argv = [str(VENV / "bin/pyinfra"), "-y", "--parallel", str(len(hosts)), str(inventory), "deploy.py"]
        return argv, peer_env(), JOBS


class Ansible(Tool):
    name = "ansible"

    def command(self, hosts, app, tmp):
        inventory = tmp / "ansible.ini"
        known = f"-o UserKnownHostsFile={self.sb.known_hosts} -o StrictHostKeyChecking=yes"
        inventory.write_text("\n".join(
            ["[web]", *(f"{h.name} ansible_host={h.address}" for h in hosts), "", "[web:vars]", "ansible_user=root",
             f"ansible_ssh_private_key_file={self.sb.key}", f"ansible_ssh_common_args='{known}'",
             f"app_src={app}", f"proxy={self.sb.proxy_url}", f"ca_bundle={self.sb.extra_ca()}", ""]))
        control = Path(tempfile.mkdtemp(prefix="cp-", dir=tmp))  # cold ControlPersist for each command
        env = peer_env(ANSIBLE_CONFIG=str(JOBS / "ansible.cfg"), ANSIBLE_SSH_CONTROL_PATH_DIR=str(control),
                       ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"), ANSIBLE_NOCOLOR="1")
        return [str(VENV / "bin/ansible-playbook"), "-i", str(inventory), "-f", str(len(hosts)), "site.yml"], env, JOBS


PEERS = {"pyinfra": Pyinfra, "ansible": Ansible}


def selected(arg: str) -> list[str]:
    """The peers a `--peers` value names ("none": none); an unknown one stops the bench at once."""
    names = [] if arg == "none" else [n for n in arg.split(",") if n]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        sys.exit(f"bench: unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)} or none")
    return names


def peer_env(**extra: str) -> dict:
    """The peers' commands find their own tools (ansible's modules, rsync) first on PATH."""
    return dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ.get('PATH', '')}", **extra)


def ensure_peers() -> dict[str, str]:
    """The peers' virtualenv (made from PyPI when missing) and rsync here; returns their versions."""
    if not all((VENV / "bin" / b).exists() for b in ("pyinfra", "ansible-playbook")):
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin/pip"), "install", "--quiet", *PIP_PACKAGES], check=True)
    if not shutil.which("rsync"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "rsync"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    script = ("import importlib.metadata as m, sys\n"
              "print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))")
    out = subprocess.run([str(VENV / "bin/python"), "-c", script, *VERSIONS], check=True, capture_output=True,
                         text=True).stdout.split()
    return dict(item.split("==") for item in out)


def up(sb, names: list[str], snapshot: str | None = None) -> list[Host]:
    """Droplets ``names`` booted; once more when one does not boot (seen while other helpers boot
    dozens at once on this machine)."""
    try:
        booted = sb.up_many(names, snapshot=snapshot)
    except ProvisionError as e:
        print(f"bench: {e}; trying again", flush=True)
        booted = sb.up_many(names, snapshot=snapshot)
    return [Host(d.name, d.address) for d in booted]


def served(tool: Tool, host: Host, greeting: str) -> None:
    """The changed app answers through nginx on the host (a deploy that did not restart it fails here)."""
    fetch = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1/').read().decode())\""
    res = subprocess.run(["ssh", "-i", str(tool.sb.key), "-o", f"UserKnownHostsFile={tool.sb.known_hosts}",
                          "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"root@{host.address}", fetch],
                         capture_output=True, text=True)
    if res.stdout.strip() != greeting:
        sys.exit(f"bench: after {tool.name}'s deploy {host.name} answers {res.stdout.strip()!r}{res.stderr}, "
                 f"not {greeting!r}")


def one_host_runs(tool: Tool, runs: int) -> dict[str, list[float]]:
    """``runs`` times on a fresh droplet: fresh, no-op, one-line change, big-app change."""
    times: dict[str, list[float]] = {key: [] for key, _ in FIGURES}
    for i in range(runs):
        name = f"pr-{tool.name[:2]}{i}"
        with tempfile.TemporaryDirectory(prefix="provision-peers-") as t:
            tmp = Path(t)
            app = tmp / "hello"
            shutil.copytree(ROOT / "examples/hello", app)
            try:
                hosts = up(tool.sb, [name])
                fresh = tool.deploy(hosts, app, tmp)
                noop = tool.deploy(hosts, app, tmp)
                touch_one_line(app, f"Hello, run {i}!")
                change = tool.deploy(hosts, app, tmp)
                served(tool, hosts[0], f"Hello, run {i}!")
                big = make_big_app(tmp / "big")
                tool.deploy(hosts, big, tmp)
                touch_one_line(big, f"Hello, big run {i}!")
                big_change = tool.deploy(hosts, big, tmp)
                served(tool, hosts[0], f"Hello, big run {i}!")
            finally:
                tool.sb.down(name)
        for key, value in zip(times, (fresh, noop, change, big_change)):
            times[key].append(value)
        print(f"{tool.name} run {i + 1}/{runs}: fresh {fresh:.2f}s  no-op {noop:.2f}s  change {change:.2f}s  "
              f"big-app change {big_change:.2f}s", flush=True)
    return times


def fleet_noop(tool: Tool, n: int, runs: int) -> list[float]:
    """The tool's no-op on ``n`` droplets it has deployed, booted from a snapshot of one droplet it
    deployed."""
    sb = tool.sb
    names = [f"pr-{tool.name[:2]}f{i}" for i in range(n)]
    snapshot = f"pr-{tool.name}"
    with tempfile.TemporaryDirectory(prefix="provision-peers-") as t:
        tmp = Path(t)
        app = tmp / "hello"
        shutil.copytree(ROOT / "examples/hello", app)
        try:
            tool.deploy(up(sb, names[:1]), app, tmp)
            sb.snapshot(names[0], snapshot)
            hosts = up(sb, names, snapshot)
            tool.deploy(hosts, app, tmp)  # settles what is each droplet's own (host name, keys), untimed
            times = [tool.deploy(hosts, app, tmp) for _ in range(runs)]
        finally:
            sb.down_many(names)
            if snapshot in sb.list_snapshots():
                sb.drop_snapshot(snapshot)
    print(f"{tool.name} no-op on {n} hosts: " + ", ".join(f"{v:.2f}s" for v in times), flush=True)
    return times


def measure(sb, peers: list[str], runs: int, fleets: tuple[int, ...]) -> dict:
    """Every figure of the peers, and provision's on the fleets (its one-host figures are bench/run's)."""
    versions = ensure_peers()
    print("peers: " + ", ".join(f"{p} {v}" for p, v in versions.items()), flush=True)
    out: dict = {"versions": versions, "tools": {}}
    tools = [Provision(sb)] + [PEERS[p](sb) for p in peers]
    for tool in tools:
        figures = one_host_runs(tool, runs) if tool.name != "provision" else {}
        for n in fleets:
            figures[f"noop_{n}"] = fleet_noop(tool, n, runs)
        out["tools"][tool.name] = figures
    return out


def table(provision: dict, peers: dict, fleets: tuple[int, ...]) -> str:
    """Median (min-max) of each figure for provision and each peer, with the peer/provision ratio."""
    rows = FIGURES + tuple((f"noop_{n}", f"no-op, {n} hosts") for n in fleets)
    tools = peers["tools"]
    names = [t for t in tools if t != "provision"]
    mine = {**provision, **tools.get("provision", {})}
    head = f"{'':<17}{'provision':>24}" + "".join(f"{n:>24}{'ratio':>7}" for n in names)
    lines = [head]
    for key, label in rows:
        line = f"{label:<17}{cell(mine.get(key)):>24}"
        for n in names:
            v = tools[n].get(key)
            ratio = f"{statistics.median(v) / statistics.median(mine[key]):.1f}x" if v and mine.get(key) else "-"
            line += f"{cell(v):>24}{ratio:>7}"
        lines.append(line)
    lines.append("median (min-max) in seconds; ratio: the peer's median / provision's; "
                 + ", ".join(f"{p} {v}" for p, v in peers["versions"].items()))
    return "\n".join(lines)


def cell(v: list[float] | None) -> str:
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-"
