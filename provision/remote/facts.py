# Runs on the managed host under its stock python3 (stdlib only, 3.7+), after lib_http.
# Reads a JSON list of [kind, arg] requests from argv[1], prints one JSON
# list of answers in the same order.  Gathering every fact of a run in this
# single process is what keeps a no-op deploy to one SSH round trip.
import fnmatch
import grp
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time

MAX_CONTENT = 1 << 20
MAX_DEPTH = 64  # folders deep, at the most, that a walk of a tree goes


def owner(uid, gid):
    try:
        u = pwd.getpwuid(uid).pw_name
    except KeyError:
        u = str(uid)
    try:
        g = grp.getgrgid(gid).gr_name
    except KeyError:
        g = str(gid)
    return u, g


def has_acl(path):
    """An ACL on a path can give access that its owner and mode do not show."""
    try:
        return any(a.startswith("system.posix_acl") for a in os.listxattr(path, follow_symlinks=False))
    except OSError:
        return False


def read_regular(fd):
    """The start of an open file that is a regular file (never a FIFO or a device), else None."""
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read(MAX_CONTENT + 1)


def file_fact(path):
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    u, g = owner(st.st_uid, st.st_gid)
    out = {"mode": stat.S_IMODE(st.st_mode), "owner": u, "group": g, "mtime": st.st_mtime}
    if stat.S_ISLNK(st.st_mode):
        out["type"] = "link"
        out["target"] = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        out["type"] = "dir"
        out["acl"] = has_acl(path)
    elif stat.S_ISREG(st.st_mode):
        out["type"] = "file"
        h = hashlib.sha256()
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 16), b""):
                h.update(chunk)
        out["sha256"] = h.hexdigest()
    else:
        out["type"] = "other"  # a FIFO, socket or device: never opened
    return out


def content_fact(path):
    try:
        data = read_regular(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return None if data is None else data[:MAX_CONTENT].decode("utf-8", "replace")


def content_below_fact(arg):
    """The text of a file below a directory ("DIR\\0RELATIVE PATH"), reached without following
    any symlink below DIR (DIR itself may be one). None when it is missing, a link or behind
    one, not a regular file, over MAX_CONTENT, or not UTF-8 text."""
    base, rel = arg.split("\0")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            inner = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        finally:
            os.close(fd)
        with os.fdopen(inner, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            data = fh.read(MAX_CONTENT + 1)
    except OSError:
        return None
    if len(data) > MAX_CONTENT or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


MAX_VISITED = 100000  # entries an unlisted fact looks at, at most


def unlisted_fact(arg):
    """Regular files below a directory (DIR itself may be a link; nothing below it is followed)
    that its manifest does not list and whose path matches one of the globs, sorted: at most MAX.
    arg: {"dir", "manifest" (relative to DIR, read like content_below), "skip" (top-level names),
    "match", "max"}. None when there is no readable manifest. "more": some were left out."""
    a = json.loads(arg)
    manifest = content_below_fact(a["dir"] + "\0" + a["manifest"])
    try:
        listed = set(json.loads(manifest))
        top = os.open(a["dir"], os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, ValueError, TypeError):  # TypeError: no manifest, or not a JSON object
        return None
    found, budget = [], [MAX_VISITED]

    def walk(fd, prefix):
        if prefix.count("/") > MAX_DEPTH:  # a tree planted to exhaust the walk: the rest is left out
            budget[0] = -1
            return
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            budget[0] -= 1
            if budget[0] < 0:
                return
            rel = prefix + e.name
            if not prefix and e.name in a["skip"]:
                continue
            if e.is_dir(follow_symlinks=False):
                try:
                    inner = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError:
                    continue
                try:
                    walk(inner, rel + "/")
                finally:
                    os.close(inner)
            elif (e.is_file(follow_symlinks=False) and rel not in listed
                  and any(fnmatch.fnmatchcase(rel.lower(), g) for g in a["match"])):
                found.append(rel)

    try:
        walk(top, "")
    except OSError:
        pass
    finally:
        os.close(top)
    return {"paths": found[:a["max"]], "more": len(found) > a["max"] or budget[0] < 0}


def ls_fact(path):
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def files_fact(path):
    """The text of every file in a directory (links followed), by name: None for what is not a
    readable file (a dangling link, a directory)."""
    names = ls_fact(path)
    return None if names is None else {n: content_fact(os.path.join(path, n)) for n in names}


def user_fact(name):
    try:
        p = pwd.getpwnam(name)
    except KeyError:
        return None
    return {"uid": p.pw_uid, "home": p.pw_dir, "shell": p.pw_shell, "group": owner(0, p.pw_gid)[1]}


def packages_facts(names):
    if not names or not shutil.which("dpkg-query"):
        return {n: False for n in names}
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\n"] + names,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True,
    )
    installed = set()
    for line in res.stdout.splitlines():
        pkg, _, status = line.partition("\t")
        if status.startswith("ii"):
            installed.add(pkg.split(":")[0])
    return {n: n in installed for n in names}


def services_facts(names):
    if not names or not shutil.which("systemctl"):
        return {n: None for n in names}
    props = "Id,LoadState,ActiveState,SubState,UnitFileState,MainPID"
    res = subprocess.run(
        ["systemctl", "show", "-p", props] + [n if n.endswith((".service", ".timer")) else n + ".service"
                                              for n in names],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True,
    )
    blocks = [b for b in res.stdout.split("\n\n") if b.strip()]
    out = {}
    for name, block in zip(names, blocks):
        d = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        out[name] = {
            "loaded": d.get("LoadState") == "loaded",
            "active": d.get("ActiveState") == "active",
            "enabled": d.get("UnitFileState") == "enabled",
            "pid": int(d.get("MainPID") or 0),
        }
    return out


def command_fact(cmd):
    return subprocess.run(
        cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ).returncode


def http_fact(arg):
    """Status code of a plain-HTTP GET (lib_http's), 0 when nothing answers or, given
    [url, host, header, values], the header is none of the values."""
    url, host, *expect = json.loads(arg)
    where, path = split_url(url)
    try:
        status, got = http_get(where, path, host or where, expect[0] if expect else "")
    except (OSError, ValueError):
        return 0
    return 0 if expect and got not in expect[1] else status


def sshd_fact(user):
    """sshd's effective configuration as its files say now (`sshd -T`; for a login as ``user``, its
    Match blocks applied, when one is named): {"ok": true, "config": {key: [values]}}, or
    {"ok": false, "error": what sshd said}."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    match = ["-C", f"user={user},host=localhost,addr=127.0.0.1"] if user else []
    try:
        res = subprocess.run([sshd, "-T", *match], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
    except OSError as e:
        return {"ok": False, "error": str(e)}
    if res.returncode != 0:
        return {"ok": False, "error": res.stderr.strip()[-500:]}
    config = {}
    for line in res.stdout.splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key.lower(), []).append(value)
    return {"ok": True, "config": config}


def certificate_fact(arg):
    """The certificate of a certbot lineage ([fullchain path, renewal conf path]): {names (its DNS
    names, sorted), not_after (epoch), server (the CA's directory its renewal conf names)}, or None."""
    cert, conf = json.loads(arg)
    try:
        import ssl
        decoded = ssl._ssl._test_decode_cert(cert)  # stdlib's own PEM decoder: the first certificate
    except (OSError, ValueError, AttributeError, ImportError):
        return None
    server = None
    text = content_fact(conf) or ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "server":
            server = value.strip()
    return {"names": sorted(v.lower() for k, v in decoded.get("subjectAltName", ()) if k == "DNS"),
            "not_after": ssl.cert_time_to_seconds(decoded["notAfter"]), "server": server}


def os_fact(_):
    info = {}
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                k, _, v = line.strip().partition("=")
                info[k] = v.strip('"')
    except OSError:
        pass
    return {
        "id": info.get("ID", ""),
        "version": info.get("VERSION_ID", ""),
        "apt": bool(shutil.which("apt-get")),
        "systemd": os.path.isdir("/run/systemd/system"),
        "python": "%d.%d" % sys.version_info[:2],
    }


def main():
    req = json.loads(sys.argv[1])
    pkgs = packages_facts([a for k, a in req if k == "package"])
    svcs = services_facts([a for k, a in req if k == "service"])
    simple = {"file": file_fact, "content": content_fact, "content_below": content_below_fact, "files": files_fact,
              "user": user_fact, "ls": ls_fact, "unlisted": unlisted_fact, "command": command_fact, "http": http_fact, "os": os_fact,
              "sshd": sshd_fact, "certificate": certificate_fact}
    out = []
    for kind, arg in req:
        if kind == "package":
            out.append(pkgs[arg])
        elif kind == "service":
            out.append(svcs[arg])
        else:
            out.append(simple[kind](arg))
    sys.stdout.write(json.dumps({"facts": out, "time": time.time()}))


main()
