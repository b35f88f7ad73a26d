# lib_envfile: the app's environment files as systemd reads them (EnvironmentFile=): one
# KEY="VALUE" line a variable, the value double-quoted with \ before " \ ` and $ (the only
# escapes systemd reads inside double quotes). Values are one line: no newline, no NUL.
import os
import stat

ENV_ESCAPED = '"\\`$'


def env_line(key, value):
    return '%s="%s"\n' % (key, "".join("\\" + c if c in ENV_ESCAPED else c for c in value))


def env_text(variables):
    """The file's text for a mapping of names to values, in name order."""
    return "".join(env_line(k, variables[k]) for k in sorted(variables))


def env_parse(text):
    """The variables of a file :func:`env_text` wrote (other lines are skipped)."""
    out = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or len(raw) < 2 or raw[0] != '"' or raw[-1] != '"':
            continue
        value, escaped = [], False
        for c in raw[1:-1]:
            if escaped or c != "\\":
                value.append(c)
                escaped = False
            else:
                escaped = True
        out[key.strip()] = "".join(value)
    return out


def env_read(path, group_may_read=False):
    """The variables of a file only root can write, and only root (or, ``group_may_read``, its
    group: shared/.env is root:app 0640) can read; a link, or anything else found there, counts as
    none (never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # none, or a link (ELOOP)
        return {}
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & (0o037 if group_may_read else 0o077):
            return {}
        return env_parse(fh.read())
