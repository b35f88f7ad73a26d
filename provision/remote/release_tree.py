# Runs on the managed host as root (stdlib python3): completes a new release's tree. argv[1] is
# JSON: tmp (the new release being written, where the upload was just unpacked), manifest (its
# manifest: relative path -> sha256, ``+x`` after an executable's), base (the live release's
# directory, or null), base_manifest (its manifest), link_tag (hex of what a link's hash starts with).
#
# Every file of the manifest must be in tmp: unpacked from the upload, or else taken from the base
# release, which provision wrote: a hard link to the same file (a link: the same link), only when
# the base's manifest gives it the same hash AND it still looks exactly as provision left it: a
# regular file of root's, with no write bit for group or others, no ACL, the modification time the
# upload gave it (0). Anything else in the base (edited by hand since) is not trusted: the script
# says `@@resend` and exits 75, and provision sends that release whole.
import hashlib
import json
import os
import stat
import sys

a = json.loads(sys.argv[1])
tmp, tag = a["tmp"], bytes.fromhex(a["link_tag"])


def load(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as fh:
        return json.load(fh)


def pristine(st, path):
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022 or st.st_mtime != 0:
        return False
    try:
        return not any(x.startswith("system.posix_acl") for x in os.listxattr(path, follow_symlinks=False))
    except OSError:
        return False


def root_dir(path):
    """A directory of root's that only root writes, reached without a symlink."""
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


wanted = load(a["manifest"])
base, known = a["base"], {}
if base:
    try:
        if root_dir(base):
            known = load(a["base_manifest"])
    except (OSError, ValueError):
        known = {}
untrusted = []
made = set()
real = {}  # a folder of the base -> whether it is reached with no symlink on the way
base_real = os.path.realpath(base) if base else None


def direct(rel_dir):
    if rel_dir not in real:
        real[rel_dir] = os.path.realpath(os.path.join(base, rel_dir)) == os.path.normpath(
            os.path.join(base_real, rel_dir))
    return real[rel_dir]


for rel in sorted(wanted):
    dst = os.path.join(tmp, rel)
    if os.path.lexists(dst):
        continue  # unpacked from the upload
    src = os.path.join(base, rel) if base else None
    ok = False
    if src and known.get(rel) == wanted[rel] and direct(os.path.dirname(rel)):
        try:
            st = os.lstat(src)
        except OSError:
            st = None
        parent = os.path.dirname(dst)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        if st is not None and stat.S_ISLNK(st.st_mode):
            target = os.readlink(src)
            if hashlib.sha256(tag + os.fsencode(target)).hexdigest() == wanted[rel]:
                os.symlink(target, dst)
                ok = True
        elif st is not None and pristine(st, src):
            os.link(src, dst, follow_symlinks=False)
            ok = True
    if not ok:
        untrusted.append(rel)
if untrusted:
    print("@@resend %d %s" % (len(untrusted), " ".join(json.dumps(p) for p in untrusted[:3])))
    sys.exit(75)
