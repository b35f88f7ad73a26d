"""Push-to-deploy: what `fab git.setup` puts on a host, decided here (pure: settings in, steps out).

On the host: provision itself (its dependencies in a root-owned virtualenv, pinned to the
versions fab runs with here; its own package sent from this install, editable or not), the
program a push runs as root (``layout.PUSH_PROGRAM``, provision/receive.py), the app's bare
repository (the pushing user's) with its ``pre-receive`` hook (root's), and this host's settings
that do not come from fabric.yaml (its inventory vars, the CA bundle's certificates), root's alone.

The hook deploys from ``pre-receive``, not ``post-receive``: git ignores post-receive's exit
status, so a release refused there could not make the push fail; before pre-receive succeeds the
pushed objects are already readable (in the quarantine) and a non-zero exit rejects the push, so
the branch on the host keeps naming the live commit.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shlex
import tarfile
from importlib import metadata
from pathlib import Path

from .app import trust_steps
from .config import CONNECTION_KEYS, Settings
from .layout import (GIT_ROOT, PIP_WHEELS, PROVISION_ETC, PROVISION_VAR, PUSH_CODE, PUSH_CODE_LINK, PUSH_HOME,
                     PUSH_MARKER, PUSH_PROGRAM, PUSH_SETTINGS, PUSH_TMP, PUSH_VENV, PUSH_VENV_NEW, PUSH_VENV_OLD,
                     git_repo_new, push_code, push_code_new)
from .steps import Command, Directory, File, Packages, Step

q = shlex.quote
# What the host side imports beyond the standard library: jinja2 (templates, with markupsafe) and
# invoke (its vendored yaml reads fabric.yaml as fab does). No SSH stack: the host deploys itself.
HOST_DEPENDENCIES = ("jinja2", "markupsafe", "invoke")
# tomllib's upstream, for a host whose python is older than 3.11 (provision/requirements.py reads
# pyproject.toml with it): pinned to the local version when installed here, else to this one
TOMLI, TOMLI_VERSION, TOMLI_MARKER = "tomli", "2.0.1", 'python_version < "3.11"'
PACKAGES = ("git", "python3-venv", "python3-pip-whl")
ZERO = "0" * 40
# Recorded settings that are no use on the host: bootstrap's local key files, the connection's own
HOST_ONLY_DROPPED = CONNECTION_KEYS | {"deploy_keys", "ca_bundle"}


def pins(names=HOST_DEPENDENCIES) -> tuple[str, ...]:
    """The host's dependencies at the versions installed here (what fab runs with), and tomli for
    a host whose python lacks tomllib (pip reads the marker with the host's python)."""
    try:
        tomli = metadata.version(TOMLI)
    except metadata.PackageNotFoundError:
        tomli = TOMLI_VERSION
    return (*(f"{n}=={metadata.version(n)}" for n in names), f"{TOMLI}=={tomli}; {TOMLI_MARKER}")


def package_files(root: Path | None = None) -> dict[str, bytes]:
    """provision's own files as this install has them (an editable one too): ``provision/...`` ->
    content, without caches."""
    root = root or Path(__file__).resolve().parent
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
            out[f"provision/{rel.as_posix()}"] = path.read_bytes()
    return out


def tarball(files: dict[str, bytes]) -> bytes:
    """The files as a gzipped tar, the same bytes for the same files (no times, no owners)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[name]))
    raw = buf.getvalue()
    return raw[:4] + b"\0\0\0\0" + raw[8:]  # gzip's own time stamp zeroed


def digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:16]


def hook(name: str, branch: str, sudo: bool, program_path: str = PUSH_PROGRAM) -> str:
    """The app's pre-receive hook: a push to ``branch`` deploys the pushed commit (its tree, read by
    ``git archive`` as the pushing user: git's environment names the quarantine, which sudo would
    drop) through the root-owned program; a failed deploy rejects the push. Deleting ``branch``
    is refused; other branches are stored. A push whose old value of ``branch`` is no longer the
    branch's (another push landed meanwhile) is refused before deploying, and the program checks
    it again under the deploy lock (``--old``)."""
    ref = f"refs/heads/{branch}"
    run = f"{'sudo -n ' if sudo else ''}{q(program_path)} --app {q(name)} --commit \"$new\" --branch {q(branch)} --old \"$old\""
    sudo_check = ("""  if ! sudo -n true 2>/dev/null; then
    echo "provision: $(id -un) cannot run sudo without a password on this host; give it passwordless sudo (NOPASSWD, as fab bootstrap does) or push as root" >&2
    exit 1
  fi
""" if sudo else "")
    return f"""#!/bin/bash
# Managed by provision (fab git.setup): changes here are overwritten by the next setup.
# A push to {branch} deploys the pushed commit; a deploy that fails rejects the push (pre-receive:
# git ignores post-receive's exit status), so {branch} here keeps naming the live commit.
set -u
while read -r old new ref; do
  [ "$ref" = {q(ref)} ] || continue
  if [[ $new =~ ^0+$ ]]; then
    echo "provision: {branch} is the deploy branch of {name}: deleting it is refused" >&2
    exit 1
  fi
{sudo_check}  now=$(git rev-parse -q --verify {q(ref)} 2>/dev/null) || now=$old
  if [ "$now" != "$old" ] && ! [[ $old =~ ^0+$ && -z $now ]]; then
    echo "provision: {branch} moved on the host (to ${{now:0:7}}) while you pushed; fetch and push again" >&2
    exit 1
  fi
  git archive --format=tar "$new" | {run}
  status=("${{PIPESTATUS[@]}}")
  if [ "${{status[0]}}" != 0 ]; then
    echo "provision: git archive of ${{new:0:7}} failed on the host; push refused" >&2
    exit 1
  fi
  [ "${{status[1]}}" = 0 ] || exit 1
done
exit 0
"""


def program() -> str:
    """The root-owned program the hook runs (through sudo): provision's receive, in isolated mode
    (no environment variables, no user site, not the current directory on its path), from the
    version of provision's code current when it starts (a later setup does not change it under it)."""
    return (f"#!{PUSH_VENV}/bin/python3 -I\n"
            "# Managed by provision (fab git.setup): deploys a pushed tree (a tar on stdin) as root.\n"
            f"import os, sys\nsys.path.insert(0, os.path.realpath({PUSH_CODE!r}))\n"
            "from provision.receive import main\nsys.exit(main())\n")


def remote_url(user: str, host: str, port: int, repo: str) -> str:
    """The repository's SSH URL (IPv6 addresses in brackets)."""
    where = f"[{host}]" if ":" in host else host
    return f"ssh://{user}@{where}:{port}{repo}"


def remote_hint(url: str, key: str | None, remote: str = "production") -> str:
    """The lines that make a local checkout push to the host."""
    lines = [f"git remote add {remote} {url}"]
    if key:
        lines.append(f"git config core.sshCommand {q('ssh -i ' + q(key))}   # or GIT_SSH_COMMAND='ssh -i {key}'")
    return "\n".join(lines + [f"git push {remote} main"])


def record(s: Settings, label: str, host_vars: dict, ca_pem: str | None) -> dict:
    """This host's settings that fabric.yaml does not give, kept on the host (root's alone): the
    inventory's vars for it, the CA bundle's content (its path is this machine's)."""
    return {"app": s.name, "label": label, "branch": s.git_branch,
            "vars": {k: v for k, v in host_vars.items() if k not in HOST_ONLY_DROPPED}, "ca_bundle": ca_pem}


def host_raw(project_app: dict, rec: dict, ca_file: str | None) -> dict:
    """The raw settings of a push on the host: the pushed fabric.yaml's ``app:`` < the recorded
    inventory vars, with the recorded CA bundle's file (``ca_file``, written by the caller)."""
    from .config import layer
    out = layer({str(k): v for k, v in project_app.items() if k != "deploy_keys"}, {}, rec.get("vars") or {}, {})
    if ca_file:  # the recorded one: a path in fabric.yaml or the inventory is the operator's machine's
        out["ca_bundle"] = ca_file
    return out


PYVER = "$(python3 -c 'import platform; print(platform.python_version())')"  # the host's, in a command


def import_check() -> str:
    """Succeeds when the program's python imports provision.receive as the program does."""
    return (f"{q(PUSH_VENV)}/bin/python3 -I -c "
            + q(f"import os, sys; sys.path.insert(0, os.path.realpath({PUSH_CODE!r})); import provision.receive"))


def hook_write(path: str, content: bytes) -> str:
    """Commands writing the hook into its folder as root, never through a link: the folder is
    checked to be root's, at its own path, after cd (the repository around it is the login user's)."""
    hooks = path.rsplit("/", 1)[0]
    return (f"( cd {q(hooks)} && [ \"$(pwd -P)\" = {q(hooks)} ] && [ \"$(stat -c %U .)\" = root ] || "
            f"{{ echo {q(f'provision: {hooks} is a link or not owned by root; remove it and run git.setup again')} >&2; "
            "exit 1; }\n"
            f"base64 -d > pre-receive.new <<'__PROVISION_EOF__'\n{base64.encodebytes(content).decode()}__PROVISION_EOF__\n"
            "chmod 755 pre-receive.new && mv -f pre-receive.new pre-receive )")


def setup_steps(s: Settings, login_user: str, rec: dict, files: dict[str, bytes] | None = None) -> list[Step]:
    """What `fab git.setup` makes on the host (each step only when it differs). Each piece is built
    beside its place and moved there whole: a failed setup leaves the previous one working, and
    the repository appears only with its hook in it."""
    files = package_files() if files is None else files
    lay, deps = s.layout, pins()
    key = hashlib.sha256("\n".join(deps).encode()).hexdigest()[:16]
    code = digest(files)
    code_dir = push_code(code)
    packed = base64.encodebytes(tarball(files)).decode()
    repo = lay.git_repo
    hooks = f"{repo}/hooks"
    owner = login_user
    hook_file = f"{hooks}/pre-receive"
    hook_text = hook(s.name, s.git_branch, login_user != "root").encode()
    venv_new, venv_old = PUSH_VENV_NEW, PUSH_VENV_OLD
    code_new, repo_new = push_code_new(code), git_repo_new(repo)
    venv_marker = f"{PUSH_VENV}/{PUSH_MARKER}{key}-py{PYVER}"  # the host's python version in the key
    return trust_steps(s) + [
        Packages(PACKAGES),
        Directory(PUSH_HOME, owner="root", group="root", mode=0o755),
        Command(f"provision's dependencies ({', '.join(deps)})", (
            f"rm -rf {q(venv_new)} {q(venv_old)}",
            f"pip_whl=$(ls {PIP_WHEELS} 2>/dev/null | tail -n 1)",
            f"python3 -m venv --without-pip {q(venv_new)}",
            f'{q(venv_new)}/bin/python3 "$pip_whl/pip" install --quiet --disable-pip-version-check --no-input '
            + " ".join(q(d) for d in deps),
            f"chmod -R go-w {q(venv_new)}",
            f'touch "{venv_new}/{PUSH_MARKER}{key}-py{PYVER}"',
            f"if [ -e {q(PUSH_VENV)} ]; then mv {q(PUSH_VENV)} {q(venv_old)}; fi",
            f"mv {q(venv_new)} {q(PUSH_VENV)} && rm -rf {q(venv_old)}",
        ), unless=f'test -f "{venv_marker}"'),
        Command(f"provision's code ({len(files)} files, {code})", (
            f"rm -rf {q(code_new)} && mkdir -m 755 {q(code_new)}",
            f"base64 -d <<'__PROVISION_EOF__' | tar -xz --no-same-owner -C {q(code_new)}\n{packed}__PROVISION_EOF__",
            f"chmod -R go-w,a+rX {q(code_new)} && touch {q(f'{code_new}/{PUSH_MARKER}{code}')}",
            f"rm -rf {q(code_dir)} && mv {q(code_new)} {q(code_dir)}",
            # the switch: a link replaced in one rename (a running push keeps the folder it resolved)
            f"prev=$(readlink {q(PUSH_CODE)} || true); if [ -d {q(PUSH_CODE)} ] && [ ! -L {q(PUSH_CODE)} ]; then "
            f"rm -rf {q(PUSH_CODE)}; fi",
            f"ln -sfn {q(code_dir)} {q(PUSH_CODE_LINK)} && mv -T {q(PUSH_CODE_LINK)} {q(PUSH_CODE)}",
            # the previous version stays for a push still running it; older ones go
            f'for d in {q(PUSH_CODE)}-*; do [ "$d" = {q(code_dir)} ] || [ "$d" = "$prev" ] || rm -rf "$d"; done',
        ), unless=f"[ \"$(readlink {q(PUSH_CODE)})\" = {q(code_dir)} ] && test -f {q(f'{code_dir}/{PUSH_MARKER}{code}')}"),
        File(PUSH_PROGRAM, program().encode(), mode=0o755),
        Command("provision imports on the host", (import_check(),), unless=import_check()),
        Directory(PROVISION_VAR, owner="root", group="root", mode=0o755),
        Directory(PUSH_TMP, owner="root", group="root", mode=0o700),
        Directory(GIT_ROOT, owner="root", group="root", mode=0o755),
        Command(f"repository {repo} ({owner}'s)", (
            # a new repository is made beside its place, its hook in it, and renamed: never one without the hook
            f"if [ -L {q(repo)} ] || [ ! -f {q(repo + '/HEAD')} ]; then rm -rf {q(repo_new)} && git init --bare "
            f"--quiet --template= --shared=0700 --initial-branch={q(s.git_branch)} {q(repo_new)} && "
            f"chown -R -h {q(owner)}: {q(repo_new)} && install -d -m 755 -o root -g root {q(repo_new)}/hooks && "
            f"{hook_write(f'{repo_new}/hooks/pre-receive', hook_text)} && rm -rf {q(repo)} && "
            f"mv {q(repo_new)} {q(repo)}; fi",
            # the pushing user's (never the app's), its alone; links changed themselves, never followed
            f"chown -R -h {q(owner)}: {q(repo)} && chmod 700 {q(repo)} && "
            f"find {q(repo)} -mindepth 1 -maxdepth 1 ! -name hooks -exec chmod -R go-rwx {{}} +",
            f"runuser -u {q(owner)} -- git --git-dir={q(repo)} config core.sharedRepository 0700",
            f"if [ -L {q(hooks)} ]; then rm -f {q(hooks)}; fi",
            f"install -d -m 755 {q(hooks)} && chown -R -h root:root {q(hooks)} && chmod 755 {q(hooks)}",
        ), unless=f"test -f {q(repo + '/HEAD')} && test ! -L {q(repo)} && test ! -L {q(hooks)} && "
                  f"[ \"$(stat -c '%U %a' {q(repo)})\" = {q(owner + ' 700')} ] && "
                  f"[ \"$(stat -c %U {q(hooks)})\" = root ]"),
        Command(f"hook {hook_file}", (hook_write(hook_file, hook_text),),
                unless=f"test ! -L {q(hooks)} && [ \"$(stat -c '%U %a' {q(hooks)} {q(hook_file)} | tr '\\n' ' ')\" = "
                       f"'root 755 root 755 ' ] && echo {hashlib.sha256(hook_text).hexdigest()} {q(hook_file)} "
                       f"| sha256sum -c --status"),
        Directory(PROVISION_ETC, owner="root", group="root", mode=0o755),
        Directory(PUSH_SETTINGS, owner="root", group="root", mode=0o700),
        File(lay.push_settings, (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode(), mode=0o600,
             sensitive=True),
    ]
