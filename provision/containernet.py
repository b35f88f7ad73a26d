"""The network of a container app's containers, and the host's rules that keep them to themselves.

Each container app gets an engine network of its own, ``provision-<app>``, made by its deploy when
missing; every container of the app (the slots, one-off containers, processes and timers) runs on
it. docker's has inter-container communication off (``enable_icc=false``: not even the app's own
containers reach each other) and a bridge named by provision (``pvapp-<hash>``); podman's (4.x,
whose bridges it names itself, ``cni-podman<n>`` or ``podman<n>``) is ``isolate=true``: no other
isolated network reaches it.
"""

from __future__ import annotations

import hashlib
import shlex

from .config import Settings
from .steps import Command, Step

q = shlex.quote
BRIDGE_PREFIX = "pvapp-"  # docker: the bridges of provision's networks (an interface name: 15 characters at most)


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


def steps(s: Settings) -> list[Step]:
    """The app's network there: after the engine's packages, before anything runs a container.
    Nothing to do: only a fact of the one round trip."""
    if not s.container:
        return []
    return [Command(f"network {network(s)}", (create_command(s),), unless=present_command(s))]
