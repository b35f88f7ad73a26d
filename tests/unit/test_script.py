"""The apply script, run by a real local bash: reports per step, stops at the first failure."""

import subprocess

from provision.script import build_script, parse_report
from provision.steps import Change, Planned, Step


def planned(*commands_lists):
    return [Planned(Step(), Change(list(c)) if c is not None else None) for c in commands_lists]


def run(script):
    return subprocess.run(["bash", "-s"], input=script, capture_output=True, text=True)


def test_all_steps_ok(tmp_path):
    f = tmp_path / "out"
    res = run(build_script(planned([f"echo one >> {f}"], None, [f"echo two >> {f}", "true"])))
    assert res.returncode == 0
    report = parse_report(res.stdout)
    assert report.done == {0, 2} and report.failed is None
    assert f.read_text() == "one\ntwo\n"


def test_stops_at_first_failure_with_command_and_output(tmp_path):
    f = tmp_path / "never"
    script = build_script(planned(["true"], ["echo about to fail", "echo oops >&2", "false", "echo not here"],
                                  [f"touch {f}"]))
    res = run(script)
    assert res.returncode == 1
    report = parse_report(res.stdout)
    assert report.done == {0}
    assert report.failed == 1 and report.rc == 1
    assert report.command == "false"
    assert "about to fail" in report.output and "oops" in report.output and "not here" not in report.output
    assert not f.exists()


def test_commands_cannot_eat_the_script_from_stdin(tmp_path):
    f = tmp_path / "after"
    res = run(build_script(planned(["cat > /dev/null"], [f"touch {f}"])))
    assert res.returncode == 0 and f.exists()


def test_heredoc_payloads_and_env():
    res = run(build_script(planned(["base64 -d <<'__PROVISION_EOF__' | grep -q hi\naGkK\n__PROVISION_EOF__",
                                    'test "$http_proxy" = "http://p:1"']), {"http_proxy": "http://p:1"}))
    assert res.returncode == 0, res.stdout
    assert parse_report(res.stdout).done == {0}


def test_background_steps_overlap_and_join_at_barriers(tmp_path):
    from provision.steps import Symlink

    marker = tmp_path / "bg-done"
    steps = planned([f"sleep 0.3; touch {marker}"], [f"test ! -e {marker}"], None)
    steps[0].change.background = True
    barrier = Planned(Symlink("/x", "y", barrier=True), Change([f"test -e {marker}"]))
    res = run(build_script(steps + [barrier]))
    assert res.returncode == 0, res.stdout
    report = parse_report(res.stdout)
    assert report.done == {0, 1, 3}  # step 1 ran while 0 was still sleeping; the barrier saw it done


def test_background_failure_is_reported_at_the_join():
    steps = planned(["echo pip says no >&2; false"], ["true"])
    steps[0].change.background = True
    report = parse_report(run(build_script(steps)).stdout)
    assert report.failed == 0 and report.done == {1}
    assert report.command == "false" and "pip says no" in report.output
