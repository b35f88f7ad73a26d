# Runs on the managed host (stdlib python3, after lib_http): the health check of the HttpCheck step.
# argv[1] is JSON: url, host (the Host header, "" for the URL's), timeout (seconds), expect
# ([header, values]: the answer's header must be one of the values, proof of who answered; or null).
# Exits 0 once the URL answers with a 2xx status (and that header); retried until the timeout.
import json
import sys
import time

a = json.loads(sys.argv[1])
url, expect = a["url"], a["expect"]
where, path = split_url(url)
end, last = time.time() + a["timeout"], "no answer"
while True:
    try:
        status, got = http_get(where, path, a["host"] or where, expect[0] if expect else "")
        if 200 <= status < 300 and (not expect or got in expect[1]):
            sys.exit(0)
        last = "HTTP %d" % status + (", %s: %r" % (expect[0], got) if expect else "")
    except OSError as e:
        last = str(e) or type(e).__name__
    if time.time() > end:
        sys.exit("health check: %s answered %s after %ss" % (url, last, a["timeout"]))
    time.sleep(0.2)
