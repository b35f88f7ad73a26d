"""A fleet deployed as one transaction: what each host does next (a pure function of where every
host stands), the stages of one deploy, and the stop, revert and finish of a host."""

import pytest

from provision import fleet as fl
from provision.app import Commit, Deploy, Prepare, Revert, Settle, prepares, switched
from provision.facts import Facts
from provision.release import Prune, StopIdle, Switch
from provision.source import scan
from provision.cli.apply import merged, problem
from provision.runner import HostResult
from provision.steps import HttpCheck, Planned, plan

from .test_app import fresh_facts, settings
from .test_release import DOWN, UP, host

P, R, S, B, H, Y = fl.PREPARED, fl.REFUSED, fl.SWITCHED, fl.BROKEN, fl.HALTED, fl.READY


@pytest.mark.parametrize("states, max_fail, last, moves", [
    # every host prepared, nothing committed yet: nothing to do before the first wave
    ({"w1": P, "w2": P, "w3": P}, 0, False, {}),
    # one refused: the fleet is called off, every prepared host stops what it prepared
    ({"w1": P, "w2": R, "w3": P}, 0, True, {"w1": fl.ABORT, "w3": fl.ABORT}),
    # ... unless the fleet tolerates it
    ({"w1": P, "w2": R, "w3": P}, 1, False, {}),
    # one broke after switching: it goes back, and so does every switched host
    ({"w1": S, "w2": S, "w3": B}, 0, True, {"w1": fl.REVERT, "w2": fl.REVERT, "w3": fl.REVERT}),
    # one halted before switching: it stops what it prepared, the switched ones go back
    ({"w1": S, "w2": S, "w3": H}, 0, True, {"w1": fl.REVERT, "w2": fl.REVERT, "w3": fl.ABORT}),
    # in waves: the first wave broke, the next one never switches
    ({"w1": B, "w2": P, "w3": P}, 0, True, {"w1": fl.REVERT, "w2": fl.ABORT, "w3": fl.ABORT}),
    # tolerated: the broken host goes back on its own, the others go on (not the last wave yet)
    ({"w1": B, "w2": P, "w3": P}, 1, False, {"w1": fl.REVERT}),
    # all switched, the last wave: the old releases stop; a ready host (nothing to switch) does nothing
    ({"w1": S, "w2": S, "w3": Y}, 0, True, {"w1": fl.FINISH, "w2": fl.FINISH}),
    ({"w1": S, "w2": S, "w3": R}, 1, True, {"w1": fl.FINISH, "w2": fl.FINISH}),
])
def test_what_each_host_does_next(states, max_fail, last, moves):
    assert fl.transaction_moves(states, max_fail, last) == moves


def test_the_fleet_is_called_off_when_more_hosts_failed_than_it_tolerates():
    assert not fl.called_off({"w1": S, "w2": Y, "w3": P}, 0)
    for failed in (R, B, H):
        assert fl.called_off({"w1": S, "w2": failed}, 0) and not fl.called_off({"w1": S, "w2": failed}, 1)
    assert fl.called_off({"w1": R, "w2": B, "w3": S}, 1)


def deploy():
    s = settings()
    return Deploy(s, scan(s.source), "r2", "me@laptop")


def test_a_prepare_ends_with_the_new_instance_healthy_when_traffic_has_to_move():
    d = deploy()
    prepare = Prepare(d)
    steps = prepare.steps(("r2", True))
    assert isinstance(steps[-1], Switch) and steps[-1].stage == "prepare" and steps[-1].name == "prepare hello"
    assert not [s for s in steps if isinstance(s, (Prune, HttpCheck))]
    # the facts it gathers are the whole deploy's: a host with nothing to move deploys in one go
    assert set(prepare.facts()) == set(d.facts())
    whole = prepare.steps(("r1", False))
    assert [type(s) for s in whole] == [type(s) for s in d.steps("r1")] and isinstance(whole[-1], HttpCheck)
    assert [s.stage for s in whole if isinstance(s, Switch)] == ["all"]
    assert [s.stage for s in Commit(d).steps("r2") if isinstance(s, Switch)] == ["commit"]


def test_a_prepare_is_told_from_a_whole_deploy_and_a_switch_that_ran_from_one_that_did_not():
    d = deploy()
    facts = host(live="a", a="r1")
    planned = plan([d.switch("r2", "prepare")], facts)
    assert prepares(planned) and not prepares(plan([d.switch("r1")], facts))
    committed = plan([d.switch("r2", "commit")], facts)
    assert switched(committed, {0}) and not switched(committed, set())
    assert not switched(plan([d.switch("r1", "commit")], facts), {0})  # nothing to switch: no change


def test_settling_stops_every_instance_but_the_live_one():
    s = settings()
    both = host(live="b", a="r1", b="r2", a_state=UP, b_state=UP, current="r2")
    [p] = plan([StopIdle(s)], both)
    assert p.change.commands[-1] == "systemctl stop --no-block hello@a.socket hello@a.service"
    assert plan([StopIdle(s)], host(live="a", a="r1", b_state=DOWN))[0].change is None
    settle = Settle(s)
    assert settle.target(both) == "r2" and settle.live == "r2"


def test_a_revert_goes_back_to_the_release_the_idle_slot_still_runs():
    s = settings()
    revert = Revert(s, None)
    both = host(live="b", a="r1", b="r2", a_state=UP, b_state=UP, current="r2")
    answers = {**both._answers, **fresh_facts(revert.steps(None))._answers, **both._answers}
    facts = Facts({**{f: None for f in revert.target_facts() if f not in answers}, **answers})
    assert revert.target(facts) == "r1" and revert.to == "r1"
    [switch] = [st for st in revert.steps("r1") if isinstance(st, Switch)]
    assert switch.stage == "revert" and switch.action == "rollback"
    # a host whose idle slot runs nothing (its first release) has nothing to go back to
    one = Facts({**facts._answers, ("service", "hello@a"): DOWN})
    assert revert.target(one) == "" and revert.steps("") == []


def test_a_hosts_stages_make_one_result():
    d = deploy()
    a = HostResult("w1", planned=[Planned(st, None) for st in d.steps("r2", "prepare")], done={3}, round_trips=2)
    b = HostResult("w1", planned=[Planned(st, None) for st in d.steps("r2", "commit")], done={0}, failed_step=5,
                   error="w1: step `health` failed (exit 1)\n  command: curl ...\n  HTTP 502\n  more", round_trips=4)
    m = merged("w1", [a, b])
    assert len(m.planned) == len(a.planned) + len(b.planned) and m.done == {3, len(a.planned)}
    assert m.failed_step == len(a.planned) + 5 and m.round_trips == 4 and m.failed
    assert problem(m) == "step `health` failed (exit 1): HTTP 502"
    assert problem(HostResult("w2", error="cannot reach w2")) == "cannot reach w2"
