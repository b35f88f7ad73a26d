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
