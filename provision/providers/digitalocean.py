"""DigitalOcean, through its official Python client ``pydo`` (an optional dependency:
``pip install 'provision[digitalocean]'``), imported only here.

Why pydo: it is DigitalOcean's own client, generated from the API's OpenAPI specification and released
with it (monthly); python-digitalocean's last release was in 2021, and Apache Libcloud's driver maps
droplets onto a lowest-common-denominator node model (no user data typing, no tags filter) for a
library ten times the size of what is used here.

The token comes from ``DIGITALOCEAN_TOKEN``, is remembered as a secret (masked out of every line
provision prints) and never printed. DigitalOcean's API reports no SSH host keys: the droplet gets an
ed25519 host key made here, in its cloud-init user data (see :func:`new_host_key` and the README).
Droplets made here are tagged ``provision``; ``list`` shows those.
"""

from __future__ import annotations

import os
import time

from .. import secrets
from ..errors import ProvisionError, Unreachable
from . import Droplet, Provider, Spec

TOKEN_VARIABLE = "DIGITALOCEAN_TOKEN"
TAG = "provision"
INSTALL = "pip install 'provision[digitalocean]'"
PER_PAGE = 200
MAX_PAGES = 50  # 10,000 droplets: a bounded walk through the pages
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 30  # seconds, per request


def new_host_key() -> tuple[str, str]:
    """A fresh ed25519 SSH host key: (its private key in OpenSSH's PEM form, its public line). Kept in
    memory only; the private half is remembered as a secret, so no error line can show it."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    secrets.remember([private.strip()])
    return private, public


def api_error(e: Exception, doing: str) -> ProvisionError:
    """One line for an error of the API (its status, DigitalOcean's id and message) or of the way there."""
    status = getattr(e, "status_code", None)
    if status is None:
        return Unreachable(f"digitalocean: cannot reach the API while {doing}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}; check the network")
    body: dict = {}
    try:
        body = e.response.json() or {}
    except Exception:  # noqa: BLE001 - no JSON body: the status says enough
        pass
    what = f"{status} {body.get('id', '')}".strip()
    message = " ".join(str(body.get("message") or getattr(e, "reason", "") or "").split())
    fix = {401: f"check {TOKEN_VARIABLE} (a token with write scope, from the control panel's API page)",
           403: f"the token in {TOKEN_VARIABLE} lacks the scope for this; make one with write scope",
           404: "it is gone already, or the id is wrong: `fab droplet.list` shows the droplets",
           422: "fix --size, --region or --image (`doctl compute size list`, `... region list`, `... image list`)",
           429: "the API's rate limit: wait a minute and retry"}.get(status, "retry, or see status.digitalocean.com")
    return ProvisionError(secrets.mask(f"digitalocean: {doing}: {what}: {message}; {fix}"), code=2 if status < 500 else 1)


class DigitalOcean(Provider):
    name = "digitalocean"
    generates_host_key = True
    defaults = {"size": "s-1vcpu-1gb", "region": "fra1", "image": "debian-12-x64"}

    def __init__(self, token: str, sleep=time.sleep, clock=time.monotonic, **client_kwargs):
        try:
            import pydo
            from azure.core.exceptions import AzureError
        except ImportError:
            raise ProvisionError(f"the digitalocean provider needs its client: {INSTALL}")
        if not token:
            raise ProvisionError(f"set {TOKEN_VARIABLE} to a DigitalOcean API token (the control panel's API page)")
        secrets.remember([token])
        self._errors = AzureError
        client_kwargs.setdefault("retry_total", 3)  # azure-core's default, 10 with backoff, would wait minutes
        client_kwargs.setdefault("connection_timeout", CONNECT_TIMEOUT)  # azure-core's: 300 s each
        client_kwargs.setdefault("read_timeout", READ_TIMEOUT)
        self.client = pydo.Client(token=token, **client_kwargs)
        self.sleep, self.clock = sleep, clock

    @classmethod
    def from_environment(cls, environ=os.environ, **kwargs) -> "DigitalOcean":
        return cls(environ.get(TOKEN_VARIABLE, "").strip(), **kwargs)

    def _call(self, doing: str, fn, *a, **kw):
        kw.setdefault("connection_timeout", CONNECT_TIMEOUT)  # per request too: a transport given has its own
        kw.setdefault("read_timeout", READ_TIMEOUT)
        try:
            return fn(*a, **kw)
        except self._errors as e:
            raise api_error(e, doing) from None

    @staticmethod
    def droplet(d: dict) -> Droplet:
        public = [n["ip_address"] for n in (d.get("networks") or {}).get("v4") or [] if n.get("type") == "public"]
        return Droplet(name=d["name"], id=str(d["id"]), provider="digitalocean", address=public[0] if public else None,
                       status=d.get("status", ""), size=d.get("size_slug", ""),
                       region=(d.get("region") or {}).get("slug", ""))

    def create(self, spec: Spec) -> Droplet:
        body = {"name": spec.name, "size": spec.size or self.defaults["size"],
                "region": spec.region or self.defaults["region"], "image": spec.image or self.defaults["image"],
                "user_data": spec.user_data, "tags": [TAG], "monitoring": True, "ipv6": False}
        try:  # never retried: a POST the API took but answered late (5xx, a timeout) would make another droplet
            out = self.client.droplets.create(body=body, retry_total=0, connection_timeout=CONNECT_TIMEOUT,
                                              read_timeout=READ_TIMEOUT)
        except self._errors as e:
            error = api_error(e, f"creating droplet {spec.name}")
            status = getattr(e, "status_code", None)
            if status is not None and 400 <= status < 500:
                raise error from None  # refused: nothing was created
            raise type(error)(f"{error}; a droplet may have been created all the same (and costs): "
                              f"fab droplet.list --provider {self.name}") from None
        return self.droplet(out["droplet"])

    def wait_ready(self, droplet: Droplet, timeout: float = 300, interval: float = 3) -> Droplet:
        """Polls the droplet until it is ``active`` with a public IPv4 address (DigitalOcean's ``new``
        lasts about a minute); sshd may answer a little later (the caller waits for its banner)."""
        deadline = self.clock() + timeout
        status = "new"
        while True:
            left = deadline - self.clock()
            if left <= 0:  # checked before each poll: a slow answer never takes the wait past --timeout
                raise ProvisionError(f"digitalocean: droplet {droplet.name} not active after {timeout:.0f}s (status "
                                     f"{status!r}); see the control panel", code=1)
            d = self.droplet(self._call(f"reading droplet {droplet.name}", self.client.droplets.get,
                                        droplet_id=int(droplet.id), read_timeout=max(1.0, min(READ_TIMEOUT, left)))
                             ["droplet"])
            status = d.status
            if d.status == "active" and d.address:
                return d
            if d.status not in ("new", "active"):
                raise ProvisionError(f"digitalocean: droplet {d.name} is {d.status!r}, not starting; see the control "
                                     "panel, then `fab droplet.destroy --name " + d.name + "`", code=1)
            self.sleep(interval)

    def list(self) -> list[Droplet]:
        out: dict[str, Droplet] = {}  # by id: a droplet made or gone between two pages shifts the others
        for page in range(1, MAX_PAGES + 1):
            res = self._call("listing droplets", self.client.droplets.list, tag_name=TAG, per_page=PER_PAGE, page=page)
            for d in res.get("droplets") or []:
                out.setdefault(str(d["id"]), self.droplet(d))
            if not ((res.get("links") or {}).get("pages") or {}).get("next"):
                return list(out.values())
        raise ProvisionError(f"digitalocean: more than {MAX_PAGES} pages of droplets tagged {TAG!r} "
                             f"({MAX_PAGES * PER_PAGE}); not all were read", code=1)

    def get(self, name: str) -> Droplet | None:
        """The droplet named ``name`` (DigitalOcean allows several of one name: that is refused)."""
        found = [d for d in self.list() if d.name == name]
        if len(found) > 1:
            raise ProvisionError(f"digitalocean has {len(found)} droplets named {name!r} (ids "
                                 f"{', '.join(d.id for d in found)}); destroy the extra ones in the control panel")
        return found[0] if found else None

    def destroy(self, droplet: Droplet) -> None:
        self._call(f"destroying droplet {droplet.name}", self.client.droplets.destroy, droplet_id=int(droplet.id))
