# Runs on the managed host (stdlib python3, after lib_logtime): `fab logs --since` for nginx's log files.
# argv[1] is JSON: since (UTC epoch seconds). Copies the lines of stdin from the first one stamped at
# or after it (a line without a time of its own goes with the line before it), line by line (--follow).
import json
import sys

since = json.loads(sys.argv[1])["since"]
keep = False
for line in iter(sys.stdin.readline, ""):
    when = line_time(line)
    if when is not None:
        keep = when >= since
    if keep:
        sys.stdout.write(line)
        sys.stdout.flush()
