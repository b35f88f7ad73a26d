"""The desired state of a host serving one WSGI app, as a list of steps.

``provision_steps`` is the machine (proxy, CA, packages, user, layout); :class:`Deploy`
adds the release, its virtualenv, the rendered configs, the services and the final health
check; :class:`Rollback` switches back.  Pure: settings, source and facts in, steps out.
"""

from __future__ import annotations

import base64
import copy
import json
import shlex

from . import appenv, containernet, monitor, remote, secrets, tls
from .config import DOCKERFILE, Settings
from .layout import (SLOTS, APT_PROXY_CONF, ENVIRONMENT, EXTRA_CA, NGINX_DEFAULT_SITE, NGINX_LOCAL, PIP_WHEELS,
                     PROVISION_VAR, RELEASE_DIR, RELEASE_ENV, SYSTEM_CA_BUNDLE, SYSTEMD_DIR, UPSTREAM_HEADER)
from .errors import ProvisionError
from .leftovers import data_fact, data_warning
from .nginx import NGINX_CHECK, Site
from .processes import unit_steps, unserved_static
from .source import Source
from .release import (Prune, Release, StopIdle, Switch, current_release, host_header, live_meta, live_slot, meta_path,
                      rollback_facts, rollback_target, slot_facts, slot_release)
from .steps import (Absent, Change, Command, Directory, File, HttpCheck, Lines, Packages, Placeholder, Recipe,
                    RootsOnly, Service, Step, User)
from .render import render

q = shlex.quote
BASE_PACKAGES = ("python3-venv", "python3-pip-whl", "nginx")
# A container app's host: nginx and the engine (docker.io brings containerd, runc and tini; podman's
# --init is catatonit, its networks need iptables, runc where crun cannot run); no virtualenv.
ENGINE_PACKAGES = {"docker": ("docker.io",), "podman": ("podman", "runc", "catatonit", "iptables")}
ENGINE_PROXY_DROPIN = f"{SYSTEMD_DIR}/docker.service.d/provision-proxy.conf"  # dockerd pulls through app.proxy
ENGINE_PROXY_ENV = f"{SYSTEMD_DIR}/docker.service.d/provision-proxy.env"  # root's alone: may hold a password
ENGINE_PROXY_CLAIMS = f"{PROVISION_VAR}/docker-proxy"  # an empty file per app that wants the drop-in
# dockerd reads a changed drop-in when it restarts; only one running is restarted: before the deploy
# installs docker (a fresh host) there is no docker.service yet, and the install starts it with the drop-in
ENGINE_RELOAD = ("systemctl daemon-reload",
                 "if systemctl is-active --quiet docker.service; then systemctl restart docker.service; fi")
NO_PROXY = "localhost,127.0.0.1,::1"  # the health checks talk to nginx on the host itself


def proxy_vars(s: Settings) -> dict[str, str]:
    """The environment that sends downloads (apt, pip, certbot) through app.proxy, none without one."""
    if not s.proxy:
        return {}
    return dict(http_proxy=s.proxy, https_proxy=s.proxy, HTTP_PROXY=s.proxy, HTTPS_PROXY=s.proxy, no_proxy=NO_PROXY)


def proxy_env(s: Settings) -> dict[str, str]:
    env = proxy_vars(s)
    if s.ca_bundle:
        env.update(PIP_CERT=SYSTEM_CA_BUNDLE)
    return env


def provision_steps(s: Settings) -> list[Step]:
    """The machine alone (`fab provision`)."""
    return trust_steps(s) + [Packages(packages(s))] + layout_steps(s)


def packages(s: Settings) -> tuple[str, ...]:
    base = ("nginx",) + ENGINE_PACKAGES[s.engine] if s.container else BASE_PACKAGES
    return tuple(dict.fromkeys(base + (tls.PACKAGES if s.tls else ()) + s.packages))


def trust_steps(s: Settings) -> list[Step]:
    """Proxy and extra CA: everything later that downloads depends on them."""
    steps: list[Step] = []
    if s.proxy:
        credentials = "@" in s.proxy  # then only root may read it: never in a world-readable file
        steps.append(File(APT_PROXY_CONF,
                          f'Acquire::http::Proxy "{s.proxy}";\nAcquire::https::Proxy "{s.proxy}";\n'.encode(),
                          mode=0o640 if credentials else 0o644, sensitive=True))
        # For logins on the host (provision's own commands get it from the script); with
        # credentials, taken out of there (where older versions wrote them).
        proxy = None if credentials else s.proxy
        steps.append(Lines(ENVIRONMENT, (("http_proxy", proxy), ("https_proxy", proxy), ("no_proxy", NO_PROXY)),
                           sensitive=True))  # its old content may hold an old password
    if s.ca_bundle:
        steps.append(File(EXTRA_CA, s.ca_bundle.read_bytes(), notify=("ca",)))
        # In the background: apt sources are plain http by default; the venv (pip, https) waits.
        steps.append(Command("update-ca-certificates", ("update-ca-certificates >/dev/null",), when=("ca",),
                             background=True))
    return steps


def layout_steps(s: Settings) -> list[Step]:
    """The app's tree under /srv/<name>. Root owns everything the app runs and root reads (code,
    virtualenvs, configs, links, the release log); the app user writes only its data: the
    ``linked_dirs`` under shared/. ``.env`` is root's, readable by the app's group."""
    lay = s.layout
    steps: list[Step] = [
        RootsOnly(lay.tree, hint=f"move it aside as root (mv {lay.root} {lay.root}.old), deploy again, then copy "
                                 f"your data from {lay.root}.old/shared/ into {lay.shared}/ after checking it"),
        User(s.user, home=lay.root)]
    steps += [Directory(d, owner="root", group="root", mode=0o755) for d in lay.tree]
    for d in s.linked_dirs:
        steps.append(Directory(lay.data_dir(d), owner=s.user, group=s.user, mode=0o755, keep_root_links=True))
    for f in s.linked_files:
        steps.append(Placeholder(f"{lay.shared}/{f}", owner="root", group=s.user, mode=0o640))
    return steps


def venv_key(s: Settings) -> str:
    return f"container-{s.engine}" if s.container else s.dependencies.key(s.python)


def venv_step(s: Settings, key: str) -> Command:
    """Built by root, owned by root: the app runs it, cannot change it. The requirements files go
    along at their paths in the source (pip finds -r/-c includes relative to the including file),
    in a folder only root can read (an index URL in them may hold a password)."""
    path, deps = s.layout.venv(key), s.dependencies
    reqs = s.layout.venv_requirements(key)
    # Debian ships pip as a wheel (python3-pip-whl); running it from there into a --without-pip
    # venv skips ensurepip (about 3 s of a fresh deploy) and needs no other package.
    cmds = [
        f"rm -rf {q(path)}",
        f"pip_whl=$(ls {PIP_WHEELS} 2>/dev/null | tail -n 1)",
        f'if [ -n "$pip_whl" ]; then {q(s.python)} -m venv --without-pip {q(path)}; '
        f'pip="{q(path)}/bin/python $pip_whl/pip"; '
        f'else {q(s.python)} -m venv {q(path)}; pip="{q(path)}/bin/pip"; fi',
        f"mkdir -m 700 {q(reqs)}",
    ]
    for rel, data in deps.files:
        target = q(f"{reqs}/{rel}")
        cmds.append(f'mkdir -p "$(dirname {target})" && base64 -d > {target} <<\'__PROVISION_EOF__\'\n'
                    f"{base64.encodebytes(data).decode()}__PROVISION_EOF__")
    cmds += [
        f"$pip install --quiet --disable-pip-version-check --no-input "
        f"-r {q(reqs + '/' + deps.main)}" + "".join(f" {q(a)}" for a in deps.added),
        f"chmod -R go-w {q(path)}",
        f"touch {q(s.layout.venv_complete(key))}",
    ]
    return Command(f"virtualenv {key}", tuple(cmds), creates=s.layout.venv_complete(key), background=True,
                   barrier=True)


def socket_unit(s: Settings) -> bytes:
    """Each slot's listening socket, made by systemd as root: only nginx (www-data) may connect."""
    return (f"# Managed by provision: changes here are overwritten on the next deploy.\n"
            f"[Unit]\nDescription={s.name} socket (slot %i)\n\n"
            f"[Socket]\nListenStream={s.layout.socket('%i')}\nSocketUser=root\nSocketGroup=www-data\nSocketMode=0660\n"
            f"DirectoryMode=0755\n\n[Install]\nWantedBy=sockets.target\n").encode()


def rendered(s: Settings, template: str, https: bool | None = None) -> bytes:
    """A template rendered for the host. What it renders is readable by every local user (units,
    the nginx site, the release's configs), so no secret may end up in it. ``https``: whether the
    site serves HTTPS (app.tls and its certificate on the host: see provision.tls)."""
    text = render(s.templates, template, {**s.template_vars(), **({} if https is None else {"https": https})})
    if secrets.holds_secret(text):
        raise ProvisionError(f"template {template} renders a secret (a var_* setting named like a password, "
                             "token or key) into a file every user on the host can read; give the app secrets "
                             "through shared/.env instead")
    return text.encode()


def container_configs(s: Settings) -> dict[str, bytes]:
    """What a container app's release runs its image with (remote/container_run.py): the same in
    every release of the same settings, so a release with nothing new is no new release."""
    lay = s.layout
    settings = {"engine": s.engine, "name": s.name, "user": s.user, "port": s.port, "repo": lay.image_repo, "run_dir": lay.socket_dir,
                "slot_ports": {slot: lay.slot_port(slot) for slot in SLOTS}, "init": True,
                "slot_containers": {slot: lay.container_name(slot) for slot in SLOTS},
                "process_containers": lay.process_container(""), "graceful_timeout": s.graceful_timeout,
                "env_files": [RELEASE_ENV, lay.secrets_file, lay.env_file], "image": s.image, "slice": lay.container_slice,
                "network": containernet.network(s)}  # every container of the app runs on the app's own network
    return {"unit": rendered(s, "container@.service.j2"),
            "container.json": json.dumps(settings, indent=1, sort_keys=True).encode() + b"\n",
            "container-run.py": remote.source("container_run.py").encode()}


def systemd_quoted(value: str) -> str:
    """``value`` as systemd's EnvironmentFile= reads it back: in double quotes, with a backslash before
    each of the characters that are special there (\\ " ` $). A newline cannot be written so."""
    if "\n" in value or "\r" in value:
        raise ProvisionError("a value with a line break cannot go into a systemd environment file")
    return '"' + "".join("\\" + c if c in '\\"`$' else c for c in value) + '"'


def docker_proxy(s: Settings) -> bool:
    """This app's settings give docker's daemon its proxy: a docker app with app.proxy."""
    return s.container and s.engine == "docker" and bool(s.proxy)


def engine_steps(s: Settings) -> list[Step]:
    """docker's daemon pulls images: it gets app.proxy from a drop-in (its value in a root-only file)
    and restarts when it changes (podman pulls in the deploy's own environment). The drop-in is the
    host's, not the app's: each app that wants it claims it (an empty file named after the app in
    ENGINE_PROXY_CLAIMS); an app that no longer does takes its claim back, and the drop-in goes with
    the last claim (see :class:`DockerProxyDropped`)."""
    if not docker_proxy(s):
        return [DockerProxyDropped(s.name, restart=s.container and s.engine == "docker")]
    env = "".join(f"{k}={systemd_quoted(v)}\n" for k, v in sorted(proxy_vars(s).items()))
    return [Directory(PROVISION_VAR, owner="root", group="root", mode=0o755),
            Directory(ENGINE_PROXY_CLAIMS, owner="root", group="root", mode=0o755),
            File(f"{ENGINE_PROXY_CLAIMS}/{s.name}", b""),
            Directory(ENGINE_PROXY_DROPIN.rsplit("/", 1)[0], owner="root", group="root", mode=0o755),
            File(ENGINE_PROXY_DROPIN, f"[Service]\nEnvironmentFile={ENGINE_PROXY_ENV}\n".encode(), notify=("engine",)),
            File(ENGINE_PROXY_ENV, env.encode(), mode=0o600, sensitive=True, notify=("engine",)),
            Command("docker proxy", ENGINE_RELOAD, when=("engine",))]


class DockerProxyDropped(Step):
    """This app no longer gives docker its proxy (app.proxy unset, engine podman, or no container
    app any more): its claim goes, and the drop-in with the last claim. A drop-in no app claims (an
    older provision's) goes too, but only on a docker app's deploy: then this app's settings are the
    ones docker runs with. docker is restarted for a docker app (its next pulls go direct); for the
    others docker, unused by them, reads the change when it next restarts (no restart of another
    app's containers for nothing)."""

    def __init__(self, app: str, restart: bool):
        self.app, self.restart = app, restart

    @property
    def name(self):
        return f"docker proxy of {self.app}"

    def facts(self):
        return [("ls", ENGINE_PROXY_CLAIMS), ("file", ENGINE_PROXY_DROPIN), ("file", ENGINE_PROXY_ENV)]

    def plan(self, facts, notified):
        claims = facts.ls(ENGINE_PROXY_CLAIMS)
        mine = self.app in (claims or [])
        cmds = [f"rm -f {q(f'{ENGINE_PROXY_CLAIMS}/{self.app}')}"] if mine else []
        present = [p for p in (ENGINE_PROXY_DROPIN, ENGINE_PROXY_ENV) if facts.file(p) is not None]
        remove = bool(present) and not set(claims or []) - {self.app} and (mine or self.restart)
        if remove:
            cmds += [f"rm -f {' '.join(map(q, present))}", *(ENGINE_RELOAD if self.restart else ENGINE_RELOAD[:1])]
        if not cmds:
            return None
        return Change(cmds, summary="remove the drop-in" if remove else "drop the claim (other apps keep the drop-in)")


def container_kind(venv: str | None) -> str | None:
    """The engine of a release whose meta says ``venv`` (its venv key): "container-<engine>" for a
    container release; None for a virtualenv release."""
    return venv.split("-", 1)[1] if venv and venv.startswith("container-") else None


# In a loop over engines ($e): skip one not installed, and docker when its daemon is not running (asking
# it would start it through docker.socket, on every deploy of every app of the host)
ENGINE_THERE = ("command -v $e >/dev/null || continue; "
                "[ $e != docker ] || systemctl is-active -q docker.service || continue")


class KindLeftovers(Step):
    """What the other kind of app left once its traffic moved (app.container switched, or the
    engine changed): a virtualenv app's socket units on a container app's host, and a container
    app's images on a virtualenv app's host (or in the engine it no longer uses), its last
    container stopped first (its stop began at the switch: gracefully, so this waits for it). Only
    once the live release is of the app's kind now (this run's switch, or an earlier one): never
    what still serves. Images in use elsewhere (a `fab run`) stay, and go on a later deploy. The
    old kind's releases (and virtualenvs) go with pruning; a rollback to them is refused."""

    def __init__(self, s: Settings):
        self.s = s
        lay = s.layout
        self.engines = [e for e in ENGINE_PACKAGES if not (s.container and e == s.engine)]
        self.sockets = [lay.socket_unit_file, *(f"{lay.sockets_wants}/{lay.unit(slot)}.socket" for slot in SLOTS)]
        repo = q(lay.image_repo)
        # exit 1: an engine it no longer uses holds images of the app
        self.probe = (f"for e in {' '.join(self.engines)}; do {ENGINE_THERE}; "
                      f'[ -z "$($e images -q {repo} 2>/dev/null)" ] || exit 1; done')

    @property
    def name(self):
        return f"leftovers of {self.s.name}"

    def facts(self):
        s = self.s
        return [("content", meta_path(s)), ("file", f"{s.layout.current}/{RELEASE_DIR}"),
                ("content", s.layout.upstream_file), ("command", self.probe),
                *(("file", p) for p in self.sockets if s.container)]

    def plan(self, facts, notified):
        s, lay = self.s, self.s.layout
        switched = "switched" in notified
        if not switched and container_kind(live_meta(s, facts).get("venv")) != (s.engine if s.container else None):
            return None  # the other kind still serves (a fleet's commit keeps it until the transaction ends)
        cmds = []
        if s.container and any(facts.file(p) for p in self.sockets):
            units = " ".join(q(f"{lay.unit(slot)}.socket") for slot in SLOTS)
            cmds += [f"systemctl stop {units} || true", f"rm -f {' '.join(map(q, self.sockets))}",
                     "systemctl daemon-reload"]
        if facts.command(self.probe) != 0:
            live = live_slot(s, facts)  # before this run
            idle = live if switched else next((slot for slot in SLOTS if live and slot != live), None)
            cmds += [f"systemctl stop {q(lay.unit(idle) + '.service')}"] if idle else []
            repo = q(lay.image_repo)
            # the app's containers in that engine first (a `fab run` left there would hold its image: every
            # later deploy would try again), then its images
            cmds.append(f"for e in {' '.join(self.engines)}; do {ENGINE_THERE}; "
                        f"$e ps -aq --filter label=provision.app={q(s.name)} | xargs -r $e rm -f >/dev/null 2>&1; "
                        f"for t in $($e images --format '{{{{.Tag}}}}' {repo}); do "
                        f'$e rmi {repo}:"$t" >/dev/null 2>&1 || true; done; done')
        return Change(cmds, summary="remove") if cmds else None


PROXY_BUILD_ARGS = ("http_proxy", "https_proxy", "no_proxy")  # what a build gets of app.proxy


def declared_args(dockerfile: str) -> set[str]:
    """The build arguments a Dockerfile's ARG instructions declare."""
    names = set()
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = line.split()
        if words and words[0].upper() == "ARG":
            names |= {w.split("=", 1)[0] for w in words[1:]}
    return names


def check_build_args(s: Settings, source: Source) -> None:
    """docker passes the proxy's build arguments to RUN steps and keeps them out of the image's history,
    unless the Dockerfile declares them (ARG http_proxy): then `docker history` shows each RUN step's
    value, a proxy's password with it. Refused, in one line, when the proxy has one."""
    if not s.container or s.image or "@" not in s.proxy or DOCKERFILE not in source.files:
        return
    leaked = sorted(declared_args(source.path(DOCKERFILE).read_text(errors="replace")) & set(PROXY_BUILD_ARGS[:2]))
    if leaked:
        raise ProvisionError(f"the Dockerfile declares ARG {leaked[0]}: the image's history (docker history) would "
                             "keep app.proxy with its password; remove that ARG line (RUN steps get the proxy "
                             "without it)")


def image_step(s: Settings, target: str | None) -> Command:
    """The new release's image, tagged with its id (a rollback runs it again, no rebuild): built on the
    host from the release's Dockerfile, the proxy and extra CA given as build arguments (the proxy's
    from the deploy's environment, never on a command line; Docker leaves them out of the image's
    history unless the Dockerfile declares them: see check_build_args), or pulled (app.image) and tagged. Only when this deploy made a release."""
    lay, image = s.layout, s.layout.image(target or "none")
    if s.image:
        # the registry's tag goes once the release's is on: the release's tag alone holds the image, and
        # pruning the release (rmi of that tag) frees it; unless the host had that tag before the pull
        # (another app's, the admin's): then it stays theirs
        ref = q(s.image)
        cmds = [f"had=$({s.engine} image inspect -f '{{{{.Id}}}}' {ref} 2>/dev/null || true)",
                f"{s.engine} pull -q {ref} >/dev/null", f"{s.engine} tag {ref} {q(image)}",
                f'[ -n "$had" ] || {s.engine} rmi {ref} >/dev/null']
    else:
        args = "".join(f" --build-arg {k}" for k in PROXY_BUILD_ARGS if s.proxy)
        if s.ca_bundle:
            args += f' --build-arg PROVISION_CA_BUNDLE="$(cat {EXTRA_CA})"'
        cmds = [f"{s.engine} build -q{args} -t {q(image)} {q(lay.release(target or 'none'))} >/dev/null"]
    return Command(f"image {image}", tuple(cmds), when=("code",), barrier=True)


class Deploy(Recipe):
    """The whole deploy: the machine, a release of ``source`` (uploaded only when the live one
    differs), its virtualenv and configs, the switch, pruning, nginx, the final health check.

    Renders every template here, first: a template error stops the deploy before any step
    exists. The unit and the gunicorn config belong to the release: a refused release leaves the
    live one as it was."""

    def __init__(self, s: Settings, source: Source, release_id: str, deployer: str = "", origin: dict | None = None):
        self.s, self.deployer = s, deployer
        self.origin = origin or {}  # where the release comes from (commit, tests): in its meta and the release log
        key = venv_key(s)
        check_build_args(s, source)
        self.venv = None if s.container else venv_step(s, key)
        configs = container_configs(s) if s.container else {
            "unit": rendered(s, "app@.service.j2"), "gunicorn.conf.py": rendered(s, "gunicorn.conf.py.j2")}
        configs.update(release_configs(s))
        # with app.tls, the site serves HTTPS once the certificate exists; before, it serves the CA's challenges
        self.site = rendered(s, "nginx-site.conf.j2")
        self.bootstrap = rendered(s, "nginx-site.conf.j2", https=False) if s.tls else b""
        unserved_static(s, self.site.decode())
        self.app_unit = configs["unit"].decode()
        self.release = Release(s, source, release_id, key, configs, deployer, self.origin)
        self.fills = static_fills(s, source)

    def target_facts(self):
        return [*self.release.facts(), data_fact(self.s)]

    def target(self, facts):
        return self.release.target(facts)

    def notes(self, facts):
        return [w for w in (data_warning(self.s, facts),) if w]

    def resend_all(self):
        again = copy.copy(self)
        again.release = copy.copy(self.release)
        again.release.reuse = False
        return again

    def switch(self, target: str | None, stage: str = "all") -> Switch:
        return Switch(self.s, target, action="deploy", by=self.deployer, prove=proves_upstream(self.site), stage=stage,
                      log=self.origin)

    def leftovers(self, stage: str) -> list[Step]:
        """The other kind's leftovers, once traffic moved for good (a fleet's commit may still go back)."""
        return [] if stage in ("prepare", "commit") else [KindLeftovers(self.s)]

    def steps(self, target, stage: str = "all"):
        """Every step; ``stage`` is the switch's (see :class:`Switch`): ``prepare`` ends with it."""
        s, lay, prove = self.s, self.s.layout, proves_upstream(self.site)
        site_steps, after_reload = ([Site(lay, self.site)], []) if not s.tls else tls.site_steps(s, self.site, self.bootstrap)
        after = [] if stage == "prepare" else [
            Prune(s, target),
            *self.leftovers(stage),
            # Debian's welcome site is a default server too: gone before the app's site is enabled and tested
            Absent(f"{lay.sites_enabled}/{NGINX_DEFAULT_SITE}", notify=("nginx",), when=("packages",)),
            *site_steps,
            Service("nginx", reload_on=("nginx",), check=NGINX_CHECK, pidfile=lay.nginx_pid),
            *after_reload,
            # the health monitor (app.monitor): its first check comes app.monitor seconds after it starts
            *monitor.steps(s),
            health_check(s, prove),
        ]
        if s.container:
            # the engine (its proxy first, so a fresh install starts with it), the release, its image
            return trust_steps(s) + engine_steps(s) + [Packages(packages(s))] + layout_steps(s) + [
                *containernet.steps(s),  # the app's network, the host's rules that keep it to itself
                *(tls.machine_steps(s, proxy_vars(s)) if s.tls else ()),
                self.release,
                image_step(s, target),
                *release_phase(s, target, self.deployer, self.fills, self.app_unit),
                self.switch(target, stage),
            ] + ([] if stage == "prepare" else unit_steps(s, target, self.app_unit)) + after
        # The virtualenv builds in the background (all it needs is Debian's pip wheel) while
        # the other packages install and the release and configs are written; the switch waits.
        return trust_steps(s) + engine_steps(s) + [Packages(("python3-pip-whl",))] + layout_steps(s) + [
            self.venv,
            Packages(packages(s)),
            *(tls.machine_steps(s, proxy_vars(s)) if s.tls else ()),
            self.release,
            File(lay.socket_unit_file, socket_unit(s), notify=("unit", "socket")),
            # what older layouts kept and this one does not
            Absent(lay.legacy_unit_file, notify=("unit",)),
            *(Absent(path) for path in lay.legacy_files),
            *release_phase(s, target, self.deployer, self.fills, self.app_unit),
            self.switch(target, stage),
        ] + ([] if stage == "prepare" else [
            # processes and timers move to the new release once traffic has
            *unit_steps(s, target, self.app_unit)]) + after


class Prepare(Recipe):
    """A fleet transaction's first stage on a host (see provision/cli/apply.py): when traffic has
    to move, everything up to a new instance of the release healthy in the idle slot, traffic
    untouched; when it does not (nothing new, or a release already live), the whole deploy: there
    is nothing to coordinate. A host with nothing to do stays one round trip."""

    def __init__(self, deploy: Deploy):
        self.deploy = deploy

    def target_facts(self):
        return self.deploy.target_facts()

    def target(self, facts):
        target = self.deploy.target(facts)
        return target, self.deploy.switch(target).due(facts)

    def steps(self, target):
        if target is None:
            return self.deploy.steps(None)
        release, due = target
        return self.deploy.steps(release, "prepare" if due else "all")

    def notes(self, facts):
        return self.deploy.notes(facts)

    def resend_all(self):
        return Prepare(self.deploy.resend_all())


def prepares(planned) -> bool:
    """The stage planned was a prepare (traffic to move), not a whole deploy."""
    return any(isinstance(p.step, Switch) and p.step.stage == "prepare" for p in planned)


def switched(planned, done) -> bool:
    """Traffic moved in this run (the switch step of a commit completed)."""
    return any(isinstance(p.step, Switch) and p.change is not None and i in done for i, p in enumerate(planned))


class Commit(Recipe):
    """The second stage: on fresh facts, the prepared release goes live (the switch does not
    restart it), the old instance keeps running until the whole fleet has switched; then the
    rest of the deploy and its final health check."""

    def __init__(self, deploy: Deploy):
        self.deploy = deploy

    def target_facts(self):
        return self.deploy.target_facts()

    def target(self, facts):
        return self.deploy.target(facts)

    def steps(self, target):
        return self.deploy.steps(target, "commit")


class Settle(Recipe):
    """The last stage: only the live slot keeps running. Once every host switched, that stops
    the old release; when the fleet called the transaction off, the prepared one. Records
    ``live`` (the release that stays live) for the per-host line."""

    def __init__(self, s: Settings):
        self.s, self.live = s, None

    def target_facts(self):
        return [("file", self.s.layout.current)]

    def target(self, facts):
        self.live = current_release(self.s, facts)
        return self.live

    def steps(self, target):
        return [StopIdle(self.s)]


def release_configs(s: Settings) -> dict[str, bytes]:
    """What a release keeps besides its unit and gunicorn config: its plain environment and its
    release command (a change to either makes a new release)."""
    env = dict(s.env)
    if s.pythonpath:  # a src/ layout: importable in run, the release command and processes too (their
        env.setdefault("PYTHONPATH", s.pythonpath)  # working directory is the release)
    out = {RELEASE_ENV: appenv.env_file(env)}
    if s.release_command:
        out["release_command"] = s.release_command.encode() + b"\n"
    return out


def static_fills(s: Settings, source: Source) -> tuple[str, ...]:
    """The ``static`` directories the source does not ship: the release command may fill them
    (Django's collectstatic). Root makes them, so never through a link of the app (one could lead
    into a linked dir, the app's): refused in one line, before any host is touched."""
    fills = tuple(d for _, d in s.static if not any(f == d or f.startswith(d + "/") for f in source.files))
    for d in fills:
        parts = d.split("/")
        link = next(("/".join(parts[:i]) for i in range(1, len(parts) + 1) if "/".join(parts[:i]) in source.links),
                    None)
        if link:
            raise ProvisionError(f"app.static directory {d} lies behind the symlink {link} of the app; "
                                 "point app.static at the real directory")
    return fills


def release_phase(s: Settings, target: str | None, by: str, fills: tuple[str, ...], app_unit: str) -> list[Step]:
    """The release command, in a new release before it takes traffic, in the sandbox of ``app_unit``
    (the rendered web unit); it may write only ``fills`` and the app's data dirs."""
    if not s.release_command:
        return []
    return [appenv.ReleaseCommand(s.layout, s.user, s.release_command, target, app_unit, by, fills,
                                  container=s.container)]


class Rollback(Recipe):
    """Back to ``to``, or to the release live before the live one: the switch and the health check."""

    def __init__(self, s: Settings, to: str | None, by: str = ""):
        self.s, self.to, self.by = s, to, by
        self.prove = proves_upstream(rendered(s, "nginx-site.conf.j2"))
        self.app_unit = rendered(s, "container@.service.j2" if s.container else "app@.service.j2").decode()

    stage = "all"

    def target_facts(self):
        return rollback_facts(self.s)

    def target(self, facts):
        return rollback_target(self.s, facts, self.to)

    def steps(self, target):
        if target == NOWHERE:
            return []
        return [Switch(self.s, target, action="rollback", by=self.by, restart_on=(), prove=self.prove,
                       stage=self.stage),
                *unit_steps(self.s, target, self.app_unit), health_check(self.s, self.prove)]


class Revert(Rollback):
    """A host that switched in a fleet transaction the fleet called off goes back to the release
    its idle slot still runs (the commit kept it): no restart, traffic moves back at once, the
    release log says rollback. None when the idle slot runs nothing (a host's first release):
    then there is nothing to go back to. Records ``to`` for the per-host line."""

    stage = "revert"

    def target_facts(self):
        return [*rollback_facts(self.s), *slot_facts(self.s), *Switch(self.s, None).facts()]

    def target(self, facts):
        live = live_slot(self.s, facts)
        idle = [slot for slot in SLOTS if slot != live and (facts.service(self.s.layout.unit(slot)) or {}).get("active")]
        self.to = slot_release(self.s, facts, idle[0]) if idle else None
        return self.to or NOWHERE


NOWHERE = ""  # the target of a revert with nothing to go back to: no steps


def proves_upstream(site: bytes) -> bool:
    """The site tells the host which socket answered (the kit's template does; yours may not)."""
    return UPSTREAM_HEADER.encode() in site


def health_check(s: Settings, prove: bool) -> HttpCheck:
    """The end-to-end check: through nginx on the host, as a visitor would, answered by one of this
    app's slots (its socket, or its container's port: not nginx's welcome page, another app's site, nor
    another app's container or program on a local port)."""
    return HttpCheck(NGINX_LOCAL + s.health_path, host_header=host_header(s), timeout=s.health_timeout,
                     expect=(UPSTREAM_HEADER, tuple(s.layout.address(slot) for slot in SLOTS)) if prove else None)
