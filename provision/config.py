"""App settings: validated, typed, layered.

Layers, lowest first: built-in defaults (:data:`DEFAULTS`), the project's
``fabric.yaml`` (``app:``, read by invoke), inventory group and host vars,
``FABRIC_APP_*`` environment variables (read by :func:`take_env`), task flags.
:func:`layer` merges them; :func:`build` fills in the defaults and validates.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from . import appenv, secrets
from . import requirements as deps
from .errors import ProvisionError
from .layout import RELEASE_DIR, VENV, Layout
from .processes import procfile, processes_setting, static_setting, timers_setting

# The one place defaults are: the kit's fabric.yaml and `python -m provision init` set only what
# differs. ``name`` has none (it names the app's user, directories and units).
DEFAULTS: dict = {
    "name": None,
    "source": ".",  # the directory holding the fabfile
    "wsgi": "app:app",
    "requirements": "requirements.txt",
    "server_name": "_",
    "health_path": "/",
    "health_timeout": 30,
    "workers": 2,
    "threads": 2,
    "python": "python3",
    "packages": [],
    "checks": "checks",
    "templates": "templates",
    "proxy": "",
    "ca_bundle": "",
    "keep_releases": 5,
    "linked_files": [".env"],
    "linked_dirs": ["log", "uploads"],
    "graceful_timeout": 30,
    "include": [],  # paths outside source (a monorepo's sibling packages), relative to it
    "asgi": False,
    "static": {},  # URL prefix -> directory in the release, served by nginx (provision/processes.py)
    "processes": {},  # name -> command: services of the app, with a Procfile's lines other than web and release
    "timers": {},  # name -> {schedule: systemd OnCalendar, command}
    "env": {},  # plain environment variables of every process of the app (visible in plans)
    "release_command": "",  # shell command run in each new release before it takes traffic (or a Procfile's release: line)
    "test_command": "",  # fab ship: the app's tests, run locally in a clean export ("": python -m pytest when it has tests)
    # fab bootstrap (provision/bootstrap.py)
    "deploy_user": "deploy",  # the login user with passwordless sudo that replaces root's login
    "deploy_keys": [],  # local public key files given to deploy_user (default: the connection's key, -i / key=)
    "open_ports": [],  # more ports the firewall lets in, beside SSH, 80 and 443: 8443 or 51820/udp
    "unattended_upgrades": True,  # security upgrades installed every day (false: provision leaves them as they are)
    "client_max_body_size": "10m",  # nginx: the largest request body (uploads) the site accepts
    "tls": False,  # HTTPS with a certificate from an ACME CA (certbot, HTTP-01), HTTP redirected to it
    "acme_directory": "https://acme-v02.api.letsencrypt.org/directory",  # the ACME CA (Let's Encrypt)
    "acme_email": "",  # the CA's contact for expiry notices (optional)
    # push-to-deploy (fab git.setup, provision/push.py)
    "git_branch": "main",  # the branch whose pushes deploy; others are only stored
    # the health monitor (provision/monitor.py): a root timer on the host
    "monitor": 0,  # seconds between checks through nginx; 0 or false: no monitor
    "monitor_failures": 3,  # failed checks in a row before the live slot restarts and the webhook is called
    "monitor_webhook": "",  # http(s) URL POSTed JSON on "down" and "recovered" (a secret: never shown)
    # container apps (README: Container apps)
    "container": False,  # the app runs as a container image built on the host from the release's Dockerfile
    "engine": "docker",  # the container engine: docker or podman (installed when missing)
    "image": "",  # an image to pull instead of building one (registry/name:tag)
    "port": 8000,  # the port the app listens on inside its container
}
ENGINES = ("docker", "podman")
IMAGE_RE = re.compile(r"[a-z0-9][a-z0-9._/:@-]{0,254}", re.I)  # registry/name[:tag][@sha256:...]
DOCKERFILE = "Dockerfile"

# Each used with fullmatch: the whole value must match (no trailing newline).
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,30}")
# module:callable or module:factory(); the module a dotted path of identifiers
WSGI_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\(\))?", re.ASCII)
SERVER_NAME_RE = re.compile(r"_|[A-Za-z0-9*.-]+( [A-Za-z0-9*.-]+)*")
PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]*")
PATH_RE = re.compile(r"[\w./-]+")
PROXY_RE = re.compile(r"https?://([^\s/:@]+(:[^\s/@]*)?@)?[^\s/@:]+(:\d+)?/?")  # [user[:password]@]host[:port]
SIZE_RE = re.compile(r"\d{1,9}[kKmMgG]?")  # an nginx size: 10m, 512k, 0 (no limit)
URL_RE = re.compile(r"https://[^\s/@]+(/[^\s]*)?")
WEBHOOK_RE = re.compile(r"https?://[^\s/@]+(/\S*)?")  # no user:password@ (urllib cannot send it)
EMAIL_RE = re.compile(r"[^\s@,;]+@[^\s@,;]+\.[^\s@,;]+")
BRANCH_RE = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,100}(?<![./])")  # a plain git branch name
SECRET_VAR_RE = re.compile(r"pass|secret|token|key", re.I)
# The app's system user is named after it: never one of these accounts or groups of Debian and
# Ubuntu systems and common services, nor systemd-*. (On the host, an account provision did not
# make is refused too: steps.User.)
RESERVED_NAMES = frozenset("""
    root daemon bin sys sync games man lp mail news uucp proxy www-data backup list irc gnats nobody nogroup
    adm tty disk kmem dialout fax voice cdrom floppy tape sudo audio dip operator src shadow utmp video sasl
    plugdev staff users netdev input render kvm crontab messagebus sshd ssh ssl-cert polkitd tss uuidd syslog
    avahi dnsmasq tcpdump ntp chrony postfix nginx postgres mysql redis memcached
""".split())


def _password_span(url: str) -> tuple[int, int]:
    """Where the password of ``[scheme://]user:password@host`` is, in a valid URL or not:
    from the ':' after the user name to the last '@'; an empty span when there is none."""
    start = url.find("://") + 3 if "://" in url else 0
    end = url.rfind("@")
    colon = url.find(":", start, end) if end > start else -1
    return (colon + 1, end) if colon >= 0 else (0, 0)


def mask_url(url: str) -> str:
    """The URL with any password replaced, for messages."""
    a, b = _password_span(url)
    return url[:a] + secrets.MASK + url[b:] if b > a else url


def secret_values(raw: dict) -> tuple[str, ...]:
    """The values never to print among raw settings: the proxy URL's password, and
    ``var_*`` values whose name contains pass, secret, token or key."""
    proxy = str(raw.get("proxy") or "")
    start, end = _password_span(proxy)
    out = [proxy[start:end]]
    out += [str(v) for k, v in raw.items() if k.startswith("var_") and SECRET_VAR_RE.search(k)]
    out.append(str(raw.get("monitor_webhook") or "").strip())  # the whole URL: a webhook's path is its key
    return tuple(s for s in out if s)


@dataclass(frozen=True)
class Settings:
    name: str
    source: Path
    wsgi: str
    requirements: Path
    server_name: str
    health_path: str
    health_timeout: int
    workers: int
    threads: int
    python: str
    packages: tuple[str, ...]
    checks: Path
    templates: Path
    proxy: str
    ca_bundle: Path | None
    keep_releases: int
    linked_files: tuple[str, ...]
    linked_dirs: tuple[str, ...]
    graceful_timeout: int
    include: tuple[Path, ...]  # each shipped in the release under its own name
    asgi: bool
    dependencies: deps.Dependencies  # what the virtualenv installs (provision.requirements)
    pythonpath: str  # "src" for a src/ layout: where the app's module is, inside the release
    static: tuple[tuple[str, str], ...]  # (URL prefix, directory in the release)
    processes: dict[str, str]
    timers: dict[str, dict[str, str]]
    env: dict
    release_command: str
    test_command: str  # "": fab ship runs the default (provision/ship.py)
    deploy_user: str
    deploy_keys: tuple[str, ...]  # public key lines
    open_ports: tuple[str, ...]  # "PORT/tcp" or "PORT/udp"
    unattended_upgrades: bool
    client_max_body_size: str
    tls: bool
    acme_directory: str
    acme_email: str
    git_branch: str
    monitor: int  # seconds between checks, 0: none
    monitor_failures: int
    monitor_webhook: str
    extra: dict  # other vars (var_*), available to templates
    container: bool = False
    engine: str = "docker"
    image: str = ""
    port: int = 8000

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values never to print (see :func:`secret_values`)."""
        return secret_values({"proxy": self.proxy, "monitor_webhook": self.monitor_webhook,
                              **{f"var_{k}": v for k, v in self.extra.items()}})

    @property
    def layout(self) -> Layout:
        return Layout(self.name, container=self.container)

    @property
    def user(self) -> str:
        return self.name

    def template_vars(self) -> dict:
        """What templates see: the settings (``var_*`` ones without the prefix), the app's user,
        the host layout's paths and the app's data dirs (``data_dirs``)."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        # https: the site serves HTTPS (app.tls, once its certificate exists: the deploy renders both)
        out.update(self.layout.variables(), user=self.user, https=self.tls,
                   data_dirs=[self.layout.data_dir(d) for d in self.linked_dirs])  # what its sandbox lets it write
        return out


def qualified_image(engine: str, image: str) -> str:
    """``image`` as podman pulls it: a short name (``nginx:1``, ``team/app:2``) is docker's, on Docker Hub
    (podman refuses one without a search list in registries.conf, a prompt on a terminal)."""
    first, slash, _ = image.partition("/")
    if engine != "podman" or not image or slash and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if slash else f"docker.io/library/{image}"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an app (its user, directories and units), or None."""
    if not NAME_RE.fullmatch(name):
        return "use lowercase letters, digits, '-' or '_', starting with a letter (max 31)"
    if name in RESERVED_NAMES or name.startswith("systemd-"):
        return "that is a system account on Debian and Ubuntu hosts; choose another app name"
    return None


def _bad(key: str, value, why: str) -> ProvisionError:
    return ProvisionError(f"invalid setting app.{key}={value!r}: {why}")


def _int(key: str, value, lo: int, hi: int) -> int:
    try:
        n = int(value)
        if isinstance(value, float) or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise _bad(key, value, f"expected a whole number from {lo} to {hi}")
    if not lo <= n <= hi:
        raise _bad(key, value, f"expected a whole number from {lo} to {hi}")
    return n


def _bool(key: str, value) -> bool:
    """true or false; from the inventory or the environment, also yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0", ""):
        return False
    raise _bad(key, value, "expected true or false")


def _list(key: str, value) -> list[str]:
    """A list of strings; from the inventory or the environment, one string of items
    separated by commas or spaces."""
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _bad(key, value, "expected a list of strings, or one string of items separated by commas")
    return list(value)


# Vars that may appear in the app layer without being app settings: inventory
# connection vars are consumed elsewhere; anything in ``extra`` must be
# declared as a template var (``var_*``) to catch typos.
CONNECTION_KEYS = {"host", "user", "port", "key", "known_hosts"}


def build(raw: dict, base_dir: Path) -> Settings:
    """Validate merged raw settings into :class:`Settings` (one clear error per problem).
    Their secrets are remembered first, so that no message shows them."""
    secrets.remember(secret_values(raw))
    unknown = sorted(k for k in raw if k not in DEFAULTS and k not in CONNECTION_KEYS and not k.startswith("var_"))
    if unknown:
        raise ProvisionError(
            f"unknown setting app.{unknown[0]}; known settings: {', '.join(sorted(DEFAULTS))} "
            "(prefix your own template variables with var_)"
        )
    v = dict(DEFAULTS)
    v.update({k: raw[k] for k in raw if k in DEFAULTS and raw[k] is not None})
    if v["name"] is None:
        raise ProvisionError("no app name; set app.name in fabric.yaml (`python -m provision init` writes one)")
    name = str(v["name"])
    why = name_problem(name)
    if why:
        raise _bad("name", name, why)
    source = (base_dir / str(v["source"])).resolve()
    if not source.is_dir():
        raise _bad("source", v["source"], f"no such directory {source}; point --source at your app")
    asgi = _bool("asgi", v["asgi"])
    container = _bool("container", v["container"])
    engine, image = str(v["engine"]).strip(), str(v["image"] or "").strip()
    if engine not in ENGINES:
        raise _bad("engine", engine, f"expected {' or '.join(ENGINES)}")
    if image and not IMAGE_RE.fullmatch(image):
        raise _bad("image", image, "expected an image reference such as registry.example.com/app:1.2")
    image = qualified_image(engine, image)
    if container and not image and not (source / DOCKERFILE).is_file():
        raise _bad("container", True, f"no {DOCKERFILE} in {source}: add one, or name an image to pull with app.image")
    if image and not container:
        raise _bad("image", image, "an image is for a container app: set app.container: true too")
    # a container app's image holds its dependencies: no virtualenv, no requirements needed
    dependencies = (deps.Dependencies(source / DOCKERFILE, ((DOCKERFILE, b""),), False, ()) if container
                    else deps.load(source, str(v["requirements"]), asgi))
    wsgi = str(v["wsgi"])
    if not WSGI_RE.fullmatch(wsgi):
        raise _bad("wsgi", wsgi, "expected module:callable or module:factory(), e.g. app:app, "
                   "mysite.wsgi:application or app:create_app()")
    server_name = str(v["server_name"]).strip()
    if not SERVER_NAME_RE.fullmatch(server_name):
        raise _bad("server_name", server_name, "expected host names separated by spaces, or _ for any")
    health = str(v["health_path"])
    if not health.startswith("/") or any(c.isspace() for c in health):
        raise _bad("health_path", health, "expected a URL path starting with /")
    packages = _list("packages", v["packages"])
    for p in packages:
        if not PACKAGE_RE.fullmatch(p):
            raise _bad("packages", p, "not a Debian package name")
    proxy = str(v["proxy"] or "")
    if proxy and not PROXY_RE.fullmatch(proxy):
        raise _bad("proxy", mask_url(proxy), "expected http://[USER:PASSWORD@]HOST:PORT")
    ca = str(v["ca_bundle"] or "")
    ca_path = None
    if ca:
        ca_path = (base_dir / ca).resolve()
        if not ca_path.is_file():
            raise _bad("ca_bundle", ca, f"no such file {ca_path}")
    linked = {}
    for key in ("linked_files", "linked_dirs"):
        linked[key] = tuple(_list(key, v[key]))
        for rel in linked[key]:
            parts = rel.split("/")
            if rel.startswith("/") or not PATH_RE.fullmatch(rel) or any(p in ("", ".", "..") for p in parts):
                raise _bad(key, rel, "expected a path inside the release, like .env or log")
    for key in ("linked_files", "linked_dirs"):
        for rel in linked[key]:
            # the app owns a linked dir: provision makes nothing inside it (it would act in a place the app controls)
            outer = next((d for d in linked["linked_dirs"] if rel.startswith(d + "/")), None)
            if outer:
                raise _bad(key, rel, f"it lies inside linked dir {outer!r}, which is the app's; list only {outer!r}")
    python = str(v["python"])
    if not PATH_RE.fullmatch(python):
        raise _bad("python", python, "expected an interpreter name or path, e.g. python3")
    from_procfile = procfile(source)
    processes = processes_setting(v["processes"], from_procfile)
    try:
        env = appenv.env_setting(v["env"])
    except ValueError as e:
        raise _bad("env", v["env"], str(e))
    release_command = str(v["release_command"] or from_procfile.get("release") or "").strip()
    if "\0" in release_command:
        raise _bad("release_command", release_command, "a shell command cannot hold a NUL")
    test_command = _test_command(v["test_command"])
    size = str(v["client_max_body_size"]).strip()
    if not SIZE_RE.fullmatch(size):
        raise _bad("client_max_body_size", size, "expected an nginx size: a number with k, m or g (10m), or 0 for no limit")
    tls = _bool("tls", v["tls"])
    if tls:
        _tls_names(server_name)
    directory = str(v["acme_directory"] or "").strip()
    if not URL_RE.fullmatch(directory):
        raise _bad("acme_directory", directory, "expected the https:// URL of an ACME CA's directory "
                   f"(Let's Encrypt's: {DEFAULTS['acme_directory']})")
    email = str(v["acme_email"] or "").strip()
    if email and not EMAIL_RE.fullmatch(email):
        raise _bad("acme_email", email, "expected one e-mail address, or nothing")
    branch = str(v["git_branch"]).strip()
    if not BRANCH_RE.fullmatch(branch) or branch.endswith(".lock"):
        raise _bad("git_branch", branch, "expected a git branch name such as main or production")
    monitor = _monitor(v["monitor"])
    webhook = str(v["monitor_webhook"] or "").strip()
    if webhook and not WEBHOOK_RE.fullmatch(webhook):
        raise _bad("monitor_webhook", secrets.MASK, "expected an http:// or https:// URL without user:password@ "
                                                    "(its value is not shown)")
    if webhook and not monitor:
        raise _bad("monitor_webhook", secrets.MASK, "it is called by the health monitor, which is off; set "
                                                    "app.monitor to the seconds between checks (30)")
    extra = {k[4:]: raw[k] for k in raw if k.startswith("var_")}
    taken = sorted(set(extra) & ({f.name for f in fields(Settings)} | set(Layout(name).variables()) | {"user", "https"}))
    if taken:
        raise _bad(f"var_{taken[0]}", extra[taken[0]], f"templates already get {taken[0]!r} from provision; "
                   "give your variable another name")
    return Settings(
        name=name,
        source=source,
        wsgi=wsgi,
        requirements=dependencies.origin,
        server_name=server_name,
        health_path=health,
        health_timeout=_int("health_timeout", v["health_timeout"], 1, 3600),
        workers=_int("workers", v["workers"], 1, 256),
        threads=_int("threads", v["threads"], 1, 256),
        python=python,
        packages=tuple(packages),
        checks=(source / str(v["checks"])).resolve(),  # beside the app: its checks, not every app's
        templates=(base_dir / str(v["templates"])).resolve(),
        proxy=proxy.rstrip("/"),
        ca_bundle=ca_path,
        keep_releases=_int("keep_releases", v["keep_releases"], 2, 100),
        linked_files=linked["linked_files"],
        linked_dirs=linked["linked_dirs"],
        graceful_timeout=_int("graceful_timeout", v["graceful_timeout"], 1, 3600),
        env=env,
        release_command=release_command,
        test_command=test_command,
        client_max_body_size=size,
        tls=tls,
        acme_directory=directory,
        acme_email=email,
        git_branch=branch,
        monitor=monitor,
        monitor_failures=_int("monitor_failures", v["monitor_failures"], 1, 100),
        monitor_webhook=webhook,
        extra=extra,
        include=_include(_list("include", v["include"]), source, base_dir, (*linked["linked_files"], *linked["linked_dirs"])),
        asgi=asgi,
        dependencies=dependencies,
        pythonpath=deps.pythonpath(source, wsgi),
        static=static_setting(v["static"], linked["linked_files"] + linked["linked_dirs"]),
        processes=processes,
        timers=timers_setting(v["timers"], processes),
        deploy_user=_deploy_user(v["deploy_user"], name),
        deploy_keys=_public_keys(_list("deploy_keys", v["deploy_keys"]), base_dir),
        open_ports=_ports(v["open_ports"]),
        unattended_upgrades=_bool("unattended_upgrades", v["unattended_upgrades"]),
        container=container,
        engine=engine,
        image=image,
        port=_int("port", v["port"], 1, 65535),
    )


def _test_command(value) -> str:
    """``test_command``: one shell command line, run locally by ``fab ship``; empty (or blank) is the
    default (``python -m pytest`` when the app has tests): it never turns the tests off."""
    if not isinstance(value, str):
        raise _bad("test_command", value, "expected a shell command as one string, e.g. python -m pytest -x")
    command = value.strip()
    if "\0" in command or "\n" in command or "\r" in command:
        raise _bad("test_command", command, "expected one line of shell (join several commands with &&)")
    return command
def _monitor(value) -> int:
    """Seconds between the monitor's checks (5 to 86400), or 0 for none (false, off, 0)."""
    if value is False or str(value).strip().lower() in ("false", "no", "off", "0", ""):
        return 0
    if value is True or str(value).strip().lower() in ("true", "yes", "on"):
        raise _bad("monitor", value, "expected the seconds between checks (5 to 86400, e.g. 30), or false")
    return _int("monitor", value, 5, 86400)


def _deploy_user(value, app: str) -> str:
    user = str(value)
    if not NAME_RE.fullmatch(user):
        raise _bad("deploy_user", user, "use lowercase letters, digits, '-' or '_', starting with a letter (max 31)")
    if user in RESERVED_NAMES or user.startswith("systemd-"):
        raise _bad("deploy_user", user, "that is a system account; choose another login name, e.g. deploy")
    if user == app:
        raise _bad("deploy_user", user, "the app's own user runs the app and must never have sudo; choose another "
                   "login name, e.g. deploy")
    return user


PUBLIC_KEY_RE = re.compile(r"(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp\d+|sk-[\w.@-]+) [A-Za-z0-9+/=]+( [^\n]*)?")


def _public_keys(files: list[str], base_dir: Path) -> tuple[str, ...]:
    """The public key lines of ``deploy_keys`` files (relative to the fabfile's folder)."""
    out: list[str] = []
    for name in files:
        path = (base_dir / os.path.expanduser(name)).resolve()
        try:
            lines = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            raise _bad("deploy_keys", name, f"cannot read {path} ({getattr(e, 'strerror', None) or e}); list public "
                       "key files, e.g. ~/.ssh/id_ed25519.pub")
        if not lines or not all(PUBLIC_KEY_RE.fullmatch(l) for l in lines):
            raise _bad("deploy_keys", name, "not an SSH public key file (expected lines like `ssh-ed25519 AAAA... "
                       "you@laptop`); list the .pub files, never private keys")
        out += lines
    return tuple(dict.fromkeys(out))


def _ports(value) -> tuple[str, ...]:
    """``open_ports``: PORT or PORT/tcp or PORT/udp, each as PORT/PROTO (YAML may give numbers)."""
    def text(v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    out: list[str] = []
    for item in _list("open_ports", [text(v) for v in value] if isinstance(value, (list, tuple)) else text(value)):
        port, _, proto = str(item).strip().lower().partition("/")
        proto = proto or "tcp"
        if not (port.isdigit() and 1 <= int(port) <= 65535 and proto in ("tcp", "udp")):
            raise _bad("open_ports", item, "expected a port from 1 to 65535, optionally /tcp or /udp (8443, 51820/udp)")
        if f"{int(port)}/{proto}" not in out:
            out.append(f"{int(port)}/{proto}")
    return tuple(out)


def _tls_names(server_name: str) -> None:
    """With app.tls, every name of server_name goes on the certificate: each must be a host name an
    ACME CA can check over HTTP (HTTP-01), the first naming the site."""
    for name in server_name.split():
        if name == "_":
            why = "tls needs the site's host names (its certificate names them), not _ (any name)"
        elif "*" in name or name.startswith("."):
            why = f"{name} is a wildcard, which only a DNS-01 challenge proves; list each name instead"
        elif _is_ip(name):
            why = f"{name} is an IP address, which an ACME CA does not certify; use the host name that points at it"
        else:
            continue
        raise _bad("server_name", server_name, why + " (e.g. server_name: example.com www.example.com)")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# Folders that hold keys and credentials: never shipped as part of an app.include
SECRET_DIRS = frozenset({".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store", ".gcloud"})


def _include(items: list[str], source: Path, base_dir: Path, linked: tuple[str, ...]) -> tuple[Path, ...]:
    """app.include: folders or files outside the source, relative to it, each shipped in the release
    under its own name beside the app's files (``../libs/common`` lands as ``common/``)."""
    out: dict[str, Path] = {}
    for item in items:
        path = (source / item).resolve()
        name = path.name
        if not path.exists():
            raise _bad("include", item, f"no such file or folder {path}; give paths relative to app.source, "
                       "e.g. ../libs/common")
        if path.is_relative_to(source):
            raise _bad("include", item, "it is inside app.source, which is shipped already; list only paths outside it")
        if source.is_relative_to(path) or base_dir.resolve().is_relative_to(path) or Path.home().is_relative_to(path):
            raise _bad("include", item, "it holds the app, the fabfile's folder or your home folder; list the "
                       "sibling folders the app imports, e.g. ../libs/common")
        if SECRET_DIRS & set(path.parts) or secrets.looks_secret(name):
            raise _bad("include", item, "it looks like a folder of keys or secrets; ship code only")
        if not PATH_RE.fullmatch(name) or name in (RELEASE_DIR, VENV) or name in out or name in linked:
            raise _bad("include", item, f"its name {name!r} is taken in the release (by provision, app.linked_*, "
                       "or another app.include); rename it")
        own = source / name
        if (own.exists() or own.is_symlink()) and not (own.is_symlink() and own.resolve() == path):
            raise _bad("include", item, f"it would land as {name!r} in the release, where app.source has its own "
                       f"{name!r}; rename one of them")
        out[name] = path
    return tuple(out.values())


ENV_PREFIX = "FABRIC_APP_"


def take_env(environ=os.environ) -> dict[str, str]:
    """Take the ``FABRIC_APP_<KEY>`` variables out of ``environ``, as ``{key: raw string}``
    (keys in lower case; ``FABRIC_APP_VAR_<NAME>`` too, declared or not).

    The tasks module calls this before invoke reads the environment: invoke would cast
    them to the type of the config value and fail on lists, and ignore undeclared keys.
    :func:`build` validates these strings like inventory vars (lists: comma-separated)."""
    return {k[len(ENV_PREFIX):].lower(): environ.pop(k) for k in list(environ) if k.startswith(ENV_PREFIX)}


def layer(config_app: dict, env_app: dict, host_vars: dict, flags: dict) -> dict:
    """Merge the layers: project file < inventory < environment < flags (build fills in defaults)."""
    out = {k: v for k, v in config_app.items()}
    out.update(host_vars)
    out.update(env_app)
    out.update({k: v for k, v in flags.items() if v is not None})
    return out
