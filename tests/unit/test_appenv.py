"""The app's environment: the env files systemd reads, app.env, the secrets program and the release
command as they run on a host (by a real local python, systemd-run faked on PATH), the release
command's place in a deploy, and how `fab` takes env.set words and run's command."""

import json
import os
import shlex
import stat
import subprocess

import pytest

from provision import appenv, remote
from provision.app import Deploy, rendered
from provision.errors import ProvisionError
from provision.hosts import remainder
from provision.layout import Layout
from provision.remote.lib_envfile import env_parse, env_text
from provision.script import build_script, parse_report
from provision.source import scan
from provision.steps import Change, Planned, Step, plan
from provision.tasks import words_after

from .test_app import fresh_facts, settings

def web_unit(**over) -> str:
    """The web unit the kit renders for the test app: the sandbox its other processes take over."""
    return rendered(settings(**over), "app@.service.j2").decode()


TRICKY = {"A": 'say "hi" to $HOME `now` \\ back', "B": "", "C": "x=y # not a comment", "D": "ünï"}


def test_env_files_round_trip_and_escape_what_systemd_unescapes():
    text = env_text(TRICKY)
    assert text.splitlines()[0] == 'A="say \\"hi\\" to \\$HOME \\`now\\` \\\\ back"'
    assert env_parse(text) == TRICKY
    assert env_parse("junk\nB='single'\nC=\"ok\"\n") == {"C": "ok"}


@pytest.mark.parametrize("value, why", [
    ({"1A": "x"}, "letters, digits and _"), ({"A-B": "x"}, "letters, digits and _"),
    ({"A": "two\nlines"}, "one line"), ({"A": ["x"]}, "not text"), ("A=1,B", "NAME=VALUE"), (["A"], "mapping")])
def test_env_setting_mistakes_are_one_line(value, why):
    with pytest.raises(ProvisionError, match=r"^invalid setting app\.env=.*: .*" + why) as e:
        settings(env=value)
    assert "\n" not in str(e.value)


def test_env_setting_takes_mappings_and_comma_strings():
    assert settings(env={"A": 1, "B": True, "C": "x y"}).env == {"A": "1", "B": "true", "C": "x y"}
    assert settings(env="A=1, B=x=y").env == {"A": "1", "B": "x=y"}
    assert settings().env == {} and settings().release_command == ""


def test_the_app_process_gets_the_units_environment_files_in_order_and_no_value():
    lay = Layout("hello")
    argv = appenv.app_process(lay, "hello", "/srv/hello/current", ["/usr/bin/env", "python", "-V"], web_unit())
    files = [argv[i + 1] for i, a in enumerate(argv) if a == "-p" and argv[i + 1].startswith("EnvironmentFile")]
    assert files == ["EnvironmentFile=-/srv/hello/current/.provision/env", "EnvironmentFile=-/srv/hello/secrets.env",
                     "EnvironmentFile=-/srv/hello/shared/.env"]
    assert "--uid=hello" in argv and "--working-directory=/srv/hello/current" in argv
    assert "--setenv=PATH=/srv/hello/current/.venv/bin:/usr/local/bin:/usr/bin:/bin" in argv
    assert argv[argv.index("--") + 1:] == ["/usr/bin/env", "python", "-V"]
    unit = Deploy(settings(), scan(settings().source), "r1").release.configs["unit"].decode()
    assert [l for l in unit.splitlines() if l.startswith("EnvironmentFile")] == [
        "EnvironmentFile=-/srv/hello/slots/%i/.provision/env", "EnvironmentFile=-/srv/hello/secrets.env",
        "EnvironmentFile=-/srv/hello/shared/.env"]


def test_the_plain_environment_and_the_release_command_belong_to_the_release():
    s = settings(env={"GREETING": "hi"})
    release = Deploy(s, scan(s.source), "r1").release
    assert release.configs["env"] == b'GREETING="hi"\n' and "release_command" not in release.configs
    other = Deploy(settings(env={"GREETING": "ho"}), scan(s.source), "r1").release
    with_command = Deploy(settings(env={"GREETING": "hi"}, release_command="true"), scan(s.source), "r1").release
    assert len({release.config, other.config, with_command.config}) == 3  # each a new release


def test_the_release_command_runs_in_the_new_release_before_the_switch_only_when_one_was_made():
    s = settings(release_command="python manage.py migrate")
    src = scan(s.source)
    steps = Deploy(s, src, "r1", "me@laptop").steps("r1")
    names = [st.name for st in steps]
    assert names.index("release command") < names.index("switch hello")
    assert names.index("release /srv/hello/releases") < names.index("release command")
    planned = {p.step.name: p for p in plan(steps, fresh_facts(steps))}
    step = planned["release command"].step
    assert step.barrier  # the virtualenv is complete first
    [command] = planned["release command"].change.commands
    args = json.loads(shlex.split(command)[-1])
    assert args["release"] == "r1" and args["by"] == "me@laptop" and args["release_log"] == "/srv/hello/releases.log"
    assert args["argv"][-3:] == ["/bin/sh", "-c", "python manage.py migrate"]
    assert "--working-directory=/srv/hello/releases/r1" in args["argv"]
    assert step.plan(fresh_facts(steps), set()) is None  # no new release: nothing runs
    assert "release command" not in [st.name for st in Deploy(settings(), src, "r1").steps("r1")]


def run(command, stdin="", **env):
    return subprocess.run(["bash", "-c", command], input=stdin, capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **env))


@pytest.mark.skipif(os.geteuid() != 0, reason="the secrets file is root's")
def test_secrets_come_on_stdin_and_land_in_a_root_only_file(tmp_path):
    lay = Layout("hello", srv_dir=str(tmp_path))
    os.makedirs(lay.root)
    step = appenv.Secrets(lay, values={"TOKEN": "s3cret value", "B": 'q"$x'})
    [command] = step.plan(None, set()).commands
    assert "s3cret" not in command and "s3cret" not in command.split("\n", 1)[0]
    assert run(command).returncode == 0
    st = os.stat(lay.secrets_file)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert env_parse(open(lay.secrets_file).read()) == {"TOKEN": "s3cret value", "B": 'q"$x'}
    [command] = appenv.Secrets(lay, names=("B", "NONE")).plan(None, set()).commands
    assert run(command).returncode == 0
    listed = run(appenv.secret_names_command(lay))
    assert listed.stdout == "TOKEN\n"
    # a link planted there is replaced, never followed; a file others can read counts as none
    os.unlink(lay.secrets_file)
    os.symlink(tmp_path / "elsewhere", lay.secrets_file)
    assert run(appenv.secret_names_command(lay)).stdout == "\n"
    assert run(command).returncode == 0 and not os.path.islink(lay.secrets_file)
    assert not (tmp_path / "elsewhere").exists()


SYSTEMD_RUN = """#!/bin/bash
echo "$@" > "$FAKE/argv"
echo "the app says $SAY"
exit "$RC"
"""


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "systemd-run").write_text(SYSTEMD_RUN)
    (tmp_path / "systemd-run").chmod(0o755)
    return tmp_path


@pytest.mark.skipif(os.geteuid() != 0, reason="the secrets file is root's")
def test_the_release_command_shows_its_output_with_secrets_masked_and_refuses_on_failure(tmp_path, fake):
    lay = Layout("hello", srv_dir=str(tmp_path))
    os.makedirs(lay.root)
    fd = os.open(lay.secrets_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, env_text({"TOKEN": "tok-42"}).encode())
    os.close(fd)
    os.makedirs(lay.shared)  # the app's own .env (root:app 0640) holds secrets too: its longer values
    fd = os.open(lay.env_file, os.O_WRONLY | os.O_CREAT, 0o640)
    os.write(fd, env_text({"DATABASE_URL": "postgres://u:pw-77@db/x", "DEBUG": "1"}).encode())
    os.close(fd)
    step = appenv.ReleaseCommand(lay, "hello", "python migrate.py", "r1", web_unit(), "me@laptop")
    [command] = step.plan(None, {"code"}).commands
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "FAKE": str(fake), "SAY": "tok-42 ok"}
    res = run(command, RC="0", **dict(env, SAY="postgres://u:pw-77@db/x with DEBUG 1"))
    assert res.returncode == 0 and res.stdout == "@@show the app says **** with DEBUG 1\n", res
    res = run(command, RC="0", **env)
    assert res.returncode == 0 and res.stdout == "@@show the app says **** ok\n", res
    assert (fake / "argv").read_text().endswith(" -- /bin/sh -c python migrate.py\n")
    assert not os.path.exists(lay.release_log)
    res = run(command, RC="3", **env)
    assert res.returncode == 3 and "the app says **** ok" in res.stderr and "tok-42" not in res.stderr
    assert "release command failed (exit 3): release r1 refused" in res.stderr
    entry = json.loads(open(lay.release_log).read())
    assert entry["action"] == "refused" and entry["release"] == "r1" and entry["by"] == "me@laptop"


def test_a_steps_show_lines_come_before_its_report():
    res = subprocess.run(["bash", "-s"], capture_output=True, text=True,
                         input=build_script([Planned(Step(), Change(["echo '@@show hello'; echo hidden"]))]))
    assert res.returncode == 0 and res.stdout.splitlines()[0] == "@@show hello" and "hidden" not in res.stdout
    assert parse_report(res.stdout).done == {0}


def test_words_after_a_task_and_the_remainder_word_for_word():
    stop = {"deploy", "env.set"}
    assert words_after("env.set", ["fab", "-H", "h", "env.set", "A=1", "B=x y", "deploy"], stop) == 2
    assert words_after("env.set", ["fab", "env.set", "A=1", "-v"], stop) == 1
    assert words_after("env.set", ["fab", "deploy"], stop) == 0
    argv = ["fab", "-H", "h", "run", "--", "python", "-c", "print('a b')", "--", "x"]
    assert remainder("python -c print('a b') -- x", argv) == ("python", "-c", "print('a b')", "--", "x")
    assert remainder("", ["fab", "deploy"]) == ()


def test_env_set_arguments():
    assert appenv.pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad, why in ((["A"], "NAME=VALUE"), (["1A=hunter2"], "letters"), (["A=a\nb"], "one line"), ([], "needs")):
        with pytest.raises(ProvisionError, match=why) as e:
            appenv.pairs(bad)
        assert "hunter2" not in str(e.value)
    assert appenv.names(["A", "B_2"]) == ("A", "B_2")
    with pytest.raises(ProvisionError, match="invalid env.unset argument 'A=1'"):
        appenv.names(["A=1"])


def test_a_dry_run_shows_the_plain_environment_and_release_command_changes(tmp_path):
    from provision.facts import Facts
    from provision.release import Release

    from .test_release_diff import host

    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "requirements.txt").write_text("")
    s = settings(env={"GREETING": "new"}, var_api_token="tok-77", release_command="true")
    step = Release(s, scan(tmp_path), "r1", "venvkey", {"unit": b"", "env": b'GREETING="new"\nT="tok-77"\n',
                                                        "release_command": b"true\n"})
    facts = host({"app.py": b"x = 1\n"})
    asked = step.diff_facts(facts)
    assert ("content", "/srv/hello/current/.provision/env") in asked
    shown = step.show_diff(facts, Facts({f: 'GREETING="old"\n' if f[1].endswith("/env") else None for f in asked}))
    # the environment holds a known secret (a var_*_token): no content shown; the command is
    assert "--- .provision/env" in shown and "(content hidden: sensitive)" in shown and "tok-77" not in shown
    assert "+true" in shown
    plain = Release(s, scan(tmp_path), "r1", "venvkey", {"unit": b"", "env": b'GREETING="new"\n'})
    shown = plain.show_diff(facts, Facts({f: 'GREETING="old"\n' for f in plain.diff_facts(facts)}))
    assert '-GREETING="old"' in shown and '+GREETING="new"' in shown


def test_run_runs_the_command_word_for_word_in_the_live_release_or_says_there_is_none():
    from provision.cli.env import run_line

    line = run_line(settings(), ["python", "-c", "print('a b'); import os"])
    guard, run = line.split("; then ", 1)[0], line.split("; fi; exec ", 1)[1]
    assert guard == "if [ ! -d /srv/hello/current/ ]"
    argv = shlex.split(run)
    assert argv[0] == "systemd-run" and argv[argv.index("--") + 1:] == [
        "/usr/bin/env", "python", "-c", "print('a b'); import os"]
    assert "--working-directory=/srv/hello/current" in argv
    missing = subprocess.run(["bash", "-c", line.replace("/srv/hello/current/", "/nonexistent/")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr == "error: no live release of hello on this host; deploy first\n"


def test_the_release_command_fills_only_unshipped_static_dirs_which_are_roots_again_after(tmp_path):
    """collectstatic writes STATIC_ROOT inside the root-owned release: that one directory is made
    the app's while the command runs, then root's, whatever the command's exit."""
    step = appenv.ReleaseCommand(Layout("hello"), "hello", "python manage.py collectstatic", "r2", web_unit(), "me",
                                  ("staticfiles",))
    cmds = step.plan(None, {"code"}).commands
    assert cmds[0].startswith("for d in /srv/hello/releases/r2/staticfiles; do") and "-o hello -g hello" in cmds[0]
    assert cmds[1].startswith("__rc=0; python3 -c ") and cmds[1].endswith("|| __rc=$?")
    assert cmds[2].startswith("python3 -c '# provision: seal.py") and "staticfiles" in cmds[2]
    assert cmds[3] == '[ "$__rc" -eq 0 ] || exit "$__rc"'
    plain = appenv.ReleaseCommand(Layout("hello"), "hello", "true", "r2", web_unit()).plan(None, {"code"}).commands
    assert len(plain) == 1 and plain[0].startswith("python3 -c ")
    # no new release: nothing to run
    assert appenv.ReleaseCommand(Layout("hello"), "hello", "true", "r2", web_unit()).plan(None, set()) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="seal.py makes files root's: run as root")
def test_seal_makes_what_the_app_wrote_roots_and_removes_links_and_special_files(tmp_path):
    """remote/seal.py, run as on the host: the static folder the release command filled."""
    release = tmp_path / "r2"
    d = release / "staticfiles"
    (d / "css").mkdir(parents=True)
    (d / "css/site.abc12345.css").write_text("body{}")
    (d / "run.sh").write_text("#!/bin/sh\n")
    (d / "run.sh").chmod(0o4770)  # set-uid, group-writable
    (d / "shadow").symlink_to("/etc/shadow")
    os.mkfifo(d / "pipe")
    (d / "css/up").symlink_to("..")
    for p in (d, d / "css", d / "css/site.abc12345.css", d / "run.sh"):
        os.chown(p, 65534, 65534, follow_symlinks=False)  # the app's (nobody here)
    (d / "css").chmod(0o777)
    res = subprocess.run(["bash", "-c", remote.python("seal.py", {"base": str(release), "dirs": ["staticfiles"]})],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    found = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files + [""]:
            p = os.path.join(root, n)
            st = os.lstat(p)
            found[os.path.relpath(p, d)] = (st.st_uid, stat.S_IMODE(st.st_mode), stat.S_IFMT(st.st_mode))
    assert found == {".": (0, 0o755, stat.S_IFDIR), "css": (0, 0o755, stat.S_IFDIR),
                     "css/site.abc12345.css": (0, 0o644, stat.S_IFREG), "run.sh": (0, 0o754, stat.S_IFREG)}


@pytest.mark.skipif(os.geteuid() != 0, reason="seal.py makes files root's: run as root")
def test_seal_refuses_a_tree_planted_too_deep(tmp_path):
    d = tmp_path / "r2/staticfiles"
    deep = d.joinpath(*["x"] * 70)
    deep.mkdir(parents=True)
    res = subprocess.run(["bash", "-c", remote.python("seal.py", {"base": str(tmp_path / "r2"), "dirs": ["staticfiles"]})],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "over 64 levels deep" in res.stderr
