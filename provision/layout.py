"""The host layout: every path and name a deploy uses on a host, defined once.

The planner (steps), the remote programs (as data in their arguments), the templates (as
variables) and the checks (the ``app`` fixture) all take their paths from a :class:`Layout`.
Nothing else writes a host path.

Under ``/srv/<app>`` (root's, except the data dirs under ``shared/``)::

    releases/<id>/        code, .venv -> ../../venvs/<key>, linked files/dirs -> shared/
    releases/<id>/.provision/
                          release.json (metadata), manifest.json (each file's sha256),
                          unit, gunicorn.conf.py: what a slot runs
    venvs/<key>/          one virtualenv per distinct requirements
    shared/               .env (root's, app-readable), log/, uploads/ (the app's): kept across releases
    secrets.env           the app's secret environment (env.set): root's alone, systemd reads it for the app
    slots/{a,b}           -> ../releases/<id>: what each gunicorn instance runs
    current               -> releases/<id>: the live release
    releases.log          who deployed or rolled back what, when (one JSON object a line)

Elsewhere: the slots' units and sockets under /etc/systemd/system, the nginx site and its
upstream file (the one record of the live slot: nginx sends traffic where it says), and the
deploy lock and sockets under /run/provision (root's).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

SLOTS = ("a", "b")
SRV_DIR = "/srv"
TMP = ".provision-tmp"  # suffix of a path being written; renamed into place when complete
RELEASE_DIR = ".provision"  # inside each release: its metadata and the configs its slot runs
RELEASE_ENV = "env"  # in a release's own directory: the app's plain environment (app.env)
VENV = ".venv"  # inside each release: a link to its virtualenv
VENV_DIRNAME = "venvs"  # under the app's root: the virtualenvs
RUN_DIR = "/run/provision"  # root's: locks, holder files, the apps' socket dirs
SYSTEMD_DIR = "/etc/systemd/system"
BOOT_WANTS = "multi-user.target.wants"  # enabled at boot = a link here, as `systemctl enable` makes
SOCKETS_BOOT_WANTS = "sockets.target.wants"
TIMERS_BOOT_WANTS = "timers.target.wants"
NGINX_DIR = "/etc/nginx"
NGINX_PID = "/run/nginx.pid"
NGINX_DEFAULT_SITE = "default"  # Debian's welcome site
NGINX_LOCAL = "http://127.0.0.1"  # where provision's checks on the host reach nginx, as a visitor would
UPSTREAM_HEADER = "X-Provision-Upstream"  # the socket that answered, for requests from the host itself
CGROUP = "/sys/fs/cgroup"  # where a deploy's scope lists its processes
# The machine, shared by every app on it
APT_PROXY_CONF = "/etc/apt/apt.conf.d/80provision-proxy"
ENVIRONMENT = "/etc/environment"  # logins' environment (the proxy for people on the host)
EXTRA_CA = "/usr/local/share/ca-certificates/provision-ca.crt"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # update-ca-certificates makes it, with EXTRA_CA in it
# The machine made safe (fab bootstrap): provision/bootstrap.py
PROVISION_ETC = "/etc/provision"  # root's: what bootstrap keeps of its own
BOOTSTRAP_MARKER = f"{PROVISION_ETC}/bootstrap.json"  # written last by a bootstrap that succeeded; `fab check` reads it
SUDOERS_FILE = "/etc/sudoers.d/provision-deploy"  # the deploy user's passwordless sudo (no '.': sudo skips such names)
CLOUD_INIT_SUDOERS = "/etc/sudoers.d/90-cloud-init-users"  # cloud-init's users module writes users' sudo rules here
SSH_DIR = "/etc/ssh"
SSHD_DROPIN = f"{SSH_DIR}/sshd_config.d/00-provision.conf"  # sshd takes the first value it reads: sorts first
SSH_SERVICE = "ssh.service"  # Debian's and Ubuntu's sshd (Ubuntu 22.10+ may start it from ssh.socket)
SSH_HOST_KEY = f"{SSH_DIR}/ssh_host_ed25519_key"  # the host key a droplet's user data gives; droplet.create replaces it
FIREWALL_RULES = f"{PROVISION_ETC}/firewall.nft"
FIREWALL_PREVIOUS = f"{FIREWALL_RULES}.previous"  # the rules a pending revert puts back
FIREWALL_PENDING = f"{FIREWALL_RULES}.pending"  # a revert is pending: the first revert consumes it, a second does nothing
FIREWALL_TABLE = "inet provision"  # provision's own nftables table: nothing else's rules are touched
FIREWALL_UNIT = "provision-firewall.service"  # loads FIREWALL_RULES at boot (enabled) and on restart
FIREWALL_REVERT = "provision-firewall-revert"  # the transient timer (and service) that undoes an unconfirmed change
UPGRADES_CONF = "/etc/apt/apt.conf.d/80provision-upgrades"  # read after Debian's 20auto-upgrades: ours wins
UPGRADES_TIMER = "apt-daily-upgrade.timer"
# HTTPS (app.tls): certbot's certificates, ACME's HTTP-01 challenges, renewals
PROVISION_VAR = "/var/lib/provision"  # root's: what provision keeps for the machine
ACME_WEBROOT = f"{PROVISION_VAR}/acme"  # root's: certbot writes the challenges here, nginx serves them (never the app's)
MONITOR_DIR = f"{PROVISION_VAR}/monitor"  # root's alone: each app's health monitor (app.monitor), its config and state
ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/"  # the URL path of HTTP-01 challenges (RFC 8555)
LETSENCRYPT_DIR = "/etc/letsencrypt"  # certbot's: live/<name>/ (root's alone), renewal/<name>.conf
CERTBOT_HOOKS = f"{LETSENCRYPT_DIR}/renewal-hooks/deploy"  # certbot renew runs each after renewing
CERTBOT_RELOAD_HOOK = f"{CERTBOT_HOOKS}/provision-nginx-reload"  # nginx -t, then a graceful reload
CERTBOT_UNIT = "certbot.service"  # Debian's: certbot.timer starts it twice a day
CERTBOT_DROPIN = f"{SYSTEMD_DIR}/{CERTBOT_UNIT}.d/provision-proxy.conf"  # the proxy for renewals
CERTBOT_PROXY_ENV = f"{LETSENCRYPT_DIR}/provision-proxy.env"  # root's alone: the proxy URL may hold a password
# Push-to-deploy (fab git.setup): provision itself on the host, the apps' bare repositories, their settings
PUSH_HOME = "/opt/provision"  # root's: provision's own install on the host, which a push runs
PUSH_VENV = f"{PUSH_HOME}/venv"  # its dependencies (pinned to the versions fab runs with)
PUSH_CODE = f"{PUSH_HOME}/code"  # provision's package (provision/), as the local install has it
PUSH_VENV_NEW = f"{PUSH_VENV}.new"  # a virtualenv being built, moved to PUSH_VENV once complete
PUSH_VENV_OLD = f"{PUSH_VENV}.old"  # the one it replaces, for the moment of the switch
PUSH_CODE_LINK = f"{PUSH_CODE}.link"  # the next PUSH_CODE link, renamed over it
PUSH_PROGRAM = f"{PUSH_HOME}/receive"  # what the hook runs as root: deploys a pushed tree read on its stdin
GIT_ROOT = f"{PROVISION_VAR}/git"  # root's: each app's bare repository, <name>.git (the pushing user's)
PUSH_SETTINGS = f"{PROVISION_ETC}/push"  # root's alone: each app's settings that are not in fabric.yaml
PUSH_TMP = f"{PROVISION_VAR}/push-tmp"  # root's alone (0700): each push's tree, unpacked in a fresh folder
PUSH_WORK_PREFIX = "provision-push-"  # a push's folder under PUSH_TMP (removed when it ends; a stale one by the next push)
PUSH_STALE_SECONDS = 3600  # a push's folder older than this, its receive gone, is removed by the next push
PUSH_LANDING_SECONDS = 60  # how long after a push's deploy its ref update may still be landing (see receive.py)
PUSH_MARKER = ".provision-"  # <dir>/.provision-<key>: that install of provision's venv or code is complete
PIP_WHEELS = "/usr/share/python-wheels/pip-*.whl"  # Debian's pip wheel (python3-pip-whl): run from there, no ensurepip


def push_code(digest: str) -> str:
    """One version of provision's code on the host; ``PUSH_CODE`` links to the current one (a push
    that runs keeps the version it started with)."""
    return f"{PUSH_CODE}-{digest}"


def push_code_new(digest: str) -> str:
    """A version of provision's code being unpacked, renamed to :func:`push_code` once complete."""
    return f"{push_code(digest)}.new"


def git_repo_new(repo: str) -> str:
    """A new repository being made (with its hook), renamed to ``repo`` once complete."""
    return f"{repo}.new"


def push_lock(app: str, base: str | None = None) -> str:
    """Held (flock) by a push's receive of ``app`` from before its checks until it exits."""
    return f"{base or PUSH_TMP}/{app}.lock"


def push_landed(app: str, base: str | None = None) -> str:
    """The commit the last push of ``app`` deployed: git names it on the branch just after."""
    return f"{base or PUSH_TMP}/{app}.landed"


def push_tree(work: str) -> str:
    """The pushed commit's tree, in a push's folder."""
    return f"{work}/tree"


def push_ca_file(work: str) -> str:
    """The recorded CA bundle, written for a push's deploy."""
    return f"{work}/ca-bundle.pem"
# Container apps: each slot's container publishes its port on 127.0.0.1 only, on a port of its own
# (CONTAINER_PORTS + 2 * (a hash of the app's name) + the slot's index), which nginx proxies to.
CONTAINER_PORTS = (20000, 29999)
PROCESS_CONTAINER = ".p."  # between the app's and the process's name (see Layout.process_container)
IMAGE_REPO = "localhost"  # a release's image: localhost/<app>:<release id> (never pushed anywhere)


@dataclass(frozen=True)
class Layout:
    """Where one app lives on a host."""

    name: str
    # where the host keeps things: elsewhere only in tests
    nginx_dir: str = NGINX_DIR
    nginx_pid: str = NGINX_PID
    run_dir: str = RUN_DIR
    srv_dir: str = SRV_DIR
    systemd_dir: str = SYSTEMD_DIR
    container: bool = False  # each slot runs a container (app.container): it listens on a local port, not a socket

    # -- /srv/<name>
    @property
    def root(self) -> str:
        return f"{self.srv_dir}/{self.name}"

    @property
    def releases(self) -> str:
        return f"{self.root}/releases"

    def release(self, release_id: str) -> str:
        return f"{self.releases}/{release_id}"

    def release_venv(self, release_id: str) -> str:
        """A release's link to its virtualenv."""
        return f"{self.release(release_id)}/{VENV}"

    def venv_link(self, key: str) -> str:
        """What a release's ``.venv`` link points at (relative: releases/<id>/.venv -> venvs/<key>)."""
        return f"../../{VENV_DIRNAME}/{key}"

    @property
    def venvs(self) -> str:
        return f"{self.root}/{VENV_DIRNAME}"

    def venv(self, key: str) -> str:
        return f"{self.venvs}/{key}"

    def venv_requirements(self, key: str) -> str:
        """Root's alone: the requirements files a virtualenv was built from, at their paths in the source."""
        return f"{self.venv(key)}/requirements"

    def venv_complete(self, key: str) -> str:
        """Made last when a virtualenv is built: one without it is rebuilt."""
        return f"{self.venv(key)}/.provision-complete"

    @property
    def slots(self) -> str:
        return f"{self.root}/slots"

    def slot_link(self, slot: str) -> str:
        return f"{self.slots}/{slot}"

    def slot_target(self, release_id: str) -> str:
        """What a slot's link holds (relative, so the tree can move)."""
        return f"../releases/{release_id}"

    def current_target(self, release_id: str) -> str:
        """What ``current`` holds."""
        return f"releases/{release_id}"

    @property
    def shared(self) -> str:
        return f"{self.root}/shared"

    def data_dir(self, linked_dir: str) -> str:
        """One of the app's data dirs (``app.linked_dirs``): the app's own, and all its sandbox lets it write."""
        return f"{self.shared}/{linked_dir}"

    @property
    def current(self) -> str:
        return f"{self.root}/current"

    @property
    def release_log(self) -> str:
        return f"{self.root}/releases.log"

    @property
    def env_file(self) -> str:
        """The app's environment, which systemd reads for it (root's, readable by the app's group)."""
        return f"{self.shared}/.env"

    @property
    def secrets_file(self) -> str:
        """The app's secret environment (env.set): root's alone (0600); systemd reads it for the app."""
        return f"{self.root}/secrets.env"

    def release_env(self, release_dir: str) -> str:
        """The plain environment (app.env) of the release in ``release_dir`` (a release or a slot)."""
        return f"{release_dir}/{RELEASE_DIR}/{RELEASE_ENV}"

    @property
    def legacy_files(self) -> tuple[str, ...]:
        """What older layouts kept here: one gunicorn config for both slots (now each release has
        its own) and a live-slot file (now the upstream file alone says which slot is live)."""
        return (f"{self.root}/gunicorn.conf.py", f"{self.root}/live-slot")

    @property
    def tree(self) -> tuple[str, ...]:
        """The directories root owns alone under the app's root, the root first."""
        return (self.root, self.releases, self.venvs, self.slots, self.shared)

    def live(self, file: str) -> str:
        """A file of the live release's own directory (release.json, manifest.json)."""
        return f"{self.current}/{RELEASE_DIR}/{file}"

    def in_slot(self, slot: str, file: str = "") -> str:
        """The own directory of the release a slot runs, or a file in it (release.json)."""
        return f"{self.slot_link(slot)}/{RELEASE_DIR}" + (f"/{file}" if file else "")

    # -- systemd: one instance (and socket) per slot
    def unit(self, slot: str) -> str:
        return f"{self.name}@{slot}"

    def unit_file(self, slot: str) -> str:
        return f"{self.systemd_dir}/{self.unit(slot)}.service"

    @property
    def socket_unit_file(self) -> str:
        return f"{self.systemd_dir}/{self.name}@.socket"

    @property
    def socket_unit(self) -> str:
        """The socket unit of a slot, as a systemd specifier (%i is the slot)."""
        return f"{self.name}@%i.socket"

    @property
    def legacy_unit_file(self) -> str:
        """Older layouts: one unit for both slots (now each release has its own)."""
        return f"{self.systemd_dir}/{self.name}@.service"

    @property
    def wants(self) -> str:
        return f"{self.systemd_dir}/{BOOT_WANTS}"

    @property
    def sockets_wants(self) -> str:
        return f"{self.systemd_dir}/{SOCKETS_BOOT_WANTS}"

    @property
    def socket_dir(self) -> str:
        """Root's: systemd creates the slots' sockets here (the app never writes a path nginx uses)."""
        return f"{self.run_dir}/{self.name}"

    def socket(self, slot: str) -> str:
        return f"{self.socket_dir}/{slot}.sock"

    # -- systemd: the app's processes and timers (names have no '.': a unit name tells its app)
    def process_unit(self, process: str) -> str:
        """A process's service (``<name>.<process>.service``); a timer's service and timer share its stem."""
        return f"{self.name}.{process}.service"

    def timer_unit(self, timer: str) -> str:
        return f"{self.name}.{timer}.timer"

    def app_unit_file(self, unit: str) -> str:
        """Where one of the app's process or timer units lives."""
        return f"{self.systemd_dir}/{unit}"

    @property
    def app_units_re(self) -> str:
        """What names every process and timer unit of this app (and of no other app) in systemd's directory."""
        return re.escape(self.name) + r"\.[a-z][a-z0-9_-]*\.(service|timer)"

    @property
    def timers_wants(self) -> str:
        return f"{self.systemd_dir}/{TIMERS_BOOT_WANTS}"

    # -- nginx
    @property
    def site(self) -> str:
        return f"{self.nginx_dir}/sites-available/{self.name}"

    @property
    def sites_enabled(self) -> str:
        return f"{self.nginx_dir}/sites-enabled"

    @property
    def site_enabled(self) -> str:
        return f"{self.sites_enabled}/{self.name}"

    @property
    def site_backup(self) -> str:
        """Where the previous site waits while nginx tests a new one (nginx includes nothing there)."""
        return f"{self.nginx_dir}/sites-available/.{self.name}.provision-old"

    @property
    def nginx_own_dir(self) -> str:
        """Root's: the upstream files and maintenance pages of provision's apps."""
        return f"{self.nginx_dir}/provision"

    @property
    def upstream_file(self) -> str:
        return f"{self.nginx_own_dir}/{self.name}.upstream"

    @property
    def maintenance_file(self) -> str:
        """Root's, present while the app is in maintenance (fab maintenance.on): the flag nginx tests, and
        the page it shows visitors when the live release has no maintenance.html."""
        return f"{self.nginx_own_dir}/{self.name}.maintenance.html"

    def nginx_var(self, kind: str) -> str:
        """An nginx variable of this app's site (nginx variables are global: each app has its own)."""
        return f"provision_{kind}_{self.name.replace('-', '_')}"

    def slot_port(self, slot: str) -> int:
        """A container app's slot publishes its container's port here, on 127.0.0.1 (see CONTAINER_PORTS)."""
        low, high = CONTAINER_PORTS
        return low + 2 * (zlib.crc32(self.name.encode()) % ((high - low + 1) // 2)) + SLOTS.index(slot)

    def address(self, slot: str) -> str:
        """Where nginx reaches ``slot``, as nginx names it (``$upstream_addr``): its socket, or a container
        app's local port."""
        return f"127.0.0.1:{self.slot_port(slot)}" if self.container else f"unix:{self.socket(slot)}"

    def answers(self, slot: str) -> str:
        """Where provision's health gate talks to ``slot`` directly (lib_http's ``where``)."""
        return f"127.0.0.1:{self.slot_port(slot)}" if self.container else self.socket(slot)

    def upstream(self, slot: str) -> str:
        """The upstream file's content that sends traffic to ``slot``."""
        return f"server {self.address(slot)} fail_timeout=0;\n"

    def live_slot(self, upstream: str | None) -> str | None:
        """The slot the upstream file's content sends traffic to: the live slot (a socket's, or a
        container app's port)."""
        found = re.search(r"server (\S+) ", upstream or "")
        return next((s for s in SLOTS for c in (False, True) if found and found.group(1) == Layout(
            self.name, self.nginx_dir, self.nginx_pid, self.run_dir, self.srv_dir, self.systemd_dir, c).address(s)),
            None)

    # -- container apps
    def image(self, release_id: str) -> str:
        """The image a container app's release runs (built or pulled for it; rollbacks reuse it)."""
        return f"{IMAGE_REPO}/{self.name}:{release_id}"

    @property
    def image_repo(self) -> str:
        return f"{IMAGE_REPO}/{self.name}"

    def container_name(self, slot: str) -> str:
        """A slot's container (``%i`` in its unit)."""
        return f"{self.name}-{slot}"

    @property
    def container_slice(self) -> str:
        """The systemd slice the app's containers run in (the engine's --cgroup-parent): the slot's unit
        holds only the engine's client, the engine puts the container in a cgroup of its own, under
        this slice (fab status counts it). '-' escaped as systemd-escape does: a name's dash would make
        it another app's sub-slice (app my-app's inside app my's)."""
        return "provision-" + self.name.replace("-", "\\x2d") + ".slice"

    @property
    def container_cgroups(self) -> tuple[str, str]:
        """Where that slice's cgroup is: the engine's systemd driver nests it in provision.slice (as systemd
        does a dashed slice name), its cgroupfs driver makes it at the top."""
        return f"/provision.slice/{self.container_slice}", f"/{self.container_slice}"

    def process_container(self, process: str) -> str:
        """A process's or timer's container: no app, slot or process name holds a '.', so it is never a
        slot's container (``<app>-<slot>``) nor another app's."""
        return f"{self.name}{PROCESS_CONTAINER}{process}"

    @property
    def access_log(self) -> str:
        return f"/var/log/nginx/{self.name}.access.log"

    @property
    def error_log(self) -> str:
        return f"/var/log/nginx/{self.name}.error.log"

    @property
    def connection_var(self) -> str:
        """The nginx variable of the site's map that passes WebSocket upgrades on (one per app: two
        sites defining one variable would stop nginx)."""
        return f"provision_connection_{self.name.replace('-', '_')}"

    @property
    def upstream_var(self) -> str:
        """The nginx variable of the site's map that tells the host which socket answered."""
        return self.nginx_var("upstream")

    # -- HTTPS: the app's certificate (certbot's lineage, named after the app)
    @property
    def cert_name(self) -> str:
        return self.name

    @property
    def certificate(self) -> str:
        return f"{LETSENCRYPT_DIR}/live/{self.cert_name}/fullchain.pem"

    @property
    def certificate_key(self) -> str:
        return f"{LETSENCRYPT_DIR}/live/{self.cert_name}/privkey.pem"

    @property
    def renewal_conf(self) -> str:
        return f"{LETSENCRYPT_DIR}/renewal/{self.cert_name}.conf"

    # -- the health monitor (app.monitor): a root timer checking the app through nginx
    @property
    def monitor_dir(self) -> str:
        """Root's alone (0700): the monitor's program, its config (the webhook: a secret) and its state."""
        return f"{MONITOR_DIR}/{self.name}"

    @property
    def monitor_program(self) -> str:
        return f"{self.monitor_dir}/monitor.py"

    @property
    def monitor_config(self) -> str:
        return f"{self.monitor_dir}/config.json"

    @property
    def monitor_state(self) -> str:
        return f"{self.monitor_dir}/state.json"

    @property
    def monitor_unit(self) -> str:
        """The stem of the monitor's service and timer (not ``<name>.*``: those are the app's own units)."""
        return f"provision-monitor-{self.name}"

    @property
    def monitor_service_file(self) -> str:
        return f"{self.systemd_dir}/{self.monitor_unit}.service"

    @property
    def monitor_timer_file(self) -> str:
        return f"{self.systemd_dir}/{self.monitor_unit}.timer"

    # -- the deploy lock
    @property
    def git_repo(self) -> str:
        """The app's bare repository (push-to-deploy): the pushing user's, its hooks root's."""
        return f"{GIT_ROOT}/{self.name}.git"

    @property
    def push_settings(self) -> str:
        """This host's settings of the app that fabric.yaml does not give (inventory vars), as JSON."""
        return f"{PUSH_SETTINGS}/{self.name}.json"

    @property
    def lock(self) -> str:
        return f"{self.run_dir}/{self.name}.lock"

    @property
    def lock_holder(self) -> str:
        return f"{self.run_dir}/{self.name}.deploy"

    @property
    def deploy_scope_prefix(self) -> str:
        """A deploy's transient systemd scope is this, its shell's pid, ``.scope``."""
        return f"provision-deploy-{self.name}-"

    # -- handed to others
    def variables(self) -> dict:
        """For templates and checks: the paths they may use."""
        return {"root": self.root, "current": self.current, "shared": self.shared, "slots": self.slots,
                "own_dir": RELEASE_DIR, "env_file": self.env_file,
                "release_env": RELEASE_ENV, "secrets_file": self.secrets_file, "socket_dir": self.socket_dir, "socket_unit": self.socket_unit,
                "upstream_file": self.upstream_file, "upstream_header": UPSTREAM_HEADER,
                "upstream_var": self.upstream_var, "connection_var": self.connection_var, "release_log": self.release_log,
                "access_log": self.access_log, "error_log": self.error_log,
                "sockets": {s: self.socket(s) for s in SLOTS}, "units": {s: self.unit(s) for s in SLOTS},
                "unit_files": {s: self.unit_file(s) for s in SLOTS}, "venv": VENV,
                "maintenance_file": self.maintenance_file, "maintenance_dir": self.nginx_own_dir,
                "maintenance_uri": self.maintenance_file[len(self.nginx_own_dir):],
                "maintenance_var": self.nginx_var("maintenance"), "local_var": self.nginx_var("local"),
                "access_var": self.nginx_var("access"),
                "static_cache_var": self.nginx_var("static_cache"), "redirect_var": self.nginx_var("redirect"),
                "header_vars": {h: self.nginx_var(h) for h in ("nosniff", "referrer", "frame", "hsts")},
                "acme_webroot": ACME_WEBROOT, "acme_challenge_path": ACME_CHALLENGE_PATH,
                "certificate": self.certificate, "certificate_key": self.certificate_key,
                "slot_ports": {s: self.slot_port(s) for s in SLOTS}, "image_repo": self.image_repo,
                "slot_container": self.container_name("%i")}
