# Runs on the managed host (stdlib python3, after lib_logtime): `fab logs --since` for nginx's log files.
# argv[1] is JSON: since (UTC epoch seconds), headers (true: stdin is `tail -F` of several files, each
# part after a "==> FILE <==" line, which is not copied). Copies the lines of stdin from the first one
# stamped at or after it (a line without a time of its own goes with the line before it in the same
# file), line by line (--follow).
import json
import sys

args = json.loads(sys.argv[1])
since, headers = args["since"], args.get("headers", False)
keep = {}  # file (None without headers): whether its last line stamped was kept
name, blank = None, False
for line in iter(sys.stdin.readline, ""):
    if headers and line.startswith("==> ") and line.rstrip("\n").endswith(" <=="):
        name, blank = line[4:].rstrip("\n")[:-4], False  # tail's blank line before a header: dropped
        continue
    if headers and blank:
        blank = False
        if keep.get(name):
            sys.stdout.write("\n")
    if headers and line == "\n":
        blank = True  # held: it may be tail's, before a header
        continue
    when = line_time(line)
    if when is not None:
        keep[name] = when >= since
    if keep.get(name):
        sys.stdout.write(line)
        sys.stdout.flush()
