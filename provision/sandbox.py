"""Local disposable droplets: real Debian hosts booted with systemd-nspawn.

Each droplet is a copy of a cached debootstrap base, with its own SSH host
keys, its own network namespace (a veth pair on the ``pvbr0`` bridge, an
address in 10.231.0.0/24), cgroups of its own, and nothing but sshd and python3
on it, like a fresh VPS. Like a VPS's root, a droplet's root may manage its own
firewall (CAP_NET_ADMIN, which systemd-nspawn drops by default): its rules live
in its own network namespace. Droplets reach apt and PyPI only through a
tinyproxy listening on the bridge address; the settings they need for that
(``proxy``, ``ca_bundle``) are written into the sandbox inventory, as a user
behind a corporate proxy would write them into theirs.

A droplet can also start from a **snapshot** (``Sandbox.snapshot``): the overlay upper layer of a
droplet stopped after, say, a deploy, kept read-only under ``snapshots/`` and stacked on the base
(``lowerdir=<snapshot>:<base>``), so fifty droplets with the app deployed boot in seconds instead of
each spending minutes on apt. ``up_many`` boots several at once.

Everything started here is recorded in a state directory and torn down by
PID (a droplet's checked to be the process started, by its start time: a PID is
reused); set-up is idempotent and clears leftovers of earlier runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ProvisionError

STATE_DIR = Path(os.environ.get("PROVISION_SANDBOX_DIR", "/var/lib/provision-sandbox"))
SUITE = os.environ.get("PROVISION_SANDBOX_SUITE", "bookworm")
MIRROR = "http://deb.debian.org/debian"
BRIDGE = "pvbr0"
NETWORK = ipaddress.ip_network("10.231.0.0/24")
GATEWAY = ipaddress.ip_address("10.231.0.1")
FIRST_HOST = 10
PROXY_PORT = 8888
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_PACKAGES = "systemd,systemd-sysv,dbus,openssh-server,python3,sudo,iproute2,ca-certificates"
# cgroup hierarchies a droplet gets a group of its own in: the hybrid layout's name=systemd and
# unified ones, or the one cgroup2 tree of a pure v2 host (whichever of them this machine has).
CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
# What a snapshot leaves out of the droplet it is taken from: what is that host's own (its host keys,
# machine id and the journal kept under it, systemd's random seed and credential key, its logins and
# nginx's logs of its visitors, temporary files). _personalise writes a droplet's own keys, machine id
# and names at each boot. The app's releases, settings and secrets stay: that is what a snapshot is for.
SNAPSHOT_FORGETS = ("etc/ssh/ssh_host_*", "etc/machine-id", "var/lib/dbus/machine-id", "var/lib/systemd/random-seed",
                    "var/lib/systemd/credential.secret", "var/log/journal/*", "var/log/wtmp", "var/log/btmp",
                    "var/log/lastlog", "var/log/nginx/*", "tmp/*", "var/tmp/*", "root/.ssh/authorized_keys")
# Every droplet's systemd, journald, logind... take inotify instances of root's on this machine
# (no user namespaces): about 6 each, and the kernel's default allows root 128, so the 20th droplet
# or so would not boot ("Failed to allocate manager object: Too many open files"). prepare() raises
# the limit to this (never lowers it): room for a droplet on every address of the bridge.
INOTIFY_INSTANCES = 8192
INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")
# A droplet's own SSH host keys: no RSA one (`ssh-keygen -A` spends 0.4 s of CPU on it, 20 s for 50
# droplets booting at once; sshd goes without it).
HOST_KEY_TYPES = ("ed25519", "ecdsa")
# Droplets that can run a container engine (`fab sandbox.up --containers`): measured facts in
# docs/containers-in-droplets.md. Each of these was needed (left out, the engine failed); only such droplets
# get them, since writable /proc/sys/net lets the droplet's root change its own network settings.
CONTAINER_NSPAWN_ENV = {
    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",  # else runc: mkdir /sys/fs/cgroup/cpuset/...: read-only file system
    "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",  # else dockerd: enabling IP forwarding failed
}
CONTAINER_NSPAWN_ARGS = ("--system-call-filter=add_key keyctl bpf",)  # else runc: unable to join session keyring
# The engines' storage, bound from the droplet's own directory on this machine's file system: the
# droplet's root is an overlay, and podman's overlay driver refuses to stack on one.
ENGINE_STORAGE = ("/var/lib/docker", "/var/lib/containers")
ENGINES = ("docker", "podman")
# The engine's Debian packages, without recommends (docker.io brings containerd, runc, tini, iptables).
ENGINE_PACKAGES = {"docker": ("docker.io",), "podman": ("podman", "runc", "catatonit", "iptables")}
# podman here: crun raises RLIMIT_MEMLOCK, which this machine does not allow (runc does not), and the
# droplet's cgroup tree has no pids controller.
PODMAN_CONF = '[containers]\npids_limit = 0\n\n[engine]\nruntime = "runc"\n'
# A container droplet's base image, localhost/debian:<the suite's version>, imported from local files (no
# registry here): the cached base root file system as a tarball, bound into the droplet at DROPLET_IMAGES.
SUITE_VERSIONS = {"bookworm": "12", "trixie": "13"}
DROPLET_IMAGES = "/var/lib/provision-sandbox"
# What the base image leaves out of the base root file system: the API file systems and scratch space.
BASE_IMAGE_EXCLUDES = ("./proc/*", "./sys/*", "./dev/*", "./run/*", "./tmp/*", "./var/tmp/*", "./var/cache/apt/archives/*.deb",
                       "./etc/ssh/ssh_host_*")
HOST_TOOLS = {  # command -> Debian package providing it
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "tinyproxy": "tinyproxy",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
}


# A real ACME CA for TLS tests: Debian's pebble on the bridge address, with pebble-challtestsrv as its
# DNS (each test names its droplet there). Its directory listens on 443: the droplets reach it through
# their proxy, like any CA, and tinyproxy tunnels only to ports 443 and 80.
ACME_PACKAGE = "pebble"
ACME_PORT = 443
ACME_MANAGEMENT_PORT = 15000  # pebble's roots (this machine only)
ACME_DNS_PORT = 8053
ACME_DNS_MANAGEMENT_PORT = 8055  # challtestsrv's: add an A record


@dataclass(frozen=True)
class Acme:
    """The sandbox's ACME CA: its directory URL and its listener's certificate (a droplet trusts it
    through ca_bundle, this machine to fetch the root certificates issue chain to)."""

    directory: str
    listener_cert: Path
    roots: str  # the URL of the root that issued certificates chain to (new at each start of pebble)


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise ProvisionError(f"sandbox: `{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _apt_install(*args: str) -> None:
    """Debian packages on this machine (the sandbox's own tools)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run("apt-get", "update", "-qq", env=env)
    _run("apt-get", "install", "-y", "-qq", *args, env=env)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if not _alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _start_time(pid: int | None) -> int | None:
    """When process ``pid`` started (clock ticks after boot: /proc/<pid>/stat's field 22), None when it is
    gone. With its PID, it names one process: a PID alone is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _recorded_pid(pidfile: Path) -> int | None:
    """The PID a sandbox program's ``pidfile`` records ("PID START"), when that process still runs: a
    PID whose start time differs is another process now (the machine rebooted, the PID reused). A file
    of an older sandbox ("PID" alone) is trusted while the PID runs, as it was."""
    try:
        pid, _, start = pidfile.read_text().strip().partition(" ")
        pid = int(pid)
    except (OSError, ValueError):
        return None
    if start.isdigit():
        return pid if _start_time(pid) == int(start) else None
    return pid if _alive(pid) else None


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (none when it is gone)."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _stop_nspawn(d: Droplet, timeout: float = 15.0) -> None:
    """Stop a droplet's systemd-nspawn: TERM (the droplet shuts down), and when it has not ended within
    ``timeout``, KILL its children first (the droplet's init), then it: nspawn killed alone would leave
    the droplet's init running, reparented. Only the process the droplet was started as: its PID, in a
    state file left behind (a reboot), may be another's now, which is never signalled."""
    if not d.running():
        return
    pid = d.pid
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not d.running():
            return
        time.sleep(0.1)
    for child in _children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    _stop_pid(pid, signal.SIGKILL, timeout=5)


def _own_cgroups(name: str) -> list[Path]:
    """A new cgroup for droplet ``name`` in each hierarchy, beside this process's own. Without one,
    every droplet's systemd shares this machine's groups: two droplets' ``hello.worker.service``
    are then one group, and stopping it in one droplet fails (EIO) or kills the other's processes."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        own["" if hid == "0" else controllers] = path
    out = []
    for root in CGROUP_HIERARCHIES:
        if not (root / "cgroup.procs").exists():
            continue
        key = "" if root.name in ("unified", "cgroup") else f"name={root.name}"
        if key not in own:
            continue
        group = root / own[key].lstrip("/") / f"pv-{name}"
        _remove_cgroup(group)
        group.mkdir(parents=True, exist_ok=True)
        out.append(group)
    return out


def _remove_cgroup(group: Path) -> None:
    """Remove a droplet's cgroup and the groups its systemd made inside (deepest first); a group
    that still holds a process stays."""
    if not group.is_dir():
        return
    for top, dirs, _ in os.walk(group, topdown=False):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(top, d))
    with contextlib.suppress(OSError):
        group.rmdir()


def _pem_blocks(text: str) -> list[str]:
    """The certificates of a PEM bundle, each normalised to BEGIN..END plus a newline."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    return [begin + chunk.split(end, 1)[0] + end + "\n" for chunk in text.split(begin)[1:] if end in chunk]


def check_name(kind: str, name: str) -> None:
    """A droplet's or snapshot's name: it becomes a directory, a machine and network namespace name."""
    if not name.replace("-", "").isalnum() or len(name) > 20:
        raise ProvisionError(f"sandbox: bad {kind} name {name!r}; use letters, digits and '-' (at most 20)")


def forgotten(layer: Path) -> list[Path]:
    """The paths of a snapshot layer that SNAPSHOT_FORGETS leaves out (see there)."""
    return sorted({p for pattern in SNAPSHOT_FORGETS for p in layer.glob(pattern) if p.is_symlink() or p.exists()})


def overlay_options(layers: list[Path], upper: Path, work: Path) -> str:
    """The overlay mount options of a droplet: its upper dir over the layers, topmost first."""
    for p in (*layers, upper, work):
        if any(c in str(p) for c in ",:\\"):
            raise ProvisionError(f"sandbox: the path {p} cannot be an overlay layer (',', ':' or a backslash in it)")
    return f"lowerdir={':'.join(map(str, layers))},upperdir={upper},workdir={work}"


def can_run() -> str | None:
    """None when this machine can run droplets, else the reason it cannot."""
    if os.geteuid() != 0:
        return "sandbox droplets need root (systemd-nspawn, network namespaces)"
    if not Path("/proc/self/ns/net").exists():
        return "sandbox droplets need network namespaces"
    if shutil.which("apt-get") is None and any(shutil.which(t) is None for t in HOST_TOOLS):
        return "sandbox droplets need " + ", ".join(sorted(set(HOST_TOOLS.values())))
    return None


@dataclass
class Droplet:
    name: str
    address: str
    pid: int
    netns: str
    veth: str
    cgroups: tuple[str, ...] = ()  # the droplet's own cgroup in each hierarchy (see _own_cgroups)
    snapshot: str | None = None  # the snapshot it started from (Sandbox.snapshot)
    containers: bool = False  # booted with what a container engine needs (CONTAINER_NSPAWN_*)
    started: int | None = None  # when its systemd-nspawn started (_start_time): with pid, that process

    @property
    def rootfs(self) -> Path:
        return STATE_DIR / "machines" / self.name / "rootfs"

    def running(self) -> bool:
        """Its systemd-nspawn runs: the process at ``pid`` is the one started for it (a state recorded
        before ``started`` was: a systemd-nspawn of this machine's name)."""
        if not _alive(self.pid):
            return False
        if self.started is not None:
            return _start_time(self.pid) == self.started
        try:
            argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return argv[0].endswith(b"systemd-nspawn") and f"--machine={self.name}".encode() in argv


class Sandbox:
    def __init__(self, state_dir: Path = STATE_DIR, suite: str = SUITE):
        self.dir = Path(state_dir)
        self.suite = suite
        self.machines = self.dir / "machines"

    # -- paths -------------------------------------------------------------
    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def base(self) -> Path:
        return self.dir / f"base-{self.suite}"

    @property
    def snapshots(self) -> Path:
        return self.dir / "snapshots"

    @property
    def proxy_url(self) -> str:
        return f"http://{GATEWAY}:{PROXY_PORT}"

    # -- one-time set-up -----------------------------------------------------
    def ensure_tools(self) -> None:
        missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None})
        if not missing:
            return
        _apt_install(*missing)

    def ensure_base(self) -> Path:
        """Build the cached base root filesystem once (about 50 s)."""
        if (self.base / "usr/sbin/sshd").exists():
            return self.base
        partial = self.base.with_name(self.base.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        _run("debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", self.suite, str(partial), MIRROR)
        partial.rename(self.base)
        return self.base

    def ensure_key(self) -> Path:
        if not self.key.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "provision-sandbox", "-f", str(self.key))
        return self.key

    def ensure_network(self) -> None:
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
        addrs = _run("ip", "-o", "addr", "show", "dev", BRIDGE).stdout
        if f" {GATEWAY}/" not in addrs:
            _run("ip", "addr", "add", f"{GATEWAY}/{NETWORK.prefixlen}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")

    def ensure_proxy(self) -> int:
        conf = self.dir / "tinyproxy.conf"
        conf.write_text(
            "\n".join(
                [
                    f"Listen {GATEWAY}",
                    f"Port {PROXY_PORT}",
                    "Timeout 600",
                    "MaxClients 100",
                    f"Allow {NETWORK}",
                    "ConnectPort 443",
                    "ConnectPort 80",
                    "LogLevel Warning",
                    f"LogFile \"{self.dir / 'tinyproxy.log'}\"",
                    "DisableViaHeader Yes",
                    "",
                ]
            )
        )
        return self._daemon(self.dir / "tinyproxy.pid", self.dir / "tinyproxy.err", PROXY_PORT,
                            ["tinyproxy", "-d", "-c", str(conf)])

    @staticmethod
    def ensure_limits() -> None:
        """Kernel limits that many droplets at once need (see INOTIFY_INSTANCES)."""
        if INOTIFY_LIMIT.exists() and int(INOTIFY_LIMIT.read_text()) < INOTIFY_INSTANCES:
            INOTIFY_LIMIT.write_text(f"{INOTIFY_INSTANCES}\n")

    def prepare(self) -> None:
        """Everything droplets need on this machine; idempotent."""
        self.ensure_limits()
        self.ensure_tools()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ensure_base()
        self.ensure_key()
        self.ensure_network()
        self.ensure_proxy()

    # -- the ACME CA (TLS tests) ----------------------------------------------
    @property
    def acme_dir(self) -> Path:
        return self.dir / "acme"

    def ensure_acme(self) -> Acme:
        """pebble and pebble-challtestsrv running on the bridge address (the Debian package installed
        first when missing); idempotent: what runs is kept. Their PIDs are in the state directory."""
        if shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None:
            _apt_install("--no-install-recommends", ACME_PACKAGE)
        self.ensure_network()
        d = self.acme_dir
        d.mkdir(parents=True, exist_ok=True)
        cert, key = d / "listener.pem", d / "listener.key"
        if not cert.exists() or not key.exists():
            _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj",
                 f"/CN={GATEWAY}", "-addext", f"subjectAltName=IP:{GATEWAY}", "-keyout", str(key), "-out", str(cert))
        config = d / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"{GATEWAY}:{ACME_PORT}", "managementListenAddress": f"{GATEWAY}:{ACME_MANAGEMENT_PORT}",
            "certificate": str(cert), "privateKey": str(key), "httpPort": 80, "tlsPort": 443,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        clean = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}  # no proxy: all of it is on the bridge
        self._daemon(d / "challtestsrv.pid", d / "challtestsrv.log", ACME_DNS_MANAGEMENT_PORT, [
            "pebble-challtestsrv", "-defaultIPv4", "", "-defaultIPv6", "", "-dns01", f"{GATEWAY}:{ACME_DNS_PORT}",
            "-http01", "", "-https01", "", "-tlsalpn01", "", "-management", f"{GATEWAY}:{ACME_DNS_MANAGEMENT_PORT}"],
            clean)
        self._daemon(d / "pebble.pid", d / "pebble.log", ACME_PORT, ["pebble", "-config", str(config), "-dnsserver", f"{GATEWAY}:{ACME_DNS_PORT}"],
                     dict(clean, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0"))
        return Acme(f"https://{GATEWAY}:{ACME_PORT}/dir", cert, f"https://{GATEWAY}:{ACME_MANAGEMENT_PORT}/roots/0")

    def _daemon(self, pidfile: Path, log: Path, port: int, argv: list[str], env: dict | None = None) -> int:
        """A program of the sandbox running (started, its PID in ``pidfile``, its output in ``log``,
        unless it runs), listening on ``port`` of the bridge address."""
        pid = _recorded_pid(pidfile)
        if pid and self._listening(str(GATEWAY), port):
            return pid
        _stop_pid(pid)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        pidfile.write_text(f"{proc.pid} {_start_time(proc.pid)}")
        deadline = time.monotonic() + 10
        while not self._listening(str(GATEWAY), port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ProvisionError(f"sandbox: {argv[0]} did not start; see {log}")
            time.sleep(0.05)
        return proc.pid

    @staticmethod
    def _stop_daemon(pidfile: Path) -> None:
        """Stop what ``_daemon`` started, by the PID it recorded (only while that PID is still that process)."""
        if pidfile.exists():
            _stop_pid(_recorded_pid(pidfile))
            pidfile.unlink()

    def acme_name(self, name: str, address: str) -> None:
        """The CA's DNS answers ``name`` with ``address`` (a droplet's)."""
        if ipaddress.ip_address(address) not in NETWORK:
            raise ProvisionError(f"sandbox: {address} is not a droplet's address")
        body = json.dumps({"host": name, "addresses": [address]}).encode()
        with socket.create_connection((str(GATEWAY), ACME_DNS_MANAGEMENT_PORT), timeout=5) as conn:
            conn.sendall(b"POST /add-a HTTP/1.0\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            answer = conn.recv(1024)
        if b" 200 " not in answer.split(b"\r\n", 1)[0]:
            raise ProvisionError(f"sandbox: challtestsrv refused the name {name}: {answer[:200]!r}")

    def stop_acme(self) -> None:
        """Stop the ACME CA's programs, by the PIDs ensure_acme recorded."""
        for name in ("pebble", "challtestsrv"):
            self._stop_daemon(self.acme_dir / f"{name}.pid")

    # -- droplets ------------------------------------------------------------
    def _state_file(self, name: str) -> Path:
        return self.machines / name / "state.json"

    def get(self, name: str) -> Droplet | None:
        try:  # written whole (renamed into place), and gone at once when the droplet goes
            state = json.loads(self._state_file(name).read_text())
        except FileNotFoundError:
            return None
        known = {f.name for f in fields(Droplet)}  # a state file of another version may hold more
        return Droplet(**{k: v for k, v in state.items() if k in known})

    def list(self) -> list[Droplet]:
        if not self.machines.exists():
            return []
        out = [self.get(p.name) for p in sorted(self.machines.iterdir())]
        return [d for d in out if d is not None]

    def _free_index(self) -> int:
        used = {int(ipaddress.ip_address(d.address)) - int(NETWORK.network_address) for d in self.list()}
        for i in range(FIRST_HOST, NETWORK.num_addresses - 1):
            if i not in used:
                return i
        raise ProvisionError("sandbox: no free address left in 10.231.0.0/24; run `fab sandbox.down --all`")

    def up(self, name: str, snapshot: str | None = None, containers: bool = False,
           create_only: bool = False) -> Droplet:
        """Droplet ``name`` running (a fresh one from the base, or from ``snapshot``); one already
        running as asked is kept. ``containers``: it can run a container engine (see engine_ready).
        ``create_only``: a droplet ``name`` already there (or being made) is refused, never kept or
        replaced (checked under the lock that allocates addresses)."""
        self.prepare()
        if containers:
            self.base_image()
        return self._up(name, snapshot, containers, create_only)

    def up_many(self, names: list[str], snapshot: str | None = None, workers: int = 8,
                containers: bool = False) -> list[Droplet]:
        """Droplets ``names`` running, ``workers`` booting at a time (set-up done once first); in the
        order of ``names``. When one fails to boot, those that did are kept (tear them down by name)."""
        if len(set(names)) != len(names):
            raise ProvisionError("sandbox: a droplet name is given twice")
        for name in names:
            check_name("droplet", name)
        self.prepare()
        if containers:
            self.base_image()
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
            futures = [pool.submit(self._up, name, snapshot, containers) for name in names]
        return [f.result() for f in futures]

    def _up(self, name: str, snapshot: str | None, containers: bool = False,
            create_only: bool = False) -> Droplet:
        check_name("droplet", name)
        layers = self.layers(snapshot) if snapshot else []
        current = None if create_only else self.get(name)
        if (current and current.snapshot == snapshot and current.containers == containers and current.running()
                and self._ssh_banner(current.address, timeout=2)):
            return current
        if current:
            self.down(name)
        mdir = self.machines / name
        rootfs = mdir / "rootfs"
        # Several test runs may start droplets at once: an address is taken under a lock,
        # by writing the droplet's state with it.
        with self._locked():
            if create_only and self._state_file(name).exists():
                raise ProvisionError(f"sandbox already has a droplet {name!r}; pick another --name, or remove it "
                                     f"first: fab droplet.destroy --provider sandbox --name {name}")
            index = self._free_index()
            address = str(NETWORK.network_address + index)
            self._release_rootfs(mdir)
            mdir.mkdir(parents=True)
            self._write_atomic(self._state_file(name), json.dumps(asdict(Droplet(
                name, address, 0, f"pv-{name}", f"pvh{index}", snapshot=snapshot, containers=containers))))
        netns, veth = f"pv-{name}", f"pvh{index}"
        peer = f"pvc{index}"
        self._make_rootfs(mdir, layers)
        self._personalise(rootfs, name)
        if containers:
            self._container_files(rootfs)
        # Network: a namespace of our own with one veth pair onto the bridge.
        self._drop_netns(netns, veth)
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", netns)
        _run("ip", "-n", netns, "link", "set", peer, "name", "eth0")
        _run("ip", "-n", netns, "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        # The address may have belonged to an earlier droplet: forget its MAC, or the
        # host keeps sending to the old one (or answers "no route") until the entry expires.
        _run("ip", "neigh", "flush", "to", address, "dev", BRIDGE, check=False)
        log = open(mdir / "console.log", "ab")
        cgroups = _own_cgroups(name)
        # The launching shell joins the droplet's own cgroups, then becomes systemd-nspawn.
        join = 'for g in $PV_CGROUPS; do echo $$ > "$g/cgroup.procs" || exit 1; done; exec "$@"'
        nspawn, nspawn_env = self.nspawn_command(name, mdir, netns, containers)
        proc = subprocess.Popen(
            ["/bin/sh", "-c", join, "sh", *nspawn], env={**os.environ, "PV_CGROUPS": " ".join(map(str, cgroups)),
                                                         **nspawn_env},
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        droplet = Droplet(name=name, address=address, pid=proc.pid, netns=netns, veth=veth,
                          cgroups=tuple(map(str, cgroups)), snapshot=snapshot, containers=containers,
                          started=_start_time(proc.pid))
        self._write_atomic(self._state_file(name), json.dumps(asdict(droplet)))
        deadline = time.monotonic() + 60
        while not self._ssh_banner(address, timeout=1):
            if proc.poll() is not None or time.monotonic() > deadline:
                console = (mdir / "console.log").read_text(errors="replace").strip().splitlines()
                self.down(name)
                failed = [line for line in console if "Failed" in line] or console or ["no output"]
                raise ProvisionError(f"sandbox: droplet {name} did not boot: {failed[-1]}")
            time.sleep(0.1)
        self._record_host_keys(droplet)
        return droplet

    # -- container engines in droplets -----------------------------------------
    @property
    def image_tar(self) -> Path:
        return self.dir / "images" / f"debian-{self.suite}.tar"

    @property
    def image_name(self) -> str:
        """The base image container droplets build from: localhost/debian:12 (13 for trixie)."""
        return f"localhost/debian:{SUITE_VERSIONS.get(self.suite, self.suite)}"

    @property
    def droplet_image_tar(self) -> str:
        """Where a container droplet finds the base image's tarball."""
        return f"{DROPLET_IMAGES}/debian-{SUITE_VERSIONS.get(self.suite, self.suite)}.tar"

    def base_image(self) -> Path:
        """The tarball container droplets import as ``image_name``: the cached base root file system
        (Debian with python3), without API file systems and host keys. Made once (about 5 s), and again
        when the base is newer (rebuilt since)."""
        self.ensure_base()
        tar = self.image_tar
        if tar.exists() and tar.stat().st_mtime >= self.base.stat().st_mtime:
            return tar
        tar.parent.mkdir(parents=True, exist_ok=True)
        partial = tar.with_name(tar.name + f".{os.getpid()}.partial")
        _run("tar", "-C", str(self.base), "--numeric-owner", "--xattrs", "-cf", str(partial),
             *(f"--exclude={e}" for e in BASE_IMAGE_EXCLUDES), ".")
        partial.rename(tar)
        return tar

    def nspawn_command(self, name: str, mdir: Path, netns: str, containers: bool) -> tuple[list[str], dict[str, str]]:
        """The systemd-nspawn command that boots droplet ``name`` (its directory ``mdir``), and what it adds
        to nspawn's environment. Pure. Only a container droplet gets what an engine needs
        (CONTAINER_NSPAWN_*), storage of its own for the engines (ENGINE_STORAGE) and the base image's
        tarball, read-only."""
        argv = ["systemd-nspawn", "-q", "-D", str(mdir / "rootfs"), "-b", "--register=no", "--keep-unit",
                f"--machine={name}", f"--network-namespace-path=/run/netns/{netns}", "--console=read-only",
                "--capability=CAP_NET_ADMIN"]
        if not containers:
            return argv, {}
        return [*argv, *CONTAINER_NSPAWN_ARGS, f"--bind-ro={self.image_tar}:{self.droplet_image_tar}",
                *(f"--bind={own}:{path}" for own, path in self._engine_storage(mdir))], dict(CONTAINER_NSPAWN_ENV)

    @staticmethod
    def _engine_storage(mdir: Path) -> list[tuple[Path, str]]:
        """Each engine's storage (ENGINE_STORAGE): the droplet's own directory for it, and the path inside."""
        return [(mdir / "engine" / path.rsplit("/", 1)[-1], path) for path in ENGINE_STORAGE]

    def _container_files(self, rootfs: Path) -> None:
        """What a container droplet holds besides the base: its engines' storage, where the base image's
        tarball is bound (read-only: the droplet's root can never change the cache other droplets import)
        and podman's settings for this machine (PODMAN_CONF; docker needs none)."""
        for own, _ in self._engine_storage(rootfs.parent):
            own.mkdir(parents=True, exist_ok=True)
        target = rootfs / self.droplet_image_tar.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
        conf = rootfs / "etc/containers/containers.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(PODMAN_CONF)

    def engine_script(self, engine: str, proxy: str) -> str:
        """The droplet's shell script that makes ``engine`` ready: its packages when missing (apt through
        ``proxy``), the base image (``image_name``) imported when missing, then ``<engine> info`` must answer."""
        if engine not in ENGINES:
            raise ProvisionError(f"sandbox: unknown container engine {engine!r}; use one of {', '.join(ENGINES)}")
        pkgs, image = " ".join(ENGINE_PACKAGES[engine]), self.image_name
        return "\n".join([
            "set -e",
            f"export http_proxy={proxy} https_proxy={proxy} DEBIAN_FRONTEND=noninteractive",
            f"if ! command -v {engine} >/dev/null; then",
            f"  echo 'Acquire::http::Proxy \"{proxy}\";' > /etc/apt/apt.conf.d/80sandbox-proxy",
            "  apt-get update -qq",
            f"  apt-get install -y -qq --no-install-recommends {pkgs} >/dev/null",
            "fi",
            f"{engine} info >/dev/null",
            f"{engine} image inspect {image} >/dev/null 2>&1 || {engine} import {self.droplet_image_tar} {image} >/dev/null",
            "",
        ])

    def engine_ready(self, droplet: Droplet, engine: str = "docker") -> float:
        """Container engine ``engine`` running in ``droplet`` (one started with ``containers``), with
        the base image in its store; idempotent. Returns the seconds it took."""
        if not droplet.containers:
            raise ProvisionError(f"sandbox: droplet {droplet.name} was not started for containers; "
                                 f"`fab sandbox.down --name {droplet.name}`, then `fab sandbox.up --name {droplet.name} --containers`")
        from .ssh import connect

        t0 = time.monotonic()
        remote = connect(droplet.address, "root", 22, str(self.key), str(self.known_hosts))
        try:
            rc, out, err = remote.exec(self.engine_script(engine, self.proxy_url), timeout=600)
        finally:
            remote.close()
        if rc != 0:
            lines = (err.strip() or out.strip() or "no output").splitlines()
            raise ProvisionError(f"sandbox: {engine} is not ready in droplet {droplet.name}: {lines[-1]}")
        return time.monotonic() - t0

    def down(self, name: str) -> bool:
        d = self.get(name)
        if d is None:
            return False
        _stop_nspawn(d)  # systemd-nspawn shuts the droplet down on SIGTERM (its init killed after 15 s)
        for group in d.cgroups:
            _remove_cgroup(Path(group))
        self._drop_netns(d.netns, d.veth)
        # Its address is free once its state is gone: forget its host keys first, or they would go
        # with those of the next droplet given that address meanwhile.
        self._forget_host_keys(d.address)
        self._release_rootfs(self.machines / name)
        return True

    # -- snapshots -----------------------------------------------------------
    def _snapshot_meta(self, name: str) -> Path:
        return self.snapshots / f"{name}.json"

    def layers(self, snapshot: str) -> list[Path]:
        """The read-only layers a droplet from ``snapshot`` stacks on the base, topmost first, base last
        (a snapshot of a droplet that started from another snapshot sits on that one's layers)."""
        check_name("snapshot", snapshot)
        meta = self._snapshot_meta(snapshot)
        if not meta.exists():
            raise ProvisionError(f"sandbox: no snapshot {snapshot!r}; take one with "
                                 f"`fab sandbox.snapshot --name DROPLET --as {snapshot}`")
        parent = json.loads(meta.read_text()).get("parent")
        return [self.snapshots / snapshot, *(self.layers(parent) if parent else [self.base])]

    def list_snapshots(self) -> list[str]:
        return sorted(p.stem for p in self.snapshots.glob("*.json")) if self.snapshots.exists() else []

    def _chain(self, snapshot: str | None) -> list[str]:
        """``snapshot`` and the snapshots under it (those of them that exist)."""
        out = []
        while snapshot and snapshot not in out and self._snapshot_meta(snapshot).exists():
            out.append(snapshot)
            snapshot = json.loads(self._snapshot_meta(snapshot).read_text()).get("parent")
        return out

    def _snapshot_users(self, snapshot: str) -> list[str]:
        """Droplets and snapshots that stack on ``snapshot``'s layer (it cannot change under them)."""
        users = [d.name for d in self.list() if snapshot in self._chain(d.snapshot)]
        users += [f"snapshot {s}" for s in self.list_snapshots() if s != snapshot and snapshot in self._chain(s)]
        return users

    def snapshot(self, droplet_name: str, snapshot_name: str) -> Path:
        """Turn droplet ``droplet_name`` into snapshot ``snapshot_name``, a read-only layer droplets
        can start from (``up(name, snapshot=...)``): the droplet is shut down, its overlay upper dir
        copied (``cp -a`` keeps overlayfs's whiteouts and trusted.* attributes) without what is that
        host's own (SNAPSHOT_FORGETS), and the droplet released. An older snapshot of that name is
        replaced whole, never half; one that droplets run on is refused."""
        check_name("snapshot", snapshot_name)
        d = self.get(droplet_name)
        if d is None:
            raise ProvisionError(f"sandbox: no droplet {droplet_name!r} to snapshot")
        users = self._snapshot_users(snapshot_name)
        if users:
            raise ProvisionError(f"sandbox: snapshot {snapshot_name!r} is in use by {', '.join(users)}; "
                                 "take those down first, or choose another name")
        mdir = self.machines / droplet_name
        if not os.path.ismount(mdir / "rootfs"):
            raise ProvisionError(f"sandbox: droplet {droplet_name} has no overlay (overlayfs missing here); "
                                 "snapshots need one")
        _stop_nspawn(d)
        self._release_rootfs(mdir, keep=True)
        self.snapshots.mkdir(parents=True, exist_ok=True)
        layer, partial = self.snapshots / snapshot_name, self.snapshots / f"{snapshot_name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        _run("cp", "-a", "--reflink=auto", str(mdir / "upper"), str(partial))
        for p in forgotten(partial):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        self.down(droplet_name)
        with self._locked():
            old = self.snapshots / f"{snapshot_name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if layer.exists():
                layer.rename(old)
            partial.rename(layer)
            self._write_atomic(self._snapshot_meta(snapshot_name), json.dumps(
                {"from": droplet_name, "parent": d.snapshot, "time": time.time()}) + "\n")
            shutil.rmtree(old, ignore_errors=True)
        return layer

    def drop_snapshot(self, name: str) -> bool:
        """Remove snapshot ``name``; False when there is none. Refused while droplets run on it."""
        check_name("snapshot", name)
        if not self._snapshot_meta(name).exists():
            return False
        users = self._snapshot_users(name)
        if users:
            raise ProvisionError(f"sandbox: snapshot {name!r} is in use by {', '.join(users)}; take those down first")
        with self._locked():
            self._snapshot_meta(name).unlink()
            shutil.rmtree(self.snapshots / name, ignore_errors=True)
        return True

    @staticmethod
    def _write_atomic(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(text)
        tmp.rename(path)

    def down_many(self, names: list[str], workers: int = 8) -> list[str]:
        """Tear droplets ``names`` down, ``workers`` at a time; the names of those there were."""
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
            gone = list(pool.map(self.down, names))
        return [n for n, g in zip(names, gone) if g]

    def down_all(self) -> list[str]:
        names = [d.name for d in self.list()]
        for n in names:
            self.down(n)
        self._stop_daemon(self.dir / "tinyproxy.pid")
        self.stop_acme()
        return names

    # -- helpers -------------------------------------------------------------
    def _make_rootfs(self, mdir: Path, layers: list[Path]) -> None:
        """An overlay on the cached base, or on a snapshot's layers (instant); without overlayfs, a full
        copy of the base (a snapshot then cannot be used)."""
        rootfs, upper, work = mdir / "rootfs", mdir / "upper", mdir / "work"
        for d in (rootfs, upper, work):
            d.mkdir()
        opts = overlay_options(layers or [self.base], upper, work)
        res = _run("mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs), check=False)
        if res.returncode != 0:
            if layers:
                raise ProvisionError(f"sandbox: cannot mount the snapshot's layers: {res.stderr.strip()}")
            rootfs.rmdir()
            _run("cp", "-a", "--reflink=auto", str(self.base), str(rootfs))

    @staticmethod
    def _release_rootfs(mdir: Path, keep: bool = False) -> None:
        """Unmount the droplet's root file system; and remove its directory, unless ``keep``."""
        rootfs = mdir / "rootfs"
        if os.path.ismount(rootfs):
            _run("umount", str(rootfs), check=False)
            if os.path.ismount(rootfs):
                _run("umount", "-l", str(rootfs))
        if not keep:
            shutil.rmtree(mdir, ignore_errors=True)

    def _personalise(self, rootfs: Path, name: str) -> None:
        for f in (rootfs / "etc/ssh").glob("ssh_host_*"):
            f.unlink()
        for kind in HOST_KEY_TYPES:
            _run("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{name}", "-f",
                 str(rootfs / f"etc/ssh/ssh_host_{kind}_key"))
        (rootfs / "etc/hostname").write_text(name + "\n")
        (rootfs / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
        (rootfs / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        ssh_dir = rootfs / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        auth = ssh_dir / "authorized_keys"
        auth.write_text(Path(str(self.key) + ".pub").read_text())
        auth.chmod(0o600)
        # No DNS inside: everything outside goes through the proxy by name.
        resolv = rootfs / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        resolv.write_text("")

    @staticmethod
    def _drop_netns(netns: str, veth: str) -> None:
        if _run("ip", "link", "show", veth, check=False).returncode == 0:
            _run("ip", "link", "del", veth, check=False)
        if Path(f"/run/netns/{netns}").exists():
            _run("ip", "netns", "del", netns, check=False)

    @contextlib.contextmanager
    def _locked(self):
        """Serialises address allocation and known_hosts edits between processes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _record_host_keys(self, d: Droplet) -> None:
        lines = []
        for pub in sorted((d.rootfs / "etc/ssh").glob("ssh_host_*_key.pub")):
            kind, blob = pub.read_text().split()[:2]
            lines.append(f"{d.address} {kind} {blob}\n")
        with self._locked():
            self._forget_host_keys(d.address, locked=True, add=lines)

    def _forget_host_keys(self, address: str, locked: bool = False, add: list[str] = ()) -> None:
        """Drop ``address``'s lines from the sandbox's known_hosts (then add ``add``): the file is
        replaced whole, so an SSH client reading it meanwhile never sees half a line."""
        if not locked:
            with self._locked():
                return self._forget_host_keys(address, locked=True, add=add)
        old = self.known_hosts.read_text().splitlines(True) if self.known_hosts.exists() else []
        keep = [l for l in old if l.split(" ", 1)[0] != address]
        if keep != old or add:
            self._write_atomic(self.known_hosts, "".join(keep + list(add)))

    @staticmethod
    def _listening(host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    @staticmethod
    def _ssh_banner(host: str, timeout: float) -> bool:
        try:
            with socket.create_connection((host, 22), timeout=timeout) as s:
                s.settimeout(timeout)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def extra_ca(self) -> Path:
        """The CAs this machine trusts beyond stock Debian's (what HTTPS through the proxy
        needs), as a corporate proxy's users would have them: usually one certificate."""
        out = self.dir / "extra-ca.crt"
        stock = self.base / "etc/ssl/certs/ca-certificates.crt"
        if not out.exists() or out.stat().st_mtime < Path(HOST_CA_BUNDLE).stat().st_mtime:
            known = set(_pem_blocks(stock.read_text())) if stock.exists() else set()
            extra = [b for b in _pem_blocks(Path(HOST_CA_BUNDLE).read_text()) if b not in known]
            out.write_text("".join(extra) or Path(HOST_CA_BUNDLE).read_text())
        return out

    def inventory(self) -> str:
        """Inventory text for the running droplets (Ansible-style INI)."""
        lines = ["# Written by `fab sandbox.up`; local sandbox droplets.", "[sandbox]"]
        for d in self.list():
            lines.append(f"{d.name} host={d.address} user=root key={self.key}")
        lines += [
            "",
            "[sandbox:vars]",
            f"known_hosts={self.known_hosts}",
            f"proxy={self.proxy_url}",
            f"ca_bundle={self.extra_ca()}",
            "",
        ]
        return "\n".join(lines)
