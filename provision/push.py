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
from .layout import GIT_ROOT, PROVISION_ETC, PROVISION_VAR, PUSH_CODE, PUSH_HOME, PUSH_PROGRAM, PUSH_SETTINGS, PUSH_VENV
from .steps import Command, Directory, File, Packages, Step

q = shlex.quote
# What the host side imports beyond the standard library: jinja2 (templates, with markupsafe) and
# invoke (its vendored yaml reads fabric.yaml as fab does). No SSH stack: the host deploys itself.
HOST_DEPENDENCIES = ("jinja2", "markupsafe", "invoke")
PACKAGES = ("git", "python3-venv", "python3-pip-whl")
ZERO = "0" * 40
# Recorded settings that are no use on the host: bootstrap's local key files, the connection's own
HOST_ONLY_DROPPED = CONNECTION_KEYS | {"deploy_keys", "ca_bundle"}


def pins(names=HOST_DEPENDENCIES) -> tuple[str, ...]:
    """The host's dependencies at the versions installed here (what fab runs with)."""
    return tuple(f"{n}=={metadata.version(n)}" for n in names)


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
    is refused; other branches are stored."""
    ref = f"refs/heads/{branch}"
    run = f"{'sudo -n ' if sudo else ''}{q(program_path)} --app {q(name)} --commit \"$new\" --branch {q(branch)}"
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
  git archive --format=tar "$new" | {run}
  status=("${{PIPESTATUS[@]}}")
  [ "${{status[0]}}" = 0 ] && [ "${{status[1]}}" = 0 ] || exit 1
done
exit 0
"""


def program() -> str:
    """The root-owned program the hook runs (through sudo): provision's receive, in isolated mode
    (no environment variables, no user site, not the current directory on its path)."""
    return (f"#!{PUSH_VENV}/bin/python3 -I\n"
            "# Managed by provision (fab git.setup): deploys a pushed tree (a tar on stdin) as root.\n"
            f"import sys\nsys.path.insert(0, {PUSH_CODE!r})\n"
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


def setup_steps(s: Settings, login_user: str, rec: dict, files: dict[str, bytes] | None = None) -> list[Step]:
    """What `fab git.setup` makes on the host (each step only when it differs)."""
    files = package_files() if files is None else files
    lay, deps = s.layout, pins()
    key = hashlib.sha256("\n".join(deps).encode()).hexdigest()[:16]
    code = digest(files)
    packed = base64.encodebytes(tarball(files)).decode()
    repo = lay.git_repo
    owner = login_user
    return trust_steps(s) + [
        Packages(PACKAGES),
        Directory(PUSH_HOME, owner="root", group="root", mode=0o755),
        Command(f"provision's dependencies ({', '.join(deps)})", (
            f"rm -rf {q(PUSH_VENV)}",
            "pip_whl=$(ls /usr/share/python-wheels/pip-*.whl 2>/dev/null | tail -n 1)",
            f"python3 -m venv --without-pip {q(PUSH_VENV)}",
            f'{q(PUSH_VENV)}/bin/python3 "$pip_whl/pip" install --quiet --disable-pip-version-check --no-input '
            + " ".join(q(d) for d in deps),
            f"chmod -R go-w {q(PUSH_VENV)}",
            f"touch {q(f'{PUSH_VENV}/.provision-{key}')}",
        ), creates=f"{PUSH_VENV}/.provision-{key}"),
        Command(f"provision's code ({len(files)} files, {code})", (
            f"rm -rf {q(PUSH_CODE)}.new && mkdir -m 755 {q(PUSH_CODE)}.new",
            f"base64 -d <<'__PROVISION_EOF__' | tar -xz --no-same-owner -C {q(PUSH_CODE)}.new\n{packed}__PROVISION_EOF__",
            f"chmod -R go-w,a+rX {q(PUSH_CODE)}.new && touch {q(f'{PUSH_CODE}.new/.provision-{code}')}",
            f"rm -rf {q(PUSH_CODE)} && mv {q(PUSH_CODE)}.new {q(PUSH_CODE)}",
        ), creates=f"{PUSH_CODE}/.provision-{code}"),
        File(PUSH_PROGRAM, program().encode(), mode=0o755),
        Directory(PROVISION_VAR, owner="root", group="root", mode=0o755),
        Directory(GIT_ROOT, owner="root", group="root", mode=0o755),
        Command(f"repository {repo} ({owner}'s)", (
            f"if [ -L {q(repo)} ] || [ ! -f {q(repo + '/HEAD')} ]; then rm -rf {q(repo)} && git init --bare --quiet "
            f"--template= --initial-branch={q(s.git_branch)} {q(repo)}; fi",
            # the pushing user's (never the app's), links changed themselves, never followed
            f"chown -R -h {q(owner)}: {q(repo)}",
            f"install -d -m 755 {q(repo + '/hooks')} && chown -R -h root:root {q(repo + '/hooks')}",
        ), unless=f"test -f {q(repo + '/HEAD')} && test ! -L {q(repo)} && "
                  f"[ \"$(stat -c %U {q(repo)})\" = {q(owner)} ]"),
        File(f"{repo}/hooks/pre-receive", hook(s.name, s.git_branch, login_user != "root").encode(), mode=0o755),
        Directory(PROVISION_ETC, owner="root", group="root", mode=0o755),
        Directory(PUSH_SETTINGS, owner="root", group="root", mode=0o700),
        File(lay.push_settings, (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode(), mode=0o600,
             sensitive=True),
    ]
