# Installed on the managed host by the deploy (app.monitor), run by its systemd timer as root every
# app.monitor seconds (stdlib python3, after lib_http): the app's health, checked through nginx as the
# deploy's check does. After `failures` failed checks in a row it restarts the live slot's unit (the
# live slot read from the nginx upstream file, root's) and POSTs the webhook (event "down"); the
# first good check after that POSTs "recovered". A failing webhook is logged, never blocks a restart.
# argv[1]: its config file (root's alone: it holds the webhook), JSON: app, url, host, timeout,
# restart_timeout (seconds systemctl restart may take), failures, webhook (or ""), state (root's alone), upstream_file, lock (the deploy lock), slots:
# {slot: {address, unit, link}} (address as the upstream file names it: unix:<socket>, or a container app's
# 127.0.0.1:<port>). Its count lives in the state file between runs, with the live slot and release it
# counts for: a deploy or rollback (another live slot or release) starts it again from 0.
import json
import os
import socket
import subprocess
import sys

STATE = {"failures": 0, "down": False}


def decide(state, healthy, needed):
    """(new state, actions): the pure heart. Actions, in order: "restart", "down", "recovered"."""
    if healthy:
        return dict(STATE, live=state.get("live")), (["recovered"] if state.get("down") else [])
    failures = state.get("failures", 0) + 1
    if failures < needed or failures % needed:
        return dict(state, failures=failures), []
    # every `needed` failures in a row: a restart; the webhook hears of the first only
    return dict(state, failures=failures, down=True), ["restart"] + ([] if state.get("down") else ["down"])


def load_state(path):
    try:
        with open(path) as fh:
            got = json.load(fh)
        return got if isinstance(got, dict) else dict(STATE)
    except (OSError, ValueError):
        return dict(STATE)


def save_state(path, state):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh)
    os.rename(tmp, path)


def deploy_running(lock):
    """A deploy holds the app's lock (its flock, as /proc/locks lists it): this round is skipped.
    Read only: taking the lock, even briefly, could turn a deploy away."""
    try:
        st = os.stat(lock)
        with open("/proc/locks") as fh:
            locks = fh.read().splitlines()
    except OSError:
        return False
    # the whole of what /proc/locks names a file by: its device (the kernel's "%02x:%02x", major and minor)
    # and inode; the inode alone, the app could lock a file of its own (in /dev/shm, say) with that number
    mine = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in locks:
        words = line.split()
        if len(words) > 5 and words[1] == "FLOCK" and words[5] == mine:
            return True
    return False


def healthy(c):
    where, path = split_url(c["url"])
    try:
        status, _ = http_get(where, path, c["host"] or where, timeout=c["timeout"])
    except OSError as e:
        return False, str(e) or type(e).__name__
    return 200 <= status < 300, "HTTP %d" % status


def live_slot(c):
    """The slot the nginx upstream file (root's) sends traffic to, or None."""
    try:
        with open(c["upstream_file"]) as fh:
            text = fh.read()
    except OSError:
        return None
    for slot, v in sorted(c["slots"].items()):
        if "server %s " % v["address"] in text:
            return slot
    return None


def release_of(c, slot):
    try:
        return os.path.basename(os.readlink(c["slots"][slot]["link"])) if slot else None
    except OSError:
        return None


def post(c, event, failures, release, why):
    if not c["webhook"]:
        return
    import urllib.request  # only when there is one to call: it is slow to import
    host = socket.gethostname()
    text = ("%s on %s is down (%d failed checks: %s); restarted it" % (c["app"], host, failures, why)
            if event == "down" else "%s on %s has recovered" % (c["app"], host))
    body = json.dumps({"text": text, "host": host, "app": c["app"], "event": event, "failures": failures,
                       "release": release}).encode()
    request = urllib.request.Request(c["webhook"], data=body, headers={"Content-Type": "application/json",
                                                                        "User-Agent": "provision-monitor"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as answer:
            answer.read()
        print("webhook: %s sent" % event)
    except Exception as e:  # never the URL, nor any part of it, in the journal: it is a secret
        print("webhook: %s not sent: %s" % (event, webhook_error(e)), file=sys.stderr)


def webhook_error(e):
    """What went wrong, said without any text of the exception's: that may quote the URL (a port, a host,
    a path). An HTTP status, or the name of the error's type (of its cause, for urllib's URLError)."""
    code = getattr(e, "code", None)
    if isinstance(code, int):
        return "HTTP Error %d" % code
    reason = getattr(e, "reason", None)
    return type(reason if isinstance(reason, BaseException) else e).__name__


def main(config):
    with open(config) as fh:
        c = json.load(fh)
    if deploy_running(c["lock"]):
        print("a deploy is running: no check this time")
        return 0
    state = load_state(c["state"])
    slot = live_slot(c)  # before the check: what it checks, and what a restart would restart
    release = release_of(c, slot)
    live = "%s %s" % (slot, release)
    if state.get("live") != live:  # a deploy or rollback since the last check: its failures were another's
        state = dict(state, failures=0, live=live)
    ok, why = healthy(c)
    state, actions = decide(state, ok, c["failures"])
    if deploy_running(c["lock"]) or live_slot(c) != slot:  # a deploy began during the check (up to 5 s)
        print("a deploy began during the check: it does not count")
        return 0
    state["live"] = live
    save_state(c["state"], state)  # first: what comes next may take long (a webhook) or fail
    if not ok:
        print("health check failed (%d in a row): %s" % (state["failures"], why))
    for action in actions:
        if action == "restart":
            if slot is None:
                print("no live slot in %s: nothing to restart" % c["upstream_file"], file=sys.stderr)
                continue
            unit = c["slots"][slot]["unit"]
            # queued, not waited for: a hung app's stop takes up to its graceful timeout, and the webhook
            # and the next checks go on meanwhile
            try:  # a busy systemd: given up after restart_timeout s (the next `failures` checks try again)
                res = subprocess.run(["systemctl", "restart", "--no-block", unit], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, universal_newlines=True,
                                     timeout=c.get("restart_timeout", 15))
            except subprocess.TimeoutExpired:
                print("restart of %s: systemctl gave no answer within %ss" % (unit, c.get("restart_timeout", 15)),
                      file=sys.stderr)
                continue
            print("restarted %s (exit %d) %s" % (unit, res.returncode, res.stdout.strip()))
        else:
            post(c, action, state["failures"] if action == "down" else 0, release, why)
            if action == "recovered":
                print("health check passes again")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
