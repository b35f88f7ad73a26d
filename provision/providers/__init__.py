"""Where droplets come from: one interface, one module per provider (as Kamal splits its own).

A provider creates a droplet from a :class:`Spec` (name, size, region, image, the cloud-init user
data), waits until it is ready (an address, sshd answering), lists and destroys droplets. What it
returns is a :class:`Droplet`: name, provider's id, address, status, size and region, and the SSH host
keys it knows for it (empty when it knows none). ``sandbox`` runs the local droplets of
:mod:`provision.sandbox`, ``digitalocean`` DigitalOcean's API through its official client (``pydo``, an
optional dependency imported only by that provider).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ProvisionError


@dataclass(frozen=True)
class Spec:
    name: str
    user_data: str
    size: str | None = None
    region: str | None = None
    image: str | None = None
    host_keys: tuple[str, ...] = ()  # host keys the user data gives the droplet ("TYPE BASE64"), known before it boots


@dataclass(frozen=True)
class Droplet:
    name: str
    id: str
    provider: str
    address: str | None = None
    status: str = ""
    size: str = ""
    region: str = ""
    host_keys: tuple[str, ...] = ()  # "TYPE BASE64" each, as the provider reports them
    inventory_vars: dict = field(default_factory=dict, compare=False, hash=False)  # settings its hosts need


class Provider:
    """The interface. ``wait_ready`` returns the droplet with its address once sshd answers there."""

    name = ""
    default_key = "~/.ssh/id_ed25519"  # the operator's key when neither --key nor app.deploy_keys names one
    default_known_hosts = "~/.ssh/known_hosts"
    generates_host_key = False  # True: the user data carries a host key made here (the provider reports none)
    defaults: dict = {}  # size, region, image when not given

    def records_host_keys(self, known_hosts: str) -> bool:
        """True when the provider itself keeps its droplets' keys in file ``known_hosts`` (and forgets them)."""
        return False

    def create(self, spec: Spec) -> Droplet:
        raise NotImplementedError

    def wait_ready(self, droplet: Droplet, timeout: float) -> Droplet:
        raise NotImplementedError

    def list(self) -> list[Droplet]:
        raise NotImplementedError

    def get(self, name: str) -> Droplet | None:
        return next((d for d in self.list() if d.name == name), None)

    def get_by_id(self, droplet_id: str) -> Droplet | None:
        """The droplet with the provider's id ``droplet_id`` (the one an inventory line records), or None."""
        return next((d for d in self.list() if d.id == droplet_id), None)

    def destroy(self, droplet: Droplet) -> None:
        raise NotImplementedError


def load(name: str, **kwargs) -> Provider:
    """The provider ``name`` (see :func:`provision.droplets.choose_provider`), its module imported only now."""
    if name == "sandbox":
        from .sandbox import SandboxProvider

        return SandboxProvider(**kwargs)
    if name == "digitalocean":
        from .digitalocean import DigitalOcean

        return DigitalOcean.from_environment(**kwargs)
    raise ProvisionError(f"unknown provider {name!r}")
