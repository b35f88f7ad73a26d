"""HTTPS for the app's site (``app.tls``): a certificate from an ACME CA, got and renewed by Debian's
certbot over HTTP-01, served by nginx; visitors' HTTP redirected to HTTPS.

The first deploy does it all in one script, decided from one fact (the certificate, read on the
host: its names, its CA): while there is no certificate, the site is written without HTTPS (it
serves the CA's challenges from root's webroot), nginx reloads, certbot gets the certificate, then
the site with HTTPS is written, tested and nginx reloads again. Once the certificate covers
``server_name`` and comes from ``acme_directory``, a deploy never runs certbot: certbot.timer
renews it, and the deploy hook reloads nginx gracefully (``nginx -t`` first).

certbot reaches the CA like apt and pip: through ``proxy`` when there is one (the deploy's script
has it; certbot.service gets it from a drop-in reading a file only root can read), trusting the
system's CAs (Debian's python3-certifi is ``/etc/ssl/certs/ca-certificates.crt``), so ``ca_bundle``
applies too.
"""

from __future__ import annotations

import copy
import json
import shlex

from .config import Settings
from .facts import Fact
from .layout import (ACME_WEBROOT, CERTBOT_DROPIN, CERTBOT_HOOKS, CERTBOT_PROXY_ENV, CERTBOT_RELOAD_HOOK,
                     CERTBOT_UNIT, PROVISION_VAR, Layout)
from .nginx import NGINX_CHECK, Site, nginx_tested
from .steps import Absent, Change, Command, Directory, File, Service, Step, _heredoc_write, drained

q = shlex.quote
PACKAGES = ("certbot",)
RELOAD_HOOK = b"""#!/bin/sh
# Managed by provision: certbot runs this after it renews a certificate; nginx reloads gracefully
# (its old workers finish their requests) and only with a configuration it accepts.
nginx -t -q && exec systemctl reload nginx
"""


def certificate_fact(lay: Layout) -> Fact:
    return ("certificate", json.dumps([lay.certificate, lay.renewal_conf]))


def certificate(facts, lay: Layout) -> dict | None:
    """The app's certificate on the host: {names, not_after (epoch), server (its CA's directory)}, or None."""
    return facts[certificate_fact(lay)]


def names(s: Settings) -> list[str]:
    """The names the certificate covers: server_name's, the first naming the certificate."""
    return list(dict.fromkeys(n.lower() for n in s.server_name.split()))


def nginx_reload(lay: Layout) -> list[str]:
    """nginx -t, then a graceful reload that returns once the old workers are gone."""
    return [NGINX_CHECK, drained("nginx", "reload", lay.nginx_pid)]


class TlsSite(Site):
    """The site while its certificate may not exist yet: with it, the site with HTTPS; without it,
    ``bootstrap`` (HTTP only, serving the ACME challenges), which :class:`HttpsSite` replaces once
    :class:`Certificate` has got it."""

    def __init__(self, layout: Layout, content: bytes, bootstrap: bytes):
        super().__init__(layout, content)
        self.layout, self.bootstrap = layout, bootstrap

    def facts(self):
        return super().facts() + [certificate_fact(self.layout)]

    def chosen(self, facts) -> Site:
        if certificate(facts, self.layout):
            return self
        out = copy.copy(self)
        out.content = self.bootstrap
        return out

    def plan(self, facts, notified):
        return Site.plan(self.chosen(facts), facts, notified)

    def show_diff(self, facts, more):
        return Site.show_diff(self.chosen(facts), facts, more)


class Certificate(Step):
    """certbot gets the certificate when the host has none for these names from this CA. A
    certificate that replaces one (other names, another CA) is loaded by a graceful reload."""

    def __init__(self, s: Settings):
        self.lay, self.names, self.directory, self.email = s.layout, names(s), s.acme_directory, s.acme_email

    @property
    def name(self):
        return f"certificate {self.names[0]}"

    def facts(self):
        return [certificate_fact(self.lay)]

    def command(self) -> str:
        contact = (f"--email {q(self.email)} --no-eff-email" if self.email else "--register-unsafely-without-email")
        return (f"certbot certonly --non-interactive --agree-tos {contact} --server {q(self.directory)} "
                f"--webroot --webroot-path {q(ACME_WEBROOT)} --cert-name {q(self.lay.cert_name)} "
                f"--domains {q(','.join(self.names))} --force-renewal")

    def plan(self, facts, notified):
        have = certificate(facts, self.lay)
        if have and sorted(have["names"]) == sorted(self.names) and have["server"] == self.directory:
            return None
        if have is None:
            return Change([self.command()], summary=f"get from {self.directory} for {', '.join(self.names)}")
        why = "other names" if sorted(have["names"]) != sorted(self.names) else "another CA"
        return Change([self.command(), *nginx_reload(self.lay)], summary=f"replace ({why}) for {', '.join(self.names)}")


class HttpsSite(Site):
    """The site with HTTPS, written once :class:`Certificate` got the first certificate in this
    run (:class:`TlsSite` wrote it already when the certificate was there), tested and loaded."""

    def __init__(self, layout: Layout, content: bytes):
        super().__init__(layout, content)
        self.layout = layout

    @property
    def name(self):
        return f"https {self.path}"

    def facts(self):
        return [certificate_fact(self.layout)]

    def plan(self, facts, notified):
        if certificate(facts, self.layout):
            return None
        write = _heredoc_write(self.path, self.content)
        return Change(nginx_tested(write, [self.path], self.backup) + nginx_reload(self.layout), summary="enable")

    def diff_facts(self, facts):
        return []

    def show_diff(self, facts, more):
        return ""


def machine_steps(s: Settings, proxy_vars: dict[str, str]) -> list[Step]:
    """What HTTPS needs before the site: root's webroot for the challenges, the renewals' hook
    and proxy (``proxy_vars``: the deploy's own), and certbot.timer."""
    steps: list[Step] = [
        Directory(PROVISION_VAR, owner="root", group="root", mode=0o755),
        Directory(ACME_WEBROOT, owner="root", group="root", mode=0o755),
        Directory(CERTBOT_HOOKS, owner="root", group="root", mode=0o755),
        File(CERTBOT_RELOAD_HOOK, RELOAD_HOOK, mode=0o755),
    ]
    if proxy_vars:
        env = "".join(f"{k}={v}\n" for k, v in proxy_vars.items())
        steps += [
            File(CERTBOT_PROXY_ENV, env.encode(), mode=0o600, sensitive=True),
            Directory(CERTBOT_DROPIN.rsplit("/", 1)[0], owner="root", group="root", mode=0o755),
            File(CERTBOT_DROPIN, (f"# Managed by provision: certbot's renewals reach the CA through app.proxy.\n"
                                  f"[Service]\nEnvironmentFile={CERTBOT_PROXY_ENV}\n").encode(),
                 notify=("certbot-unit",)),
        ]
    else:
        steps += [Absent(CERTBOT_DROPIN, notify=("certbot-unit",)), Absent(CERTBOT_PROXY_ENV)]
    steps += [
        Command("systemctl daemon-reload (certbot)", ("systemctl daemon-reload",), when=("certbot-unit",)),
        Service(CERTBOT_UNIT.replace(".service", ".timer")),
    ]
    return steps


def site_steps(s: Settings, site: bytes, bootstrap: bytes) -> tuple[list[Step], list[Step]]:
    """The site (with or without HTTPS, as the certificate's fact says), and what follows nginx's
    reload: the certificate, then the site with HTTPS when the certificate is new."""
    lay = s.layout
    return [TlsSite(lay, site, bootstrap)], [Certificate(s), HttpsSite(lay, site)]
