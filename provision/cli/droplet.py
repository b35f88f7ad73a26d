"""``fab droplet.create``, ``droplet.list``, ``droplet.destroy``: a droplet from a provider
(:mod:`provision.providers`), its host keys recorded before the first connection, its line in
``inventory.ini``; the decisions are :mod:`provision.droplets`'.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from invoke import Exit

from .. import config as cfg, droplets as plan
from ..errors import AuthFailed, ProvisionError, Unreachable
from ..hosts import ENV_APP, Selection, inventory_paths, project
from ..output import Printer
from ..providers import Droplet, Provider, Spec, load
from ..ssh import connect
from . import guarded
from .bootstrap import RELOAD_GRACE, public_key_of, run_bootstrap

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"  # where provision (and OpenSSH) look first


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """``path`` replaced whole (a reader never sees half of it; a symlink's target is what is replaced),
    keeping its mode: a temporary file of its own in the same directory, flushed to disk, renamed."""
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True)
    if real.exists():
        mode = real.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".provision-tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _edit(path: Path, change) -> str:
    """``path``'s text replaced by ``change(text)``, read and written under an exclusive lock on a file
    beside it (``.NAME.lock``): two provision runs editing one inventory or known_hosts file each keep
    the other's lines. Returns the text written."""
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(real.with_name(f".{real.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = change(_read(real))
        _write(real, text)
        return text
    finally:
        os.close(fd)  # releases the lock


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def inventory_file(c) -> Path:
    """The inventory droplets are written to: the first file of the inventory setting (inventory.ini)."""
    return inventory_paths(c)[0]


def deploy_settings(c) -> tuple[str, tuple[str, ...]]:
    """``deploy_user`` and ``deploy_keys`` (public key lines) as fabric.yaml and FABRIC_APP_* give them."""
    project_app = c.config.get("app") or {}
    raw = cfg.layer({str(k): v for k, v in dict(project_app).items()}, ENV_APP, {}, {})
    user = cfg._deploy_user(raw.get("deploy_user", cfg.DEFAULTS["deploy_user"]), str(raw.get("name", "")))
    keys = cfg._public_keys(cfg._list("deploy_keys", raw.get("deploy_keys") or []), project(c))
    return user, keys


def wait_login(address: str, user: str, key: str, known_hosts: str, label: str, timeout: float) -> float:
    """Seconds until ``user`` logs in (host key checked: never accepted new) and ``sudo -n`` works, and
    cloud-init, where there is one, has finished; bounded by ``timeout``."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        try:
            r = connect(address, user, 22, key, known_hosts, label=label, timeout=10)
        except (AuthFailed, Unreachable) as e:  # sshd not up yet, or the user not made yet
            if time.monotonic() > deadline:
                raise ProvisionError(f"{label}: no login as {user} after {timeout:.0f}s: {e}", code=1)
            time.sleep(2)
            continue
        try:
            rc, out, err = r.exec("sudo -n true && { command -v cloud-init >/dev/null || exit 0; "
                                  "sudo -n cloud-init status --wait >/dev/null; }", timeout=max(30.0, timeout))
        finally:
            r.close()
        if rc not in (0, 2):  # cloud-init status: 2 = done with recoverable errors
            raise ProvisionError(f"{label}: {user} logs in but cannot use sudo, or cloud-init failed: "
                                 f"{(err or out).strip()[:200]}; see /var/log/cloud-init-output.log there", code=1)
        return time.monotonic() - t0


def replace_host_key(address: str, user: str, key: str, known_hosts: Path, label: str) -> str:
    """The host key the user data gave (readable from the droplet's metadata service) replaced by one
    made on the droplet, over a connection checked with the old one; the new one recorded in
    ``known_hosts`` once a fresh login checked with it works. Returns the new key ("TYPE BASE64").

    On any failure the address's keys leave ``known_hosts``: the user data's key is no longer trusted
    (anyone who read the metadata service could offer it), and the host is refused until its key is
    checked by hand."""
    r = connect(address, user, 22, key, str(known_hosts), label=label)
    rotated = False
    try:
        rc, out, err = r.exec(f"sudo -n sh -c {shlex.quote(plan.rotate_host_key_command())}", timeout=60)
        if rc != 0 or not out.strip():  # the command put the old key back itself (its trap)
            raise ProvisionError(f"could not replace the host key the user data gave: {(err or out).strip()[:200]}")
        rotated = True
        new = " ".join(out.split()[:2])
        _edit(known_hosts, lambda text: plan.record_keys(text, address, [new]))
        deadline = time.monotonic() + RELOAD_GRACE
        while True:  # sshd re-executes itself on reload: its socket is closed for a moment
            try:
                connect(address, user, 22, key, str(known_hosts), label=label).close()
                break
            except Unreachable as e:
                if "connection refused" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        r.exec(f"sudo -n {plan.rotate_cleanup_command()}", timeout=60)
        return new
    except BaseException as e:
        try:
            if rotated:
                with contextlib.suppress(Exception):  # the old key back in use on the droplet, its files as sshd's
                    r.exec(f"sudo -n sh -c {shlex.quote(plan.rotate_undo_command())}", timeout=60)
        finally:
            _edit(known_hosts, lambda text: plan.forget_keys(text, address))
        if not isinstance(e, ProvisionError):
            raise
        raise ProvisionError(f"{label}: {e}; {address}'s host key is no longer trusted (removed from {known_hosts}): "
                             f"check its fingerprint on the provider's console, then `fab -H {label} check "
                             "--accept-new-host-key`, or destroy it (see README: Droplets)", code=1) from None
    finally:
        r.close()


@guarded
def create_droplet(c, name: str, provider: str | None, size: str | None = None, region: str | None = None,
                   image: str | None = None, key: str | None = None, known_hosts: str | None = None,
                   replace: bool = False, bootstrap: bool = False, timeout: float | None = None) -> None:
    from ..inventory import ALIAS_RE

    if not name:
        raise ProvisionError("name the droplet: --name web1 (it becomes its inventory alias)")
    if not ALIAS_RE.fullmatch(name) or "." in name:
        raise ProvisionError(f"droplet name {name!r}: use letters, digits, '-' or '_' (--name web1)")
    try:
        wait = float(timeout) if timeout else None
    except ValueError:
        wait = -1.0
    if wait is not None and not 0 < wait <= 3600:
        raise ProvisionError(f"--timeout {timeout!r}: give seconds, from 1 to 3600")
    kind = plan.choose_provider(provider)
    user, deploy_keys = deploy_settings(c)
    inv = inventory_file(c)
    plan.check_name_free(_read(inv), name, replace)
    printer = Printer()
    prov = load(kind)
    if kind == "sandbox" and (size or region or image):
        printer.line(f"{name}: --size, --region and --image do not apply to sandbox droplets (Debian 12); ignored")
    key = key or prov.default_key
    if not os.path.isfile(os.path.expanduser(key)):
        raise ProvisionError(f"SSH key file {key} not found; pass --key with your private key (its .pub beside it)")
    own = public_key_of(key, name)
    if deploy_keys and own not in {" ".join(k.split()[:2]) for k in deploy_keys}:
        raise ProvisionError(f"the key {key} is not among app.deploy_keys, which the droplet's {user} gets: provision "
                             f"could not log in; add {key}.pub to deploy_keys, or pass --key with one of them")
    keys = deploy_keys or (own,)
    existing = prov.get(name)  # the provider's first question: after everything decided here
    if existing is not None:
        raise ProvisionError(f"{kind} already has a droplet {name!r} ({existing.address or existing.id}); pick another "
                             f"--name, or remove it first: fab droplet.destroy --provider {kind} --name {name}")
    host_key = None
    if prov.generates_host_key:
        from ..providers.digitalocean import new_host_key

        host_key = new_host_key()
    spec = Spec(name=name, user_data=plan.user_data(user, keys, host_key), size=size, region=region, image=image,
                host_keys=(" ".join(host_key[1].split()[:2]),) if host_key else ())
    wait = wait or (60.0 if kind == "sandbox" else 300.0)

    t0 = time.monotonic()
    printer.line(f"{name}: creating at {kind}" + "".join(f", {k} {v}" for k, v in (
        ("size", size or prov.defaults.get("size")), ("region", region or prov.defaults.get("region")),
        ("image", image or prov.defaults.get("image"))) if v))
    order = Order(prov, spec, user, key, known_hosts or prov.default_known_hosts, replace, inv, wait)
    d = None
    try:
        d = prov.create(spec)
        _make_ready(c, order, d, printer, t0, bootstrap)
    except ProvisionError as e:
        if d is None:  # the provider's own line says whether a droplet may exist all the same
            raise
        # the droplet exists (and costs): say how to remove it
        raise ProvisionError(f"{e} (droplet {name}, id {d.id}, exists at {kind}: remove it with `fab droplet.destroy "
                             f"--provider {kind} --name {name} --yes`)", e.code) from None
    except BaseException:  # Ctrl-C, an OS error, a bug: said before it goes on up
        if d is not None:
            print(f"{name}: droplet {name}, id {d.id}, exists at {kind}: remove it with `fab droplet.destroy --provider "
                  f"{kind} --name {name} --yes`", file=sys.stderr)
        else:
            print(f"{name}: a droplet {name} may have been created at {kind}: fab droplet.list --provider {kind}",
                  file=sys.stderr)
        raise


@dataclass(frozen=True)
class Order:
    """What droplet.create decided before the provider created the droplet."""

    prov: Provider
    spec: Spec
    user: str  # the deploy user
    key: str  # the private key it logs in with
    known_hosts: str
    replace: bool
    inventory: Path
    wait: float  # seconds


def _make_ready(c, o: Order, d: Droplet, printer: Printer, t0: float, bootstrap: bool) -> None:
    """The droplet ready for deploys: its address, its host keys recorded, its inventory line, a login as
    the deploy user with sudo; then, with ``bootstrap``, fab bootstrap."""
    prov, spec, user, key, kh, inv, wait = o.prov, o.spec, o.user, o.key, o.known_hosts, o.inventory, o.wait
    name, kind = spec.name, prov.name
    d = prov.wait_ready(d, wait)
    if not d.address:
        raise ProvisionError(f"{name}: {kind} reported no address for droplet {d.id}", code=1)
    host_keys = spec.host_keys or d.host_keys
    if not host_keys:
        raise ProvisionError(f"{name}: {kind} reports no host key for {d.address}; connect once with "
                             f"`fab -H {name} check --accept-new-host-key` after checking its fingerprint on the "
                             "provider's console", code=1)
    kh_path = Path(os.path.expanduser(kh))
    if not prov.records_host_keys(kh):  # the sandbox records its own file itself, under its lock
        _edit(kh_path, lambda text: plan.record_keys(text, d.address, host_keys))
    default = Path(os.path.expanduser(DEFAULT_KNOWN_HOSTS))
    if os.path.realpath(default) != os.path.realpath(kh_path) and plan.names_address(_read(default), d.address):
        # provision (like OpenSSH) reads ~/.ssh/known_hosts first: a stale key for this address there would win
        _edit(default, lambda text: plan.forget_keys(text, d.address))
        printer.line(f"{name}: removed {d.address}'s old key from {DEFAULT_KNOWN_HOSTS} (the provider gave the address "
                     f"to this new droplet, whose key is in {kh})")
    printer.line(f"{name}: {d.address}, host key recorded in {kh} ({', '.join(k.split()[0] for k in host_keys)}); "
                 f"waiting for {user} to log in")
    line = plan.host_line(name, d.address, user, key, None if kh == DEFAULT_KNOWN_HOSTS else kh, kind, d.id,
                          d.inventory_vars)
    _edit(inv, lambda text: plan.add_host(text, line, name, o.replace, d.address))
    ready = wait_login(d.address, user, key, str(kh_path), name, wait)
    if spec.host_keys:  # given in the user data, which the droplet's processes can read: replaced now
        replace_host_key(d.address, user, key, kh_path, name)
        printer.line(f"{name}: host key replaced over the checked connection (the user data's is no longer trusted)")
    total = time.monotonic() - t0
    printer.line(f"{name}: ready in {total:.1f}s (login as {user} with sudo {ready:.1f}s of it); added to {inv.name}: "
                 f"fab -H {name} deploy")
    if bootstrap:
        sel = Selection(config=c.config, hosts=(name,), project=project(c))
        run_bootstrap(sel)
        printer.line(f"{name}: created and bootstrapped in {time.monotonic() - t0:.1f}s")


@guarded
def list_droplets(c, provider: str | None) -> None:
    recorded = plan.recorded_providers(_read(inventory_file(c)))
    kind = plan.choose_provider(provider, recorded[0] if len(recorded) == 1 else None)
    rows = load(kind).list()
    if not rows:
        print(f"no droplets at {kind}")
        return
    print(f"{'NAME':<20} {'ADDRESS':<16} {'STATUS':<9} {'SIZE':<14} {'REGION':<8} ID")
    for d in rows:
        print(f"{d.name:<20} {d.address or '-':<16} {d.status:<9} {d.size or '-':<14} {d.region or '-':<8} {d.id}")


@guarded
def destroy_droplet(c, name: str, provider: str | None, yes: bool = False) -> None:
    if not name:
        raise ProvisionError("name the droplet: fab droplet.destroy --name web1")
    inv = inventory_file(c)
    text = _read(inv)
    found = plan.find_host(text, name)
    if found is not None and found.provider is None:  # a line written by hand: not droplet.create's to remove
        raise ProvisionError(f"{inv.name}'s host {name!r} has no `{plan.MARK}` comment: droplet.destroy removes only "
                             "droplets it created; destroy that machine at its provider and edit the line by hand")
    if found is not None and provider and provider.strip().lower() != found.provider:
        raise ProvisionError(f"{inv.name} records {name!r} as made at {found.provider}, not {provider}; pass "
                             f"--provider {found.provider} (or none)")
    kind = plan.choose_provider(provider, found.provider if found else None)
    rule = plan.confirm_rule(yes, sys.stdin.isatty() and sys.stdout.isatty())
    if rule == "refuse":
        raise ProvisionError(f"droplet.destroy asks before destroying {name}, and there is no terminal to ask on; "
                             "pass --yes to destroy it without asking")
    prov = load(kind)
    if found is not None and found.droplet_id:  # the line records which droplet is ours: that one, by its id
        d = prov.get_by_id(found.droplet_id)
    else:  # no line (or one without an id): by name
        d = prov.get(name)
    if d is not None and found is not None and (d.name != name or (found.host and d.address != found.host)):
        raise ProvisionError(f"{kind}'s droplet {d.id} is {d.name} at {d.address or 'no address'}, but {inv.name} has "
                             f"{name} at {found.host}: not destroyed; check `fab droplet.list --provider {kind}`")
    if d is None and found is None:
        raise ProvisionError(f"no droplet {name!r} at {kind} and none in {inv.name}; `fab droplet.list --provider "
                             f"{kind}` shows the droplets")
    what = (f"droplet {name} at {kind} ({d.address or d.id})" if d else f"{name} (gone from {kind} already)") + \
        (f" and its line in {inv.name}" if found else "")
    if rule == "ask":
        try:
            answer = input(f"Destroy {what}? Type the droplet's name to confirm: ")
        except EOFError:  # Ctrl-D: no answer is not a yes
            answer = ""
            print()
        if not plan.confirmed(answer, name):
            raise Exit(f"{name}: not destroyed", code=1)
    if d is not None:
        prov.destroy(d)
    if found is not None:
        kh = next((w.partition("=")[2] for w in text.splitlines()[found.index].split() if w.startswith("known_hosts=")),
                  DEFAULT_KNOWN_HOSTS)
        _edit(inv, lambda text: plan.remove_host(text, name))
        kh_path = Path(os.path.expanduser(kh))
        if found.host and not prov.records_host_keys(kh) and kh_path.exists():  # the sandbox forgets its own
            _edit(kh_path, lambda text: plan.forget_keys(text, found.host, (found.port,)))
    print(f"{name}: destroyed" + (f"; removed from {inv.name}" if found else ""))
