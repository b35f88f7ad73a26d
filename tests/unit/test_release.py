"""Switch, prune and rollback decisions from recorded facts."""

import json
import shlex
from pathlib import Path

import pytest

from provision import config as cfg
from provision.errors import ProvisionError
from provision.history import History
WANTS = "/etc/systemd/system/multi-user.target.wants"  # as systemctl enable makes the links
from provision.release import Prune, Switch, live_slot, rollback_target
from provision.facts import Facts

ROOT = Path(__file__).resolve().parents[2]
S = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), ROOT)
UP = {"loaded": True, "active": True, "enabled": True, "pid": 7}
DOWN = {"loaded": True, "active": False, "enabled": False, "pid": 0}


def link(target):
    return {"type": "link", "target": target, "mode": 0o777, "owner": "root", "group": "root"}


def host(live="a", a="r1", b=None, a_state=UP, b_state=DOWN, current="r1", releases=("r1",)):
    return Facts({
        ("content", S.layout.upstream_file): f"server unix:/run/provision/hello/{live}.sock fail_timeout=0;\n" if live else None,
        ("file", "/srv/hello/current"): link(f"releases/{current}") if current else None,
        ("file", "/srv/hello/slots/a"): link(f"../releases/{a}") if a else None,
        ("file", "/srv/hello/slots/b"): link(f"../releases/{b}") if b else None,
        ("service", "hello@a"): a_state, ("service", "hello@b"): b_state,
        ("file", f"{WANTS}/hello@a.service"): link("/etc/systemd/system/hello@a.service") if a_state == UP else None,
        ("file", f"{WANTS}/hello@b.service"): link("/etc/systemd/system/hello@b.service") if b_state == UP else None,
        ("ls", "/srv/hello/releases"): list(releases),
    })


def switch_args(change):
    return json.loads(shlex.split(change.commands[0])[-1])


def test_live_slot_comes_from_the_nginx_upstream():
    assert live_slot(S, host(live="b")) == "b"
    assert live_slot(S, host(live=None)) is None


def test_same_release_running_is_a_no_op():
    assert Switch(S, "r1").plan(host(), set()) is None


def test_new_release_goes_to_the_idle_slot():
    args = switch_args(Switch(S, "r2").plan(host(), set()))
    assert (args["new"]["slot"], args["old"], args["release"]) == ("b", {"slot": "a", "unit": "hello@a"}, "r2")
    args = switch_args(Switch(S, "r3").plan(host(live="b", b="r2", b_state=UP, a_state=DOWN), set()))
    assert (args["new"]["slot"], args["old"]["slot"]) == ("a", "b")


def test_the_switch_passes_the_origin_of_a_release_to_the_release_log():
    origin = {"commit": "a" * 40, "tests": {"result": "passed", "seconds": 1.25}}
    assert switch_args(Switch(S, "r2", log=origin).plan(host(), set()))["log"] == origin
    assert switch_args(Switch(S, "r2").plan(host(), set()))["log"] == {}


def test_fab_releases_says_the_commit_and_tests_of_a_release():
    from provision.cli.info import origin
    assert origin({"commit": "0123456789abcdef0123", "tests": {"result": "passed", "seconds": 3.21}, "via": "push"}
                  ) == ", commit 0123456789ab, tests passed in 3.2s (via push)"
    assert origin({"release": "r1"}) == ""
    assert origin({"commit": "0" * 40, "tests": {"result": "none", "seconds": 0.0}, "via": "ship"}
                  ) == ", commit 000000000000, no tests (via ship)"


def test_the_switch_gets_every_path_from_the_layout():
    args = switch_args(Switch(S, "r2", by="me@laptop", prove=True).plan(host(), set()))
    assert args == {
        "app": "hello", "release": "r2", "action": "deploy", "by": "me@laptop", "daemon_reload": False,
        "release_dir": "/srv/hello/releases/r2", "release_own_dir": ".provision", "venv": "/srv/hello/releases/r2/.venv",
        "current": "/srv/hello/current", "current_target": "releases/r2", "release_log": "/srv/hello/releases.log",
        "upstream_file": "/etc/nginx/provision/hello.upstream", "site_enabled": "/etc/nginx/sites-enabled/hello",
        "socket_unit_file": "/etc/systemd/system/hello@.socket", "wants": WANTS,
        "sockets_wants": "/etc/systemd/system/sockets.target.wants", "nginx_pid": "/run/nginx.pid",
        "nginx": "127.0.0.1:80", "tmp": ".provision-tmp",
        "health": {"path": S.health_path, "host": "", "timeout": S.health_timeout, "header": "X-Provision-Upstream"},
        "new": {"slot": "b", "unit": "hello@b", "unit_file": "/etc/systemd/system/hello@b.service",
                "socket": "/run/provision/hello/b.sock", "address": "unix:/run/provision/hello/b.sock",
                "slot_link": "/srv/hello/slots/b",
                "slot_target": "../releases/r2", "upstream": "server unix:/run/provision/hello/b.sock fail_timeout=0;\n"},
        "old": {"slot": "a", "unit": "hello@a"}, "stage": "all", "log": {}, "container": None}
    assert switch_args(Switch(S, "r2").plan(host(), set()))["health"]["header"] is None


def test_fresh_host_starts_slot_a_with_a_daemon_reload():
    fresh = host(live=None, a=None, current=None, a_state=None, b_state=None)
    args = switch_args(Switch(S, "r1").plan(fresh, {"unit"}))
    assert (args["new"]["slot"], args["old"], args["daemon_reload"]) == ("a", None, True)
    assert args["new"]["socket"] == "/run/provision/hello/a.sock" and args["upstream_file"] == S.layout.upstream_file


def test_a_new_socket_unit_or_a_dead_instance_switch_too():
    # a changed unit or gunicorn config is a new release: the release step decides, not tags
    assert Switch(S, "r1").plan(host(), {"unit"}) is None
    assert switch_args(Switch(S, "r1").plan(host(), {"socket", "unit"}))["new"]["slot"] == "b"
    assert switch_args(Switch(S, "r1").plan(host(a_state=DOWN), set()))["new"]["slot"] == "b"
    # rollbacks do not restart on tags
    assert Switch(S, "r1", restart_on=()).plan(host(), {"socket"}) is None


def test_interrupted_switch_is_repaired_without_a_restart():
    # killed after nginx moved to b, before `current` moved and a stopped
    facts = host(live="b", a="r1", b="r2", a_state=UP, b_state=UP, current="r1")
    change = Switch(S, "r2").plan(facts, set())
    assert change.summary == "repair"
    assert change.commands == ["ln -sfn releases/r2 /srv/hello/current.provision-tmp",
                               "mv -Tf /srv/hello/current.provision-tmp /srv/hello/current",
                               f"rm -f {WANTS}/hello@a.service /etc/systemd/system/sockets.target.wants/hello@a.socket",
                               "systemctl stop hello@a.socket hello@a.service"]


def test_an_idle_slot_that_systemd_still_thinks_enabled_needs_no_repair():
    # the switch removes the old slot's boot link without a daemon reload: systemd's own
    # "enabled" lags; the link on disk decides
    facts = host(live="b", a="r1", b="r2", a_state=dict(DOWN, enabled=True), b_state=UP, current="r2")
    assert Switch(S, "r2").plan(facts, set()) is None


def log(*entries):
    return "".join(json.dumps({"release": r, "action": a, "time": "t", "by": "me"}) + "\n" for r, a in entries)


LOG = ("content", "/srv/hello/releases.log")


def test_prune_keeps_newest_and_never_the_live_or_previous():
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello", keep_releases=2), ROOT)
    names = ["2026-01", "2026-02", "2026-03", "2026-04", "2026-05.provision-tmp"]
    went = log(("2026-01", "deploy"), ("2026-02", "deploy"), ("2026-03", "deploy"), ("2026-04", "deploy"),
               ("2026-01", "rollback"))
    facts = Facts({("ls", "/srv/hello/releases"): names, ("file", "/srv/hello/current"): link("releases/2026-01"),
                   LOG: went})
    prune = Prune(s, "2026-06")
    # keep: 2026-04 and the new 2026-06 (newest two), 2026-01 (previous, live before this deploy)
    assert prune.doomed(facts) == ["2026-05.provision-tmp", "2026-02", "2026-03"]
    cmds = prune.plan(facts, {"switched"}).commands
    assert cmds[0] == ("rm -rf /srv/hello/releases/2026-05.provision-tmp /srv/hello/releases/2026-02 "
                       "/srv/hello/releases/2026-03")
    assert "venvs" in cmds[1]


@pytest.mark.parametrize("keep,doomed", [(2, ["r2-refused", "r3-interrupted"]), (3, ["r2-refused"]), (5, [])])
def test_prune_removes_releases_that_never_went_live_first(keep, doomed):
    s = cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello", keep_releases=keep), ROOT)
    names = ["r1", "r2-refused", "r3-interrupted", "r4"]
    facts = Facts({("ls", "/srv/hello/releases"): names, ("file", "/srv/hello/current"): link("releases/r4"),
                   LOG: log(("r1", "deploy"), ("r2-refused", "refused"), ("r4", "deploy"))})
    assert Prune(s, "r4").doomed(facts) == doomed


def test_prune_copes_with_no_releases_and_no_current():
    facts = Facts({("ls", "/srv/hello/releases"): None, ("file", "/srv/hello/current"): None, LOG: None})
    assert Prune(S, "r1").doomed(facts) == []
    assert Prune(S, "r1").plan(facts, set()) is None


def with_log(facts_obj, text):
    return Facts({**facts_obj._answers, LOG: text})


def test_rollback_goes_to_the_release_live_before_the_live_one_never_to_one_that_was_not():
    # r2 was refused and r3 interrupted (never live), between the live r4 and the r1 live before it
    facts = with_log(host(current="r4", releases=("r1", "r2", "r3", "r4", "r5.provision-tmp")),
                     log(("r1", "deploy"), ("r2", "refused"), ("r4", "deploy")))
    assert rollback_target(S, facts, None) == "r1"
    assert rollback_target(S, facts, "r1") == "r1"
    # after that rollback, the live one is r2 and the one live before it r3
    facts = with_log(host(current="r2", releases=("r1", "r2", "r3")),
                     log(("r1", "deploy"), ("r2", "deploy"), ("r3", "deploy"), ("r2", "rollback")))
    assert rollback_target(S, facts, None) == "r3"
    # the release live before is gone (pruned): the one before that
    facts = with_log(host(current="r3", releases=("r1", "r3")), log(("r1", "deploy"), ("r2", "deploy"), ("r3", "deploy")))
    assert rollback_target(S, facts, None) == "r1"
    with pytest.raises(ProvisionError, match="no release 'r9'"):
        rollback_target(S, facts, "r9")
    with pytest.raises(ProvisionError, match="no release that was live before"):
        rollback_target(S, with_log(host(current="r1", releases=("r1", "r0")), log(("r1", "deploy"))), None)


def test_history_marks_refused_and_never_live_releases():
    h = History.read(log(("r1", "deploy"), ("r2", "refused")) + "not json\n" + '["odd"]\n')
    assert [h.state(r) for r in ("r1", "r2", "r3")] == ["went live", "refused", "never live"]
    assert h.first["r1"]["by"] == "me"
