# The release command (app.release_command): run once in a new release before it takes traffic,
# as the app user with the app's environment (systemd-run, the command line in argv: see
# provision/appenv.py). Its output is shown, any value of the app's secret environment (the
# secrets file, and shared/.env's longer values) masked.
# A non-zero exit refuses the release: the release log records `refused` and this exits with the
# command's status, its output on stderr (where the apply script's failure report takes it).
import json
import subprocess
import sys

a = json.loads(sys.argv[1])


SHORTEST = 6  # of shared/.env's values masked (DEBUG=1 must not make every 1 in the output ****)


def secret_values():
    """The secrets' values, and those of shared/.env (where apps keep theirs too) of SHORTEST
    characters or more."""
    values = [v for v in env_read(a["secrets_file"]).values() if v]
    values += [v for v in env_read(a["env_file"], group_may_read=True).values() if len(v) >= SHORTEST]
    return sorted(set(values), key=len, reverse=True)


def masked(text):
    for value in secret_values():
        text = text.replace(value, "****")
    return text


res = subprocess.run(a["argv"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
out = masked(res.stdout.decode("utf-8", "replace")).rstrip("\n")
if res.returncode == 0:
    # lines the apply script shows as they are, once the step is done
    print("".join("@@show %s\n" % line for line in out.splitlines()), end="")
    sys.exit(0)
log_release(a["release_log"], a["release"], "refused", a["by"], reason="release command")
sys.stderr.write("%s\nrelease command failed (exit %d): release %s refused, traffic stays on the previous release\n"
                 % (out, res.returncode, a["release"]))
sys.exit(res.returncode if 0 < res.returncode < 256 else 1)
