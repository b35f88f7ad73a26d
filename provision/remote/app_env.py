# The app's secret environment on the host (env.set, env.unset, env.list): a file only root can
# read, which systemd reads for every process of the app (EnvironmentFile=). Values come on stdin
# (base64 of a JSON object), never in arguments: `ps` shows arguments to every local user.
# Prints names only, never a value.
import base64
import json
import os
import sys

a = json.loads(sys.argv[1])
path = a["path"]


def write(variables):
    """Atomically, through a fresh temporary file only root can read (O_EXCL|O_NOFOLLOW)."""
    tmp = path + a["tmp"]
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchown(fh.fileno(), 0, 0)
        os.fchmod(fh.fileno(), 0o600)
        fh.write(env_text(variables))
    os.replace(tmp, path)


variables = env_read(path)
if a["op"] == "list":
    print("\n".join(sorted(variables)))
    sys.exit(0)
new = dict(variables)
if a["op"] == "set":
    new.update(json.loads(base64.b64decode(sys.stdin.read()).decode("utf-8")))
else:
    for key in a["names"]:
        new.pop(key, None)
write(new)
