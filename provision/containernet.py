"""The network of a container app's containers, and the host's rules that keep them to themselves.

Each container app gets an engine network of its own, ``provision-<app>``, made by its deploy when
missing; every container of the app (the slots, one-off containers, processes and timers) runs on
it. docker's has inter-container communication off (``enable_icc=false``: not even the app's own
containers reach each other) and a bridge named by provision (``pvapp-<hash>``); podman's (4.x,
whose bridges it names itself, ``cni-podman<n>`` or ``podman<n>``) is ``isolate=true``: no other
isolated network reaches it.

Publishing on 127.0.0.1 alone does not keep a port local: both engines DNAT packets to 127.0.0.1:<port>
in PREROUTING, whatever interface they come in on, so a host on the same network sending to
127.0.0.1 with this host's MAC address as next hop reaches the container (moby#45610, #41872, fixed
only in Docker 28; podman's CNI portmap does the same); and a host routing a container network's
subnet through this one reaches the containers directly. :func:`rules` (nftables table
``inet provision-containers``, loaded by its own unit, independent of ``fab bootstrap``'s firewall)
drops, before any NAT, packets to 127.0.0.0/8 (and ::1) that come in on anything but ``lo``, and
packets to containers behind provision's docker bridges (and any podman bridge) that come in on
anything but such a bridge; and packets from one app's docker bridge to another's (podman's
networks: their isolate=true). The rules are the same for every app (they name bridges by
pattern), so every container app's deploy writes the same file; they stay when the last container
app goes (they hold no app's name, drop only what no host should accept).
"""

from __future__ import annotations

import hashlib
import shlex

from .config import Settings
from .layout import PROVISION_ETC, SYSTEMD_DIR
from .steps import Command, Directory, File, Packages, Service, Step

q = shlex.quote
TABLE = "inet provision-containers"
NFT = "/usr/sbin/nft"
RULES_FILE = f"{PROVISION_ETC}/containers.nft"
UNIT = "provision-containers.service"
UNIT_FILE = f"{SYSTEMD_DIR}/{UNIT}"
BRIDGE_PREFIX = "pvapp-"  # docker: the bridges of provision's networks (an interface name: 15 characters at most)
# the bridges whose containers are provision's: docker's named by provision, podman's as podman names them
# (CNI: cni-podman<n>; netavark: podman<n>)
BRIDGES = {"docker": (BRIDGE_PREFIX + "*",), "podman": ("cni-podman*", "podman*")}


def network(s: Settings) -> str:
    """The engine network every container of the app runs on."""
    return f"provision-{s.name}"


def bridge(s: Settings) -> str:
    """docker: the Linux bridge of the app's network (app names are longer than an interface name may be)."""
    return BRIDGE_PREFIX + hashlib.sha256(s.name.encode()).hexdigest()[:9]


def create_command(s: Settings) -> str:
    net = q(network(s))
    if s.engine == "docker":
        return (f"docker network create -o com.docker.network.bridge.enable_icc=false "
                f"-o com.docker.network.bridge.name={bridge(s)} {net} >/dev/null")
    return f"podman network create -o isolate=true {net} >/dev/null"


def present_command(s: Settings) -> str:
    """Succeeds when the app's network is there as provision makes it (one made otherwise stays, and
    creating it again fails the deploy, naming it)."""
    net = q(network(s))
    if s.engine == "docker":
        want = f"{bridge(s)} false"
        fmt = '{{index .Options "com.docker.network.bridge.name"}} {{index .Options "com.docker.network.bridge.enable_icc"}}'
    else:
        want, fmt = "true", '{{index .Options "isolate"}}'
    return f"[ \"$({s.engine} network inspect -f {q(fmt)} {net} 2>/dev/null)\" = {q(want)} ]"


def rules() -> bytes:
    """The table, replaced whole and atomically (`nft -f`); nothing else's rules are touched."""
    bridges = [b for engine in sorted(BRIDGES) for b in BRIDGES[engine]]
    own = "".join(f'        iifname != "{b}" fib daddr oifname "{b}" drop\n' for b in bridges)
    return ("# Managed by provision (container apps): changes here are overwritten on the next deploy.\n"
            f"table {TABLE}\ndelete table {TABLE}\n"
            f"table {TABLE} {{\n"
            "    chain prerouting {\n"
            "        # before conntrack and the engines' DNAT (priority -100)\n"
            "        type filter hook prerouting priority raw; policy accept;\n"
            "        # 127.0.0.1:<port> published by an engine: only from this host itself\n"
            "        iifname != \"lo\" ip daddr 127.0.0.0/8 drop\n"
            "        iifname != \"lo\" ip6 daddr ::1 drop\n"
            "        # containers: only from their bridges (and this host itself: its packets never pass here)\n"
            + own +
            "    }\n"
            "    chain forward {\n"
            "        type filter hook forward priority filter - 10; policy accept;\n"
            "        # one app's containers never reach another's (nor, with docker, each other)\n"
            f'        iifname "{BRIDGE_PREFIX}*" oifname "{BRIDGE_PREFIX}*" drop\n'
            "    }\n}\n").encode()


def unit() -> bytes:
    """Loads the table at boot, before the engines start (see :func:`provision.bootstrap.nft_unit`)."""
    from .bootstrap import nft_unit  # bootstrap imports the app's steps, these among them

    return nft_unit("container apps", "provision container network rules", TABLE, RULES_FILE,
                    before="docker.service podman.service ")


def steps(s: Settings) -> list[Step]:
    """The rules loaded (now and at each boot) and the app's network there: after the engine's
    packages, before anything runs a container. Nothing to do: only facts of the one round trip."""
    if not s.container:
        return []
    return [Packages(("nftables",)),
            Directory(PROVISION_ETC, owner="root", group="root", mode=0o755),
            File(RULES_FILE, rules(), notify=("container-rules",)),
            File(UNIT_FILE, unit(), notify=("container-rules-unit",)),
            Service(UNIT, reload_on=("container-rules",), restart_on=("container-rules-unit",),
                    daemon_reload_on=("container-rules-unit",), check=f"{NFT} -c -f {RULES_FILE}"),
            Command(f"network {network(s)}", (create_command(s),), unless=present_command(s))]
