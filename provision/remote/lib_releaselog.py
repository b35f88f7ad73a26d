# lib_releaselog: appending to the release log (releases.log), root's: one JSON object a line.
import json
import os
import time


def append_log(path, line):
    """The release log is root's: anything else found there (a link, another owner) is replaced."""
    try:
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path) or st.st_uid != 0:
            os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a") as fh:
        fh.write(line)


def log_release(path, release, action, by, **more):
    """A line in the release log: what went live (deploy, rollback, restart) or was refused, by
    whom, when."""
    append_log(path, json.dumps(dict(more, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     release=release, action=action, by=by), sort_keys=True) + "\n")
