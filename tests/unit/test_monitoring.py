"""Monitoring, pure and local: what `fab status` makes of its numbers (and the program collecting them, run
here on fake files), `fab logs --since/--grep` (the time, the command, the filter), the monitor's settings,
steps and program (run here with a fake systemctl, a local app and a local webhook)."""

import http.server
import json
import os
import shlex
import sys
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from provision import config as cfg
from provision import logs, monitor, remote, secrets, status
from provision.errors import ProvisionError
from provision.facts import Facts
from provision.layout import Layout
from provision.steps import plan

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 24, 6, 30, 15, tzinfo=timezone.utc)


def build(**over):
    return cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, over), ROOT)


def run(command, **env):
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **env))


def lib(name: str) -> dict:
    """A remote library's functions, to call here."""
    space: dict = {}
    exec(remote.text(name), space)
    return space


# -- status: the decisions


def test_the_health_verdict():
    assert status.health_verdict({"status": 200, "error": None, "seconds": 0.012}) == (True, "ok (200, 12 ms)")
    assert status.health_verdict({"status": 502, "error": None}) == (False, "FAILING (HTTP 502)")
    assert status.health_verdict({"status": 0, "error": "timed out"}) == (False, "DOWN (timed out)")
    assert status.health_verdict({"status": 0, "error": None}) == (False, "FAILING (not HTTP)")


def test_the_request_rate_and_5xx_ratio_over_the_window_or_what_was_read_of_it():
    assert status.request_rate({"count": 30, "errors": 3, "window": 300, "covered": 100, "cut": False}) == (0.1, 0.1, 300)
    assert status.request_rate({"count": 0, "errors": 0, "window": 300, "covered": 0, "cut": False}) == (0, None, 300)
    # the bytes read held only the last 60 s: the rate is over those
    assert status.request_rate({"count": 120, "errors": 0, "window": 300, "covered": 60, "cut": True}) == (2, 0, 60)


def test_cpu_between_two_readings():
    assert status.cpu_percent([1_000_000, 10.0], [1_500_000, 11.0]) == 50
    assert status.cpu_percent(None, [1, 2]) is None
    assert status.cpu_percent([5, 3.0], [1, 4.0]) is None  # a restarted unit: its counter began again


def test_sizes_ages_disk_and_certificate_days():
    assert status.human_bytes(512) == "512 B" and status.human_bytes(3 * 1024 ** 2) == "3.0 MiB"
    assert [status.human_age(s) for s in (5, 600, 7300, 3 * 86400 + 3600)] == ["5s", "10m", "2h01m", "3d1h"]
    assert status.disk_use({"total": 100 << 30, "free": 25 << 30, "used": 70 << 30}) == (75.0, "75.0 GiB of 100.0 GiB (75%)")
    assert status.disk_use(None) is None
    assert status.cert_days("Dec 24 06:30:15 2026 GMT", NOW.timestamp()) == 30
    assert status.cert_days("Dec  4 06:30:14 2026 GMT", NOW.timestamp()) == 9
    assert status.cert_days("unknown", NOW.timestamp()) is None


LOG = "\n".join(json.dumps(e) for e in [
    {"action": "deploy", "release": "r1", "time": "2026-11-23T06:30:15Z", "by": "ann"},
    {"action": "deploy", "release": "r2", "time": "2026-11-24T05:30:15Z", "by": "bob"},
    {"action": "rollback", "release": "r1", "time": "2026-11-24T06:00:15Z", "by": "ann"},
]) + "\n"


def collected(**over):
    got = {"now": NOW.timestamp(), "health": {"status": 200, "error": None, "seconds": 0.004},
           "units": {"hello@a": {"active": True}, "hello@b": {"active": False}, "nginx": {"active": True}},
           "cpu": {"before": [0, 1.0], "after": [250_000, 1.5]}, "memory": 50 << 20,
           "requests": {"count": 60, "errors": 6, "log": True, "cut": False, "covered": 290, "window": 300},
           "current": "r1", "release_log": LOG, "upstream": Layout("hello").upstream("a"), "uptime": 86400 * 2,
           "os": "debian 12", "disk": {"total": 10 << 30, "free": 5 << 30, "used": 5 << 30}, "cert": None}
    got.update(over)
    return got


def test_the_report_of_a_healthy_host():
    r = status.report("web1", build(), collected())
    assert r.problems == []
    assert r.lines == [
        "web1: release r1; hello@a running, nginx running; up 2.0 days; debian 12; live for 30m",
        "web1: health ok (200, 4 ms); 0.20 req/s, 5xx 10.0% over 5 min (HIGH)",
        "web1: memory 50.0 MiB; cpu 50.0%; disk 5.0 GiB of 10.0 GiB (50%)",
        "web1: last rollback r1 at 2026-11-24T06:00:15Z by ann",
    ]


def test_the_report_says_what_is_wrong_and_counts_it():
    r = status.report("web1", build(tls=True, server_name="example.com"), collected(
        health={"status": 0, "error": "timed out", "seconds": 5}, units={"hello@a": {"active": False}, "nginx": {"active": True}},
        cpu={"before": None, "after": [5, 2.0]}, cert="Dec  4 06:30:14 2026 GMT",
        requests={"count": 0, "errors": 0, "log": True, "cut": False, "covered": 0, "window": 300}))
    assert r.problems == ["hello@a not running", "health check / DOWN (timed out)"]
    assert "hello@a STOPPED" in r.lines[0]
    assert r.lines[1] == "web1: health DOWN (timed out); no requests over 5 min"
    assert r.lines[2].endswith("cpu ?; disk 5.0 GiB of 10.0 GiB (50%); certificate expires in 9 days (SOON)")
    # --watch: the CPU since the last refresh's reading
    r = status.report("web1", build(), collected(cpu={"before": None, "after": [1_000_000, 3.0]}), [0, 1.0])
    assert "cpu 50.0%" in r.lines[2]


# -- status: the program collecting the numbers, run here


def test_the_status_program_collects_the_numbers(tmp_path):
    now = time.time()

    def stamp(t):
        return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(t))

    lines = [f'10.0.0.1 - - [{stamp(now - 900)}] "GET /old HTTP/1.1" 500 5 "-" "x"']  # outside the window
    lines += [f'10.0.0.1 - - [{stamp(now - 100 + i)}] "GET /p HTTP/1.1" {500 if i % 4 == 0 else 200} 5 "-" "x"'
              for i in range(20)]
    (tmp_path / "access.log").write_text("\n".join(lines) + "\n")
    (tmp_path / "releases.log").write_text(LOG)
    (tmp_path / "releases" / "r1").mkdir(parents=True)
    (tmp_path / "current").symlink_to("releases/r1")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text("#!/bin/sh\nprintf 'Id=hello@a.service\\nActiveState=active\\n"
                                                "ControlGroup=\\n\\nId=nginx.service\\nActiveState=failed\\nControlGroup=\\n'\n")
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    s = build()
    args = json.loads(shlex.split(status.command(s))[-1])
    args.update(url="http://127.0.0.1:9/", units=["hello@a", "nginx"], access_log=str(tmp_path / "access.log"),
                release_log=str(tmp_path / "releases.log"), current=str(tmp_path / "current"),
                upstream_file=str(tmp_path / "none"), root=str(tmp_path), sample=0.05)
    res = run(remote.python("status.py", args), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["health"]["status"] == 0 and got["health"]["error"]  # nothing listens on port 9
    assert got["units"] == {"hello@a": {"active": True}, "nginx": {"active": False}}
    assert (got["requests"]["count"], got["requests"]["errors"], got["requests"]["cut"]) == (20, 5, False)
    assert got["current"] == "r1" and got["release_log"] == LOG and got["cert"] is None
    assert 0 < got["disk"]["free"] <= got["disk"]["total"]
    # only the newest bytes are read: then the rate is over what they hold
    args["tail_bytes"] = len(lines[-1]) * 5
    got = json.loads(run(remote.python("status.py", args), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}").stdout)
    assert got["requests"]["cut"] and 3 <= got["requests"]["count"] <= 4 and got["requests"]["covered"] < 100


def status_of_log(tmp_path, lines: list[str] | bytes, before: list[str] | None = None, **over) -> dict:
    """The requests the status program counts in an access log of ``lines`` (and ``before`` in <log>.1)."""
    (tmp_path / "access.log").write_bytes(lines if isinstance(lines, bytes) else "".join(l + "\n" for l in lines).encode())
    if before is not None:
        (tmp_path / "access.log.1").write_text("".join(l + "\n" for l in before))
    if not (tmp_path / "bin" / "systemctl").exists():
        (tmp_path / "bin").mkdir(exist_ok=True)
        (tmp_path / "bin" / "systemctl").write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / "bin" / "systemctl").chmod(0o755)
    args = json.loads(shlex.split(status.command(build()))[-1])
    none = str(tmp_path / "none")
    args.update(dict(url="http://127.0.0.1:9/", units=[], access_log=str(tmp_path / "access.log"), release_log=none,
                     current=none, upstream_file=none, root=str(tmp_path), sample=0), **over)
    res = run(remote.python("status.py", args), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert res.returncode == 0, res.stderr
    (tmp_path / "status.json").write_text(res.stdout)
    return json.loads(res.stdout)["requests"]


def access_line(t: float, code: int = 200, user: str = "-") -> str:
    return f'10.0.0.1 - {user} [{time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(t))}] "GET /p HTTP/1.1" {code} 5 "-" "x"'


def test_a_log_rotated_within_the_window_gives_the_rate_since(tmp_path):
    """30 s of log at 1 request a second, nothing older (rotated 30 s ago, no access.log.1): 1 req/s, not
    30 requests over the whole 5 minutes."""
    now = time.time()
    req = status_of_log(tmp_path, [access_line(now - 30 + i) for i in range(30)])
    rate, _, seconds = status.request_rate(req)
    assert req["count"] == 30 and 28 <= seconds <= 35 and 0.85 <= rate <= 1.05


def test_the_log_before_rotation_is_read_too(tmp_path):
    now = time.time()
    before = [access_line(now - 400)] + [access_line(now - 200 + i, 500) for i in range(10)]
    req = status_of_log(tmp_path, [access_line(now - 30 + i) for i in range(30)], before)
    assert (req["count"], req["errors"], req["cut"]) == (40, 10, False)
    assert status.request_rate(req)[2] == 300


def test_the_whole_log_read_is_not_cut_whatever_its_bytes_decode_to(tmp_path):
    """Bytes that are not UTF-8 (a user agent's) decode to U+FFFD, 3 bytes each: the text re-encoded is longer
    than the file; whether the read was cut is the file's size against tail_bytes."""
    now = time.time()
    data = "".join(access_line(now - 60 + i).replace('"x"', '"\udcff\udcff\udcff"') + "\n" for i in range(3))
    req = status_of_log(tmp_path, data.encode("utf-8", "surrogateescape"), tail_bytes=len(data) + 2)
    assert (req["count"], req["cut"]) == (3, True) and 58 <= req["covered"] <= 65


def test_a_cgroups_memory_is_without_its_page_cache(tmp_path):
    """memory.current counts the page cache (the files the app read); the fallback, RSS, does not: the
    figure is memory.current less memory.stat's file, as close to RSS as the cgroup says."""
    group = tmp_path / "cg" / "system.slice" / "hello@a.service"
    group.mkdir(parents=True)
    (group / "memory.current").write_text(str(300 << 20) + "\n")
    (group / "memory.stat").write_text(f"anon {40 << 20}\nfile {250 << 20}\nkernel 0\n")
    (group / "cpu.stat").write_text("usage_usec 1000\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text("#!/bin/sh\nprintf 'Id=hello@a.service\\nActiveState=active\\n"
                                                "ControlGroup=/system.slice/hello@a.service\\n'\n")
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    status_of_log(tmp_path, [], units=["hello@a"], cgroups=["hello@a"], cgroup_roots=[str(tmp_path / "cg")])
    got = json.loads((tmp_path / "status.json").read_text())
    assert (got["memory"], got["usage_from"]) == (50 << 20, "cgroup")


def test_a_container_apps_containers_count_in_its_memory_and_cpu(tmp_path):
    """The engine runs a container in a cgroup of its own (under the app's slice, --cgroup-parent), not in
    its slot unit's, which holds only the engine's client: both count. Where the cgroups have no counters
    (no memory controller, as in a sandbox droplet), the RSS of the processes in the slice's groups below."""
    from .test_containers import app

    slices = json.loads(shlex.split(status.command(app(tmp_path)))[-1])["slices"]
    assert slices == [["/provision.slice/provision-hello.slice", "/provision-hello.slice"]]
    assert json.loads(shlex.split(status.command(build()))[-1])["slices"] == []
    v2, pids = tmp_path / "v2", tmp_path / "pids"
    for group, mib, usec in (("system.slice/hello@a.service", 10, 1000), ("provision.slice/provision-hello.slice", 60, 5000)):
        (v2 / group).mkdir(parents=True)
        (v2 / group / "memory.current").write_text(str(mib << 20) + "\n")
        (v2 / group / "cpu.stat").write_text(f"usage_usec {usec}\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text("#!/bin/sh\nprintf 'Id=hello@a.service\\nActiveState=active\\n"
                                                "ControlGroup=/system.slice/hello@a.service\\n'\n")
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    status_of_log(tmp_path, [], units=["hello@a"], cgroups=["hello@a"], cgroup_roots=[str(v2)], slices=slices, sample=0)
    got = json.loads((tmp_path / "status.json").read_text())
    assert (got["memory"], got["cpu"]["after"][0], got["usage_from"]) == (70 << 20, 6000, "cgroup")
    # no counters: a container's process (50 MiB), in a scope below the slice (docker's cgroupfs driver's path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(50 << 20); print(1, flush=True); "
                               "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        (pids / "provision-hello.slice" / "docker-1.scope").mkdir(parents=True)
        (pids / "provision-hello.slice" / "docker-1.scope" / "cgroup.procs").write_text(f"{holder.pid}\n")
        (pids / "provision-hello.slice" / "cgroup.procs").write_text("")
        status_of_log(tmp_path, [], units=[], cgroups=[], cgroup_roots=[str(pids)], slices=slices, sample=0)
    finally:
        holder.kill()
        holder.wait()
    got = json.loads((tmp_path / "status.json").read_text())
    assert got["memory"] >= 50 << 20 and got["usage_from"] == "processes", got


def test_a_busy_systemd_is_no_app_down(tmp_path):
    """`systemctl show` gives no answer in time: the services' states are unknown, not stopped."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text("#!/bin/sh\nexec sleep 10\n")
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    req = status_of_log(tmp_path, [access_line(time.time() - 5)], systemd_timeout=1, units=["hello@a", "nginx"])
    got = json.loads((tmp_path / "status.json").read_text())
    assert got["units"] is None and req["count"] == 1
    got.update(upstream=Layout("hello").upstream("a"), health={"status": 200, "error": None, "seconds": 0.01})
    r = status.report("web1", build(), got)
    assert r.problems == [] and "service states unknown (systemd busy)" in r.lines[0]
    assert r.lines[2].startswith("web1: memory ?; cpu ?;") and status.cpu_reading(got) is None


def test_a_stuck_status_says_where(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text("#!/bin/sh\nexec sleep 10\n")
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    with pytest.raises(AssertionError, match="stopped after 1s, stuck in services"):
        status_of_log(tmp_path, [], alarm=1, units=["nginx"])


@pytest.mark.parametrize("openssl", [True, False])
def test_the_status_program_reads_the_certificates_expiry(tmp_path, openssl):
    cert = tmp_path / "fullchain.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(cert), "-days", "30", "-subj", "/CN=example.com"], capture_output=True, check=True)
    args = json.loads(shlex.split(status.command(build(tls=True, server_name="example.com")))[-1])
    assert args["certificate"] == "/etc/letsencrypt/live/hello/fullchain.pem"
    args.update(url="http://127.0.0.1:9/", units=[], certificate=str(cert), sample=0, access_log=str(tmp_path / "none"),
                current=str(tmp_path / "none"), release_log=str(tmp_path / "none"), upstream_file=str(tmp_path / "none"),
                root=str(tmp_path))
    (tmp_path / "bin").mkdir()
    for fake in ["systemctl"] + ([] if openssl else ["openssl"]):  # a missing openssl: exec fails like one absent
        (tmp_path / "bin" / fake).write_text("#!/bin/sh\nexit 0\n" if fake == "systemctl" else "")
        (tmp_path / "bin" / fake).chmod(0o755 if fake == "systemctl" else 0o644)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"} if openssl else {"PATH": f"{tmp_path / 'bin'}"}
    res = subprocess.run([sys.executable, "-c", remote.source("status.py"), json.dumps(args)],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0, res.stderr
    assert status.cert_days(json.loads(res.stdout)["cert"], time.time()) in (29, 30)


def test_provisions_own_health_checks_are_not_in_the_access_log():
    """From the host itself to health_path: provision's checks (deploy, status, the monitor), not visitors."""
    from provision.app import rendered
    site = rendered(build(health_path='/up"\\'), "nginx-site.conf.j2").decode()
    assert ('map "$remote_addr $request_uri" $provision_access_hello {\n    "127.0.0.1 /up\\"\\\\" 0;\n'
            '    "::1 /up\\"\\\\" 0;\n    default 1;\n}') in site
    assert "access_log /var/log/nginx/hello.access.log combined if=$provision_access_hello;" in site


def test_nginx_log_times_and_statuses():
    t = lib("lib_logtime.py")
    line = '1.2.3.4 - - [24/Nov/2026:06:30:15 +0100] "GET /a\\x22 b HTTP/1.1" 503 12 "-" "curl"'
    assert t["access_time"](line) == NOW.timestamp() - 3600
    assert t["access_status"](line) == 503 and t["line_time"](line) == NOW.timestamp() - 3600
    assert t["access_time"]("garbage [x]") is None and t["access_status"]("garbage") is None
    # a user name (from any Authorization: Basic header) with brackets: the time is still the request's
    for user in ("[x", "x]", "[24/Nov/2026:01:00:00 +0000]", "]["):
        tricky = line.replace(" - - ", f" - {user} ")
        assert t["access_time"](tricky) == NOW.timestamp() - 3600 and t["access_status"](tricky) == 503, user
    assert t["error_time"]("2026/11/24 06:30:15 [error] 12#12: boom") == time.mktime((2026, 11, 24, 6, 30, 15, 0, 0, -1))


# -- logs


@pytest.mark.parametrize("text, expected", [
    ("10m", datetime(2026, 11, 24, 6, 20, 15, tzinfo=timezone.utc)),
    ("2h", datetime(2026, 11, 24, 4, 30, 15, tzinfo=timezone.utc)),
    ("1d", datetime(2026, 11, 23, 6, 30, 15, tzinfo=timezone.utc)),
    ("30s ago", datetime(2026, 11, 24, 6, 29, 45, tzinfo=timezone.utc)),
    ("today", datetime(2026, 11, 24, tzinfo=timezone.utc)),
    ("Yesterday", datetime(2026, 11, 23, tzinfo=timezone.utc)),
    ("2026-11-24 05:00", datetime(2026, 11, 24, 5, 0, tzinfo=timezone.utc)),
    ("2026-11-24T05:00:07Z", datetime(2026, 11, 24, 5, 0, 7, tzinfo=timezone.utc)),
    ("2026-11-20", datetime(2026, 11, 20, tzinfo=timezone.utc)),
])
def test_since_is_one_utc_time(text, expected):
    assert logs.parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["next tuesday", "10 parsecs", "2026-13-01", ""])
def test_since_that_means_nothing_is_one_line(text):
    with pytest.raises(ProvisionError, match="expected 10m, 2h, 1d, today"):
        logs.parse_since(text, NOW)


def test_the_logs_command_chooses_lines_on_the_host():
    plain = logs.command(["hello@a", "nginx"], ["/a.log"], 20, False)
    assert plain == ("journalctl -u hello@a -u nginx --no-pager -o short-iso -n 20 & j=$!; "
                     'for f in /a.log; do tail -n 20 "$f" 2>/dev/null; done & f=$!; wait $j; s=$?; wait $f; exit $s')
    since = datetime(2026, 11, 24, 5, 0, tzinfo=timezone.utc)
    cmd = logs.command(["hello@a"], ["/a.log"], 5, False, since, "it's (a|b)")
    assert "--since '2026-11-24 05:00:00 UTC'" in cmd and " -n 5" not in cmd.split(" | ")[0]
    assert "grep -E --line-buffered -e 'it'\"'\"'s (a|b)' | tail -n 5" in cmd
    assert "grep -hE -e 'it'\"'\"'s (a|b)' \"$f\"" in cmd and "log_filter.py" in cmd
    follow = logs.command(["x.worker.service"], [], 5, True, None, "boom")
    assert follow.endswith('{ journalctl -u x.worker.service --no-pager -o short-iso -n 5 -f | grep -E --line-buffered '
                           '-e boom; exit "${PIPESTATUS[0]}"; }')
    with pytest.raises(ProvisionError, match="--grep"):
        logs.command(["u"], [], 5, False, None, "a\nb")


def test_the_logs_command_runs_here(tmp_path):
    log = tmp_path / "a.log"
    log.write_text('1 - - [24/Nov/2026:04:59:59 +0000] "GET /old HTTP/1.1" 200 1\n'
                   '1 - - [24/Nov/2026:05:00:00 +0000] "GET /new HTTP/1.1" 200 1\n'
                   '1 - - [24/Nov/2026:05:00:01 +0000] "GET /other HTTP/1.1" 200 1\n')
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "journalctl").write_text("#!/bin/sh\necho 'journal GET /new line'; echo 'journal else'\n")
    (tmp_path / "bin" / "journalctl").chmod(0o755)
    cmd = logs.command(["u"], [str(log)], 10, False, datetime(2026, 11, 24, 5, 0, tzinfo=timezone.utc), "GET /(new|old)")
    res = run(cmd, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert sorted(res.stdout.splitlines()) == ['1 - - [24/Nov/2026:05:00:00 +0000] "GET /new HTTP/1.1" 200 1',
                                               "journal GET /new line"]


def fake_journal(tmp_path, script="echo 'journal line'") -> dict:
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "journalctl").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "bin" / "journalctl").chmod(0o755)
    return {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}


@pytest.mark.parametrize("files", [True, False])
def test_a_pattern_the_hosts_grep_refuses_is_one_line_and_exit_2(tmp_path, files):
    (tmp_path / "a.log").write_text("x\n")
    res = run(logs.command(["u"], [str(tmp_path / "a.log")] if files else [], 5, False, None, "("), **fake_journal(tmp_path))
    assert res.returncode == 2 and "grep: Unmatched ( or \\(" in res.stderr and res.stdout == ""


@pytest.mark.parametrize("grep", [None, "boom"])
def test_journalctls_failure_is_the_commands(tmp_path, grep):
    (tmp_path / "a.log").write_text("boom\n")
    env = fake_journal(tmp_path, "echo 'Failed to parse timestamp: x' >&2; exit 1")
    res = run(logs.command(["u"], [str(tmp_path / "a.log")], 5, False, None, grep), **env)
    assert res.returncode == 1 and "Failed to parse timestamp" in res.stderr and res.stdout == "boom\n"
    # no line matching is no failure
    res = run(logs.command(["u"], [str(tmp_path / "a.log")], 5, False, None, "nothing"), **fake_journal(tmp_path))
    assert res.returncode == 0 and res.stdout == ""


@pytest.mark.parametrize("text", ["999999d", "999999w", "0001-01-01", "1969-12-31 23:59"])
def test_since_long_ago_is_1970(text):
    assert logs.parse_since(text, NOW) == datetime(1970, 1, 1, tzinfo=timezone.utc)


class LocalRemote:
    """A host's connection that runs each command here (sudo dropped), with ``env``."""
    sudo = ""

    def __init__(self, env):
        self.env, self.closed = env, False

    def exec(self, command, timeout=None, on_line=None, **kw):
        res = run(command, **self.env)
        for line in res.stdout.splitlines():
            on_line(line) if on_line else None
        return res.returncode, res.stdout, res.stderr

    def close(self):
        self.closed = True


@pytest.fixture
def one_host(monkeypatch):
    """`fab` tasks of provision.cli.info on one host, web1, whose commands run here."""
    from provision.cli import info
    from provision.hosts import Job
    from provision.inventory import Target
    host = {"env": {}, "remotes": []}

    def connect(job, c):
        host["remotes"].append(LocalRemote(host["env"]))
        return host["remotes"][-1]

    monkeypatch.setattr(info, "jobs", lambda c, flags: [Job(Target("web1", "10.0.0.1"), build())])
    monkeypatch.setattr(info, "connect_job", connect)
    return host


class ScriptedRemote:
    """A connection whose exec does what ``act`` says: waits until closed (then -1, as paramiko's lost
    channel), or returns what it is given."""
    sudo = ""

    def __init__(self, act):
        self.act, self.closed = act, threading.Event()

    def exec(self, command, timeout=None, on_line=None, **kw):
        what = self.act()
        if what == "hang":
            self.closed.wait(timeout)
            return -1, "", ""
        return what

    def close(self):
        self.closed.set()


def test_ctrl_c_in_watch_ends_the_command_in_flight_at_once(one_host, monkeypatch):
    import signal
    from provision.cli import info
    monkeypatch.setattr(info, "connect_job", lambda job, c: one_host["remotes"].append(ScriptedRemote(lambda: "hang"))
                        or one_host["remotes"][-1])
    main = threading.get_ident()
    timer = threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT))
    started = time.time()
    timer.start()
    info.show_status(None, watch=True)  # Ctrl-C: the way out, exit 0
    assert time.time() - started < 10 and one_host["remotes"][0].closed.is_set()


def test_a_connection_lost_in_watch_is_dropped_and_made_again(one_host, monkeypatch, capsys):
    from invoke import Exit

    from provision.cli import info
    acts = iter([(-1, "", ""), KeyboardInterrupt])

    def act():
        what = next(acts)
        if what is KeyboardInterrupt:
            raise KeyboardInterrupt
        return what

    monkeypatch.setattr(info, "connect_job", lambda job, c: one_host["remotes"].append(ScriptedRemote(act))
                        or one_host["remotes"][-1])
    monkeypatch.setattr(info.time, "sleep", lambda s: None)
    info.show_status(None, watch=True)
    assert len(one_host["remotes"]) == 2 and one_host["remotes"][0].closed.is_set()
    assert "web1: lost the SSH connection; check the host; the next refresh connects again" in capsys.readouterr().err
    acts = iter([(-1, "", "")])
    with pytest.raises(Exit) as e:
        info.show_status(None)
    assert e.value.code == 3


def test_fab_logs_says_what_the_host_refused_in_one_line(one_host, tmp_path, capsys):
    from invoke import Exit

    from provision.cli.info import show_logs
    one_host["env"] = fake_journal(tmp_path)
    with pytest.raises(Exit) as e:
        show_logs(None, grep="(")
    assert e.value.code == 2 and "\n" not in str(e.value.message or "")
    assert "web1: --grep '(': grep: Unmatched ( or \\(" in capsys.readouterr().err + str(e.value.message or "")
    one_host["env"] = fake_journal(tmp_path, "echo 'Failed to parse timestamp: x' >&2; exit 1")
    with pytest.raises(Exit) as e:
        show_logs(None, since="1d")
    assert e.value.code == 1
    assert "web1: reading the logs failed (1): Failed to parse timestamp: x" in capsys.readouterr().err
    one_host["env"] = fake_journal(tmp_path)
    show_logs(None, since="999999d")  # before 1970: since 1970
    assert "web1 | journal line" in capsys.readouterr().out


def test_the_since_filter_starts_afresh_in_each_file(tmp_path):
    """The access log's last line is new; the error log's first lines go with an old entry whose stamped
    line was before the lines read: they are not the access log's."""
    (tmp_path / "access.log").write_text('1 - - [24/Nov/2026:06:30:16 +0000] "GET /new HTTP/1.1" 200 1\n')
    (tmp_path / "error.log").write_text("  old trace\n2026/11/24 06:30:17 [error] new\n")
    cmd = logs.command(["u"], [str(tmp_path / "access.log"), str(tmp_path / "error.log")], 5, False, NOW)
    res = run(cmd, TZ="UTC", **fake_journal(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "old trace" not in res.stdout and "[error] new" in res.stdout and "GET /new" in res.stdout
    # --follow: one tail -F for both files, its headers telling the filter where each part begins
    follow = remote.python("log_filter.py", {"since": NOW.timestamp(), "headers": True})
    res = subprocess.run(["bash", "-c", follow], capture_output=True, text=True, timeout=30, env=dict(os.environ, TZ="UTC"),
                         input="==> a <==\n2026/11/24 06:30:16 [error] new\n\n==> b <==\n  old trace\n"
                               "2026/11/24 06:30:14 [error] old\n\n==> a <==\n  more new\n\n  after a blank\n")
    assert res.stdout == "2026/11/24 06:30:16 [error] new\n  more new\n\n  after a blank\n"


def test_the_since_filter_keeps_continuation_lines():
    res = subprocess.run(["bash", "-c", remote.python("log_filter.py", {"since": NOW.timestamp()})],
                         input="2026/11/24 06:30:14 [error] old\n  more old\n2026/11/24 06:30:16 [error] new\n  more new\n",
                         capture_output=True, text=True, timeout=30, env=dict(os.environ, TZ="UTC"))
    assert res.stdout == "2026/11/24 06:30:16 [error] new\n  more new\n"


# -- the monitor: settings


def test_the_monitor_settings():
    s = build()
    assert (s.monitor, s.monitor_failures, s.monitor_webhook) == (0, 3, "")
    s = build(monitor="30", monitor_failures="2", monitor_webhook="https://hooks.example/T0/secret")
    assert (s.monitor, s.monitor_failures) == (30, 2) and "https://hooks.example/T0/secret" in s.secrets
    assert build(monitor=False).monitor == 0 and build(monitor="off").monitor == 0


@pytest.mark.parametrize("over, message", [
    ({"monitor": "2"}, "invalid setting app.monitor='2': expected a whole number from 5 to 86400"),
    ({"monitor": True}, "invalid setting app.monitor=True: expected the seconds between checks"),
    ({"monitor": 30, "monitor_failures": 0}, "app.monitor_failures=0: expected a whole number from 1 to 100"),
    ({"monitor": 30, "monitor_webhook": "ftp://x/very-secret"}, "app.monitor_webhook='****': expected an http:// or https:// URL"),
    ({"monitor_webhook": "https://x/very-secret"}, "app.monitor_webhook='****': it is called by the health monitor, which is off"),
    ({"monitor": 30, "monitor_webhook": "https://user:very-secret@x/hook"}, "expected an http:// or https:// URL without"),
    ({"monitor": 30, "monitor_webhook": "https://very-secret@x/hook"}, "expected an http:// or https:// URL without"),
])
def test_bad_monitor_settings_give_one_line(over, message):
    with pytest.raises(ProvisionError) as e:
        build(**over)
    assert message in str(e.value) and "very-secret" not in str(e.value) and "\n" not in str(e.value)


# -- the monitor: its steps


def test_the_monitor_is_installed_root_only_and_its_timer_runs_every_n_seconds():
    s = build(monitor=20, monitor_webhook="https://hooks.example/very-secret")
    by_path = {getattr(st, "path", st.name): st for st in monitor.steps(s)}
    lay = s.layout
    config = by_path[lay.monitor_config]
    assert config.mode == 0o600 and config.sensitive and b"very-secret" in config.content
    assert json.loads(config.content)["slots"]["a"] == {"address": f"unix:{lay.socket('a')}", "unit": "hello@a",
                                                       "link": lay.slot_link("a")}
    assert by_path[lay.monitor_dir].mode == 0o700 and by_path[lay.monitor_program].mode == 0o700
    timer = by_path[lay.monitor_timer_file].content.decode()
    assert "OnActiveSec=20s\nOnUnitActiveSec=20s\nAccuracySec=1s" in timer
    unit = by_path[lay.monitor_service_file].content.decode()
    assert "very-secret" not in unit and f"ExecStart=/usr/bin/python3 {lay.monitor_program} {lay.monitor_config}" in unit
    assert f"ReadWritePaths={lay.monitor_dir}" in unit and "ProtectSystem=strict" in unit
    planned = plan(monitor.steps(s), Facts({f: None for st in monitor.steps(s) for f in st.facts()}))
    assert [p.status for p in planned].count("change") == len(planned)
    assert planned[-1].change.commands[-1] == "systemctl reload-or-restart provision-monitor-hello.timer"
    secrets.remember(s.secrets)
    assert "very-secret" not in config.diff(None)
    # the commands carry the config as base64 (never masked: the secret is not there as text); what is
    # shown of them, --verbose's lines, must hold none of it
    import base64
    import io

    from provision.output import Printer
    payload = [l for l in base64.encodebytes(config.content).decode().splitlines() if len(l) > 8]
    assert any(l in c for c in planned[4].change.commands for l in payload)  # the place looked at
    shown = io.StringIO()
    printer = Printer(shown, verbose=True)
    for p in planned:
        printer.step("web1", "change", p)
    assert "very-secret" not in shown.getvalue() and not [l for l in payload if l in shown.getvalue()]


def test_without_the_setting_the_monitor_goes():
    lay = Layout("hello")
    gone = monitor.steps(build())
    assert plan(gone, Facts({("file", lay.monitor_timer_file): None, ("file", lay.monitor_service_file): None,
                             ("file", lay.monitor_dir): None}))[0].change is None
    change = plan(gone, Facts({("file", lay.monitor_timer_file): {"type": "file"}, ("file", lay.monitor_service_file): None,
                               ("file", lay.monitor_dir): None}))[0].change
    assert change.commands[0].startswith("systemctl disable --now --quiet provision-monitor-hello.timer")
    assert lay.monitor_dir in change.commands[1]


# -- the monitor: its program, run here


def test_the_monitor_state_machine():
    space: dict = {"__name__": "monitor"}  # not "__main__": the program defines, runs nothing
    exec(remote.source("monitor.py"), space)
    decide = space["decide"]
    state, seen = {"failures": 0, "down": False}, []
    for ok in [False, True, False, False, False, False, False, True, True]:
        state, actions = decide(state, ok, 2)
        seen.append(actions)
    assert seen == [[], [], [], ["restart", "down"], [], ["restart"], [], ["recovered"], []]


@pytest.fixture
def world(tmp_path, request):
    """A local app (answers 200 or 503 as ``world.healthy`` says), a webhook recording what it gets, a fake
    systemctl recording its arguments, and the monitor's config pointing at them. Its slots are a WSGI
    app's (sockets), or a container app's (local ports) when the test asks (indirect parameter True)."""

    class App(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if srv.on_get:
                srv.on_get()
            self.send_response(200 if srv.healthy else 503)
            self.end_headers()

        def do_POST(self):
            srv.posts.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200 if srv.hook_ok else 500)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    srv.healthy, srv.hook_ok, srv.posts, srv.on_get = True, True, [], None
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    port = srv.server_address[1]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/systemctl.log\n")
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    lay = Layout("hello", nginx_dir=str(tmp_path / "nginx"), run_dir=str(tmp_path / "run"), srv_dir=str(tmp_path / "srv"),
                 container=getattr(request, "param", False))
    (tmp_path / "nginx" / "provision").mkdir(parents=True)
    Path(lay.upstream_file).write_text(lay.upstream("b"))
    Path(lay.slots).mkdir(parents=True)
    Path(lay.slot_link("b")).symlink_to("../releases/r7")
    s = build(monitor=5, monitor_failures=2, monitor_webhook=f"http://127.0.0.1:{port}/hook/secret")
    config = monitor.config(s)
    config.update(url=f"http://127.0.0.1:{port}/", state=str(tmp_path / "state.json"), upstream_file=lay.upstream_file,
                  lock=lay.lock, timeout=2, slots=monitor.slots(lay))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "monitor.py").write_text(remote.source("monitor.py"))
    srv.tmp, srv.config, srv.layout = tmp_path, config, lay
    yield srv
    srv.shutdown()


def tick(world):
    res = subprocess.run(["python3", str(world.tmp / "monitor.py"), str(world.tmp / "config.json")], capture_output=True,
                         text=True, timeout=30, env=dict(os.environ, PATH=f"{world.tmp / 'bin'}:{os.environ['PATH']}"))
    assert res.returncode == 0, res.stderr
    return res.stdout + res.stderr


def restarts(world) -> list[str]:
    log = world.tmp / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_monitor_restarts_the_live_slot_after_k_failures_and_says_so_once(world):
    tick(world)
    assert restarts(world) == [] and world.posts == []
    world.healthy = False
    assert "health check failed (1 in a row): HTTP 503" in tick(world)
    assert restarts(world) == [] and world.posts == []
    out = tick(world)
    assert restarts(world) == ["restart --no-block hello@b"] and "restarted hello@b" in out
    (path, body), = world.posts
    assert path == "/hook/secret"
    assert {k: body[k] for k in ("app", "event", "failures", "release")} == {
        "app": "hello", "event": "down", "failures": 2, "release": "r7"}
    assert body["text"] and body["host"]
    tick(world), tick(world)  # still down: restarted again, the webhook told nothing new
    assert restarts(world) == ["restart --no-block hello@b"] * 2 and len(world.posts) == 1
    world.healthy = True
    assert "passes again" in tick(world)
    assert [b["event"] for _, b in world.posts] == ["down", "recovered"]
    tick(world)
    assert len(world.posts) == 2 and json.loads((world.tmp / "state.json").read_text()) == {"failures": 0, "down": False,
                                                                                         "live": "b r7"}
    assert (world.tmp / "state.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("world", [True], indirect=True)
def test_the_monitor_restarts_a_container_apps_live_slot(world):
    """A container app's upstream names its live slot by its local port (server 127.0.0.1:<port>), not a socket."""
    assert Path(world.config["upstream_file"]).read_text().startswith(f"server 127.0.0.1:{world.layout.slot_port('b')} ")
    world.healthy = False
    tick(world)
    out = tick(world)
    assert restarts(world) == ["restart --no-block hello@b"] and "restarted hello@b" in out
    assert [b["event"] for _, b in world.posts] == ["down"] and world.posts[0][1]["release"] == "r7"


def test_a_failing_webhook_is_logged_and_never_stops_the_restart(world):
    world.hook_ok, world.healthy = False, False
    tick(world)
    out = tick(world)
    assert restarts(world) == ["restart --no-block hello@b"]
    assert "webhook: down not sent: HTTP Error 500" in out and "secret" not in out
    world.config["webhook"] = "http://127.0.0.1:9/nothing-listens/secret"  # refused
    (world.tmp / "config.json").write_text(json.dumps(world.config))
    world.healthy = True
    out = tick(world)
    assert "webhook: recovered not sent: ConnectionRefusedError" in out and "secret" not in out


def test_the_monitor_never_prints_any_part_of_the_webhook(world):
    """A URL urllib cannot use (user:password@, which the settings refuse, written here by hand): its error
    quotes the netloc ("nonnumeric port: 'TOKEN@host'"); the monitor says only the error's type."""
    world.config["webhook"] = "http://user:TOKEN@127.0.0.1/hook"
    (world.tmp / "config.json").write_text(json.dumps(world.config))
    world.healthy = False
    tick(world)
    out = tick(world)
    assert restarts(world) == ["restart --no-block hello@b"]
    assert "webhook: down not sent: InvalidURL" in out and "TOKEN" not in out and world.posts == []


def test_the_monitor_skips_a_round_while_a_deploy_holds_the_lock(world):
    import fcntl
    lock = Path(world.config["lock"])
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        world.healthy = False
        assert "a deploy is running" in tick(world)
    assert not (world.tmp / "state.json").exists()


def test_a_lock_on_another_files_inode_number_is_no_deploy(tmp_path):
    """/proc/locks names a file by device and inode: a flock the app holds on a file of its own (a tmpfs
    hands out inode numbers in turn) with the lock's inode number, on another device, is not the deploy's."""
    space: dict = {"__name__": "monitor"}
    exec(remote.source("monitor.py"), space)
    lock = tmp_path / "hello.lock"
    lock.write_text("")
    st = lock.stat()
    real = open

    def proc_locks(dev):
        line = "1: FLOCK  ADVISORY  WRITE 4242 %s:%d 0 EOF\n" % (dev, st.st_ino)
        return lambda path, *a, **k: __import__("io").StringIO(line) if path == "/proc/locks" else real(path, *a, **k)

    space["open"] = proc_locks("%02x:%02x" % (os.major(st.st_dev) + 1, os.minor(st.st_dev)))  # /dev/shm's, say
    assert space["deploy_running"](str(lock)) is False
    space["open"] = proc_locks("%02x:%02x" % (os.major(st.st_dev), os.minor(st.st_dev)))
    assert space["deploy_running"](str(lock)) is True


def test_a_deploy_that_begins_during_the_check_is_never_restarted(world):
    """The deploy takes the lock and switches the upstream while the monitor's check waits: the failure does
    not count and nothing is restarted (the slot the deploy just switched to is warming up)."""
    import fcntl
    world.healthy = False
    tick(world)
    lock = Path(world.config["lock"])
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = []

    def deploy():
        held.append(open(lock, "w"))
        fcntl.flock(held[0], fcntl.LOCK_EX)
        Path(world.config["upstream_file"]).write_text(world.layout.upstream("a"))

    world.on_get = deploy
    out = tick(world)
    held[0].close()
    assert restarts(world) == [] and world.posts == [] and "a deploy began during the check" in out


def test_a_restart_systemd_does_not_answer_is_given_up(world):
    (world.tmp / "bin" / "systemctl").write_text("#!/bin/sh\nexec sleep 30\n")
    world.config["restart_timeout"] = 1
    (world.tmp / "config.json").write_text(json.dumps(world.config))
    world.healthy = False
    tick(world)
    started = time.time()
    out = tick(world)
    assert time.time() - started < 10
    assert "restart of hello@b: systemctl gave no answer within 1s" in out and [b["event"] for _, b in world.posts] == ["down"]


def test_a_deploy_starts_the_count_again(world):
    """Failures counted against the release before a deploy do not restart the one it made live."""
    world.healthy = False
    tick(world)
    assert json.loads((world.tmp / "state.json").read_text())["failures"] == 1
    Path(world.config["slots"]["b"]["link"]).unlink()
    Path(world.config["slots"]["b"]["link"]).symlink_to("../releases/r8")  # deployed (to the same slot)
    assert "failed (1 in a row)" in tick(world) and restarts(world) == []
    assert "failed (2 in a row)" in tick(world) and restarts(world) == ["restart --no-block hello@b"]


@pytest.mark.parametrize("interval", ["0.1", "soon", "7200"])
def test_a_watch_interval_out_of_range_is_one_line_before_any_host(interval):
    from invoke import Exit

    from provision.cli.info import show_status
    with pytest.raises(Exit) as e:
        show_status(None, watch=True, interval=interval)  # no context needed: it stops first
    assert e.value.code == 2 and e.value.message == f"error: --interval {interval!r}: expected seconds from 0.5 to 3600"
