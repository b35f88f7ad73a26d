"""The users section of a droplet's cloud-init user data, applied as cloud-init's users module
would (for sandbox droplets, which have no cloud-init): each user made when missing (a login shell,
its password locked), its authorized_keys written (the keys already there kept), its sudo rule in
cloud-init's own sudoers file, checked with visudo before it is put in place. Runs as root.

Arguments: {"users": [{"name", "shell", "sudo", "keys"}], "sudoers": PATH}.
"""

import json
import os
import pwd
import subprocess
import sys


def run(*cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {(res.stderr or res.stdout).strip()}")


def write(path, text, mode, uid=0, gid=0):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chown(tmp, uid, gid)
    os.chmod(tmp, mode)
    return tmp


def main(args):
    rules = []
    for u in args["users"]:
        name = u["name"]
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            run("useradd", "--create-home", "--user-group", "--shell", u["shell"], name)
            run("passwd", "--lock", name)
            pw = pwd.getpwnam(name)
        ssh = os.path.join(pw.pw_dir, ".ssh")
        os.makedirs(ssh, mode=0o700, exist_ok=True)
        os.chown(ssh, pw.pw_uid, pw.pw_gid)
        path = os.path.join(ssh, "authorized_keys")
        old = open(path).read().splitlines() if os.path.exists(path) else []
        have = {" ".join(l.split()[:2]) for l in old}
        lines = old + [k for k in u["keys"] if " ".join(k.split()[:2]) not in have]
        os.replace(write(path, "\n".join(lines) + "\n", 0o600, pw.pw_uid, pw.pw_gid), path)
        if u.get("sudo"):
            rules.append(f"{name} {u['sudo']}")
    if rules:
        tmp = write(args["sudoers"], "# Created by cloud-init v. (provision's sandbox)\n" + "\n".join(rules) + "\n", 0o440)
        res = subprocess.run(["visudo", "-cq", "-f", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            sys.exit(f"sudo rule refused by visudo: {res.stdout.strip() or res.stderr.strip()}")
        os.replace(tmp, args["sudoers"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
