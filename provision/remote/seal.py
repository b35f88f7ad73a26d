# Runs on the managed host as root (stdlib python3): makes directories the app user wrote (the
# release command's static folders) root's, without ever acting through a path the app can still
# change. argv[1] is JSON: base (a root-owned directory: the release), dirs (paths below it).
#
# Each directory is opened relative to its parent without following links, made root's 0755
# through that descriptor, and only then listed: from then on the app cannot add, remove or swap
# anything in it. Each entry is opened the same way: a regular file becomes root's (its read and
# execute bits kept for everyone, no set-id bits) through its own descriptor; a directory is
# sealed in turn; anything else (a link, a FIFO, a socket) is removed. A tree deeper than
# MAX_DEPTH fails the release command's step (the release never goes live).
import json
import os
import stat
import sys

MAX_DEPTH = 64
OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def seal_dir(fd):
    os.fchown(fd, 0, 0)
    os.fchmod(fd, 0o755)


def seal(top, depth=0):
    """``top``: an open directory, already root's 0755."""
    for name in sorted(os.listdir(top)):
        try:
            fd = os.open(name, OPEN, dir_fd=top)
        except OSError:  # a link (ELOOP), or gone: nothing of it may stay
            remove(top, name)
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                if depth >= MAX_DEPTH:
                    sys.exit("a folder the release command wrote is over %d levels deep" % MAX_DEPTH)
                seal_dir(fd)
                seal(fd, depth + 1)
            elif stat.S_ISREG(st.st_mode):
                os.fchown(fd, 0, 0)
                os.fchmod(fd, (st.st_mode & 0o755) | 0o644)
            else:
                os.close(fd)
                fd = -1
                remove(top, name)
        finally:
            if fd >= 0:
                os.close(fd)


def remove(top, name, depth=0):
    """Remove an entry of a root-owned directory (a tree too), never following a link."""
    try:
        os.unlink(name, dir_fd=top)
        return
    except IsADirectoryError:
        pass
    except OSError:
        return
    if depth >= MAX_DEPTH:
        return
    try:
        fd = os.open(name, OPEN | os.O_DIRECTORY, dir_fd=top)
    except OSError:
        return
    try:
        seal_dir(fd)
        for inner in os.listdir(fd):
            remove(fd, inner, depth + 1)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=top)
    except OSError:
        pass


def main():
    a = json.loads(sys.argv[1])
    base = os.open(a["base"], OPEN | os.O_DIRECTORY)
    for path in a["dirs"]:
        fd = os.dup(base)
        try:
            for part in path.split("/"):
                inner = os.open(part, OPEN | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = inner
                seal_dir(fd)
            seal(fd)
        finally:
            os.close(fd)
    os.close(base)


main()
