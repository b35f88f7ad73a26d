"""The reference job for pyinfra (bench/peers.py times it): examples/hello on a fresh Debian 12
host, written the way a pyinfra user would write it for speed.

    pyinfra -y inventory.py deploy.py   (run from this directory; the inventory gives each host
    app_src, proxy and ca_bundle besides its SSH settings)

The code goes with files.rsync (files.sync checks each file by commands of its own: thousands
for the big app). files.rsync cannot tell whether it changed anything, so a digest of the tree,
kept on the host, decides whether to sync, install the requirements and restart.
"""

import hashlib
import io
import os
from pathlib import Path

from pyinfra import host
from pyinfra.facts.files import Sha1File
from pyinfra.operations import apt, files, pip, server, systemd
from pyinfra.operations.util import any_changed

APP_USER = "hello"
APP_DIR = "/srv/hello"
CODE, VENV, STAMP = f"{APP_DIR}/code", f"{APP_DIR}/venv", f"{APP_DIR}/code.sha256"
CA_FILE = "/usr/local/share/ca-certificates/extra-ca.crt"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
HEALTH = ("for i in $(seq 50); do python3 -c \"import urllib.request as u; "
          "u.urlopen('http://127.0.0.1/', timeout=2)\" 2>/dev/null && exit 0; sleep 0.2; done; exit 1")

src = Path(host.data.app_src)
proxy = {"http_proxy": host.data.proxy, "https_proxy": host.data.proxy}


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest() + "\n"


files.put(name="apt proxy", src=io.StringIO(f'Acquire::http::Proxy "{host.data.proxy}";\n'
                                             f'Acquire::https::Proxy "{host.data.proxy}";\n'),
          dest="/etc/apt/apt.conf.d/80proxy")
ca = files.put(name="extra CA", src=host.data.ca_bundle, dest=CA_FILE)
server.shell(name="update-ca-certificates", commands=["update-ca-certificates"], _if=ca.did_change)
apt.packages(name="packages", packages=["python3-venv", "nginx", "rsync"], update=True, cache_time=3600,
             no_recommends=True)
server.user(name="app user", user=APP_USER, system=True, home=APP_DIR, shell="/usr/sbin/nologin",
            create_home=False)
files.directory(name="app dir", path=APP_DIR)

digest = tree_digest(src)
if host.get_fact(Sha1File, path=STAMP) != hashlib.sha1(digest.encode()).hexdigest():
    files.rsync(name="code", src=f"{src}/", dest=CODE, flags=["-a", "--delete"])
code = files.put(name="code digest", src=io.StringIO(digest), dest=STAMP)  # after the sync: a failed one is retried

pip_args = dict(virtualenv=VENV, virtualenv_kwargs={"venv": True, "python": "python3"},
                extra_install_args=f"--cert {SYSTEM_CA}", _env=proxy)
# The requirements are in the code: installed again only when it changed (pip.packages takes no
# range like flask>=3,<4 as a package, and with requirements= it runs `pip install -r` each time).
pip.packages(name="requirements", requirements=f"{CODE}/requirements.txt", _if=code.did_change, **pip_args)
server_pkg = pip.packages(name="gunicorn", packages=["gunicorn"], **pip_args)

unit = files.template(name="gunicorn unit", src="templates/hello.service.j2", dest="/etc/systemd/system/hello.service",
                      app_user=APP_USER, app_dir=APP_DIR)
systemd.daemon_reload(name="daemon-reload", _if=unit.did_change)
systemd.service(name="gunicorn running", service="hello.service", running=True, enabled=True)
systemd.service(name="gunicorn restart", service="hello.service", restarted=True, _if=any_changed(code, server_pkg, unit))

site = files.template(name="nginx site", src="templates/hello-site.conf.j2", dest="/etc/nginx/sites-available/hello")
enabled = files.link(name="nginx site enabled", path="/etc/nginx/sites-enabled/hello",
                     target="/etc/nginx/sites-available/hello")
default = files.link(name="nginx default site gone", path="/etc/nginx/sites-enabled/default", present=False)
systemd.service(name="nginx reload", service="nginx.service", reloaded=True, _if=any_changed(site, enabled, default))

server.shell(name="answers through nginx", commands=[HEALTH])
