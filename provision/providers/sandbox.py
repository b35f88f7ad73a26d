"""The sandbox's local droplets (:mod:`provision.sandbox`) as a provider, so that ``fab droplet.create``'s
whole path runs for real here.

The sandbox knows each droplet's host keys (it makes them before the droplet boots): they are what
``create`` reports. Sandbox droplets have no cloud-init: ``create`` applies the user data's ``users``
section (the same document DigitalOcean gets) with a small root program over the sandbox's own
root login, as cloud-init's users module does on first boot (``provision/remote/cloud_users.py``).
``--size``, ``--region`` and ``--image`` do not apply: every sandbox droplet is Debian 12.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from .. import remote as programs
from ..droplets import users_section
from ..errors import ProvisionError, StepFailed
from ..layout import CLOUD_INIT_SUDOERS
from ..ssh import connect
from . import Droplet, Provider, Spec

SANDBOX_NETWORK = ipaddress.ip_network("10.231.0.0/16")


class SandboxProvider(Provider):
    name = "sandbox"

    def __init__(self, sandbox=None):
        if sandbox is None:
            from ..sandbox import Sandbox, can_run

            reason = can_run()
            if reason:
                raise ProvisionError(f"cannot run sandbox droplets here: {reason}")
            sandbox = Sandbox()
        self.sb = sandbox

    @property
    def default_key(self) -> str:  # the key the sandbox's root login takes
        return str(self.sb.ensure_key())

    @property
    def default_known_hosts(self) -> str:  # the sandbox records (and forgets) its droplets' keys there itself
        return str(self.sb.known_hosts)

    def records_host_keys(self, known_hosts: str) -> bool:
        return Path(known_hosts).expanduser().resolve() == Path(self.sb.known_hosts).resolve()

    def _droplet(self, d) -> Droplet:
        keys = []
        for pub in sorted((Path(d.rootfs) / "etc/ssh").glob("ssh_host_*_key.pub")):
            kind, blob = pub.read_text().split()[:2]
            keys.append(f"{kind} {blob}")
        return Droplet(name=d.name, id=d.name, provider=self.name, address=d.address,
                       status="running" if d.running() else "stopped", size="-", region="local",
                       host_keys=tuple(keys),
                       inventory_vars={"proxy": self.sb.proxy_url, "ca_bundle": str(self.sb.extra_ca())})

    def create(self, spec: Spec) -> Droplet:
        users = users_section(spec.user_data)
        d = self.sb.up(spec.name, create_only=True)  # another run's droplet of that name is refused, never taken down
        droplet = self._droplet(d)
        # The droplet's first boot, as cloud-init would do it: over the sandbox's root login, whose
        # host keys the sandbox recorded before the droplet booted.
        try:
            if ipaddress.ip_address(d.address) not in SANDBOX_NETWORK:
                raise ProvisionError(f"sandbox: droplet {spec.name} has address {d.address}, outside {SANDBOX_NETWORK}")
            r = connect(d.address, "root", 22, str(self.sb.key), str(self.sb.known_hosts), label=spec.name)
            try:
                rc, out, err = r.exec(programs.python("cloud_users.py", {"users": users, "sudoers": CLOUD_INIT_SUDOERS}),
                                      timeout=60)
            finally:
                r.close()
            if rc != 0:
                raise StepFailed(f"{spec.name}: applying the user data's users failed: {(err or out).strip()}")
        except BaseException:
            self.sb.down(spec.name)  # a droplet that did not come up as asked is not kept
            raise
        return droplet

    def wait_ready(self, droplet: Droplet, timeout: float = 60) -> Droplet:
        return droplet  # up() returns once sshd answers

    def list(self) -> list[Droplet]:
        return [self._droplet(d) for d in self.sb.list()]

    def get(self, name: str) -> Droplet | None:
        d = self.sb.get(name)
        return self._droplet(d) if d else None

    def destroy(self, droplet: Droplet) -> None:
        self.sb.down(droplet.name)
