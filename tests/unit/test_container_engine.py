"""A container app's engine on the host: docker's proxy drop-in (written, restarted, taken back), the
image's commands, and switching an app between a virtualenv and a container. Planned without a host;
the shell the steps run is run here with a fake systemctl on PATH."""

import contextlib
import json
import os
import subprocess
import tempfile

import pytest

from provision import config as cfg
from provision.app import (ENGINE_PROXY_CLAIMS, ENGINE_PROXY_DROPIN, ENGINE_PROXY_ENV, Deploy, DockerProxyDropped,
                          KindLeftovers, engine_steps, image_step)
from provision.release import meta_path
from provision.remote import switch_command
from provision.errors import ProvisionError
from provision.facts import Facts
from provision.source import scan
from provision.steps import Command, File

from .test_containers import ROOT, app
from .test_switch import SYSTEMCTL, Host as SwitchHost


def fake_systemctl(tmp_path, docker: str | None):
    """A systemctl that knows docker.service in state ``docker`` ("active", "inactive"), or not at all
    (None: exit 5 for a restart of it, as systemd says "Unit docker.service not found"). Logs its calls."""
    log = tmp_path / "systemctl.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    known = "" if docker is None else docker
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$1" in daemon-reload) exit 0 ;; esac\n'
        'unit=""; for a; do case $a in *.service) unit=$a ;; esac; done\n'
        f'[ "$unit" = docker.service ] && state={known!r} || state=""\n'
        'case "$1" in\n'
        '  is-active) [ "$state" = active ] && exit 0; [ -n "$state" ] && exit 3; exit 4 ;;\n'
        '  try-restart|restart) [ -n "$state" ] && exit 0; echo "Unit $unit not found." >&2; exit 5 ;;\n'
        'esac\nexit 0\n')
    (bin_dir / "systemctl").chmod(0o755)
    return bin_dir, log


def run(commands, bin_dir) -> subprocess.CompletedProcess:
    """The commands as the executor runs a step's: in order, the first failure fails the step."""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-e", "-c", "\n".join(commands)], env=env, capture_output=True, text=True)


def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    return d


def proxy_command(s) -> Command:
    return next(st for st in engine_steps(s) if isinstance(st, Command) and st.label == "docker proxy")


def test_the_docker_proxy_restarts_a_running_docker_and_passes_on_a_host_without_docker_yet(tmp_path):
    """B8: the drop-in is written before the deploy installs docker (so a fresh install starts with
    it); its restart must not fail where docker.service does not exist yet."""
    s = app(src(tmp_path), proxy="http://10.0.0.1:3128")
    step = proxy_command(s)
    for state, restarted in ((None, False), ("inactive", False), ("active", True)):
        case = tmp_path / str(state)
        case.mkdir()
        bin_dir, log = fake_systemctl(case, state)
        res = run(step.commands, bin_dir)
        assert res.returncode == 0, (state, res.stderr)
        calls = log.read_text().splitlines()
        assert calls[0] == "daemon-reload"
        assert any(c.endswith("restart docker.service") for c in calls) == restarted, (state, calls)


def engine_facts(claims=None, dropin=True):
    f = {"type": "file", "owner": "root", "group": "root", "mode": 0o644, "sha256": "x"}
    return Facts({("ls", ENGINE_PROXY_CLAIMS): claims, ("file", ENGINE_PROXY_DROPIN): f if dropin else None,
                  ("file", ENGINE_PROXY_ENV): f if dropin else None})


def dropped(s) -> DockerProxyDropped:
    [step] = [st for st in engine_steps(s) if isinstance(st, DockerProxyDropped)]
    return step


def test_a_docker_app_with_a_proxy_claims_the_drop_in_and_one_without_takes_it_back(tmp_path):
    """B7: the drop-in went only ever in. It goes when no app on the host claims it any more."""
    with_proxy = app(src(tmp_path), proxy="http://10.0.0.1:3128")
    claim = f"{ENGINE_PROXY_CLAIMS}/hello"
    assert claim in [st.path for st in engine_steps(with_proxy) if isinstance(st, File)]
    assert not any(isinstance(st, DockerProxyDropped) for st in engine_steps(with_proxy))
    dropin = f"rm -f {ENGINE_PROXY_DROPIN} {ENGINE_PROXY_ENV}"
    # the proxy unset on a docker app: its claim and the drop-in go, the running docker restarts
    change = dropped(app(src(tmp_path))).plan(engine_facts(["hello"]), set())
    assert change.commands[:2] == [f"rm -f {claim}", dropin] and change.summary == "remove the drop-in"
    assert change.commands[2:] == ["systemctl daemon-reload", "if systemctl is-active --quiet docker.service; "
                                   "then systemctl restart docker.service; fi"]
    # an older provision's drop-in (no claims) goes on a docker app's deploy: its settings are docker's now
    assert dropped(app(src(tmp_path))).plan(engine_facts(None), set()).commands[0] == dropin
    # podman now: the claim and drop-in go; docker, which this app no longer uses, is not restarted
    podman = dropped(app(src(tmp_path), engine="podman", proxy="http://10.0.0.1:3128"))
    assert podman.plan(engine_facts(["hello"]), set()).commands == [f"rm -f {claim}", dropin, "systemctl daemon-reload"]
    # another app still claims it: only this app's claim goes
    venv = venv_app(tmp_path)
    change = dropped(venv).plan(engine_facts(["hello", "shop"]), set())
    assert change.commands == [f"rm -f {claim}"] and "other apps keep" in change.summary
    # nothing of this app's: a venv app leaves an unclaimed drop-in alone, and a host without any is a no-op
    assert dropped(venv).plan(engine_facts(None), set()) is None
    assert dropped(app(src(tmp_path))).plan(engine_facts([], dropin=False), set()) is None
    # both kinds of app deploy with it
    for s in (venv, app(src(tmp_path))):
        assert any(isinstance(st, DockerProxyDropped) for st in Deploy(s, scan(s.source), "r1").steps("r1"))


def venv_app(tmp_path):
    """The same app as a virtualenv app (container: false)."""
    (src(tmp_path) / "requirements.txt").write_text("flask\n")
    return cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(src(tmp_path)), proxy="http://10.0.0.1:3128"), ROOT)


def test_a_pulled_image_keeps_only_the_releases_tag_so_pruning_the_release_frees_it(tmp_path):
    """B9: pull + tag kept the registry's tag too; pruning's rmi of the release's tag only untagged it,
    and every image ever pulled stayed on the host. (No registry is reachable here: a real pull is
    not tested on a droplet.)"""
    for engine in ("docker", "podman"):
        s = app(src(tmp_path), image="reg.example.com/hello:1", engine=engine)
        assert image_step(s, "r2").commands[1:3] == (
            f"{engine} pull -q reg.example.com/hello:1 >/dev/null",
            f"{engine} tag reg.example.com/hello:1 localhost/hello:r2")
        # run against an engine that models its tags: the registry's tag goes, unless the host had it
        # before the pull (another app's or the admin's: then it stays theirs)
        bin_dir, tags = tmp_path / engine, tmp_path / f"{engine}.tags"
        bin_dir.mkdir()
        (bin_dir / engine).write_text(
            "#!/bin/sh\n"
            f'T={tags}; touch $T\n'
            'case "$1 $2" in\n'
            '  "image inspect") grep -qx "$5" $T && echo sha256:1 || exit 1 ;;\n'
            '  "pull -q") grep -qx "$3" $T || echo "$3" >> $T ;;\n'
            '  "tag "*) echo "$3" >> $T ;;\n'
            '  "rmi "*) grep -vx "$2" $T > $T.new; mv $T.new $T ;;\n'
            'esac\n')
        (bin_dir / engine).chmod(0o755)
        assert run(image_step(s, "r2").commands, bin_dir).returncode == 0
        assert tags.read_text().split() == ["localhost/hello:r2"]
        tags.write_text("reg.example.com/hello:1\n")
        assert run(image_step(s, "r3").commands, bin_dir).returncode == 0
        assert tags.read_text().split() == ["reg.example.com/hello:1", "localhost/hello:r3"]


# -- switching an app between a virtualenv and a container (app.container toggled) ------------------

def kind_facts(s, live_venv: str | None, images: bool, sockets: bool, live="a"):
    """A host whose live release (in slot ``live``) was made with venv key ``live_venv`` (None: none
    live); ``images``: an engine the app no longer uses holds its images; ``sockets``: the virtualenv
    app's socket units are there."""
    step = KindLeftovers(s)
    lay = s.layout
    own = {"type": "dir", "owner": "root", "group": "root", "mode": 0o755}
    answers = {("content", meta_path(s)): json.dumps({"id": "r1", "venv": live_venv}) if live_venv else None,
               ("file", f"{lay.current}/.provision"): own if live_venv else None,
               ("content", lay.upstream_file): lay.upstream(live) if live_venv else None,
               ("command", step.probe): 1 if images else 0}
    answers.update({("file", p): ({"type": "file"} if sockets else None) for p in step.sockets})
    return step, Facts(answers)


def test_a_switch_of_kind_takes_away_what_the_other_kind_left_once_traffic_moved(tmp_path):
    """B13: container false -> true -> false left the virtualenv app's socket units active and the
    container app's images on the host."""
    container, venv = app(src(tmp_path)), venv_app(tmp_path)
    # virtualenv -> container: the switch moved traffic: the socket units stop and go
    step, facts = kind_facts(container, "abc123", images=False, sockets=True)
    change = step.plan(facts, {"switched"})
    assert change.commands == [
        "systemctl stop hello@a.socket hello@b.socket || true",
        "rm -f /etc/systemd/system/hello@.socket /etc/systemd/system/sockets.target.wants/hello@a.socket "
        "/etc/systemd/system/sockets.target.wants/hello@b.socket",
        "systemctl daemon-reload"]
    # ... but not while the virtualenv release still serves (a fleet's commit may go back to it)
    assert step.plan(facts, set()) is None
    # a later deploy (the live release a container one now) finishes what an interrupted one left
    step, facts = kind_facts(container, "container-docker", images=False, sockets=True)
    assert step.plan(facts, set()).commands[0].startswith("systemctl stop hello@a.socket")
    # container -> virtualenv: the old slot (live before the switch) has stopped before its images go
    step, facts = kind_facts(venv, "container-docker", images=True, sockets=False)
    change = step.plan(facts, {"switched"})
    assert change.commands[0] == "systemctl stop hello@a.service"
    assert "docker podman; do command -v $e" in change.commands[1] and '$e rmi localhost/hello:"$t"' in change.commands[1]
    # nothing left: nothing to do (a no-op deploy stays one round trip)
    step, facts = kind_facts(venv, "abc123", images=False, sockets=False)
    assert step.plan(facts, {"switched"}) is None and step.plan(facts, set()) is None
    # docker -> podman: docker's images of the app go, podman's stay
    podman = KindLeftovers(app(src(tmp_path), engine="podman"))
    assert podman.engines == ["docker"] and "podman" not in podman.probe
    # every deploy that may have switched has the step; a fleet's prepare and commit do not
    for s in (container, venv):
        d = Deploy(s, scan(s.source), "r1")
        assert any(isinstance(st, KindLeftovers) for st in d.steps("r1"))
        assert not any(isinstance(st, KindLeftovers) for st in d.steps("r1", "commit") + d.steps("r1", "prepare"))


def test_the_leftovers_probe_never_wakes_a_stopped_docker_and_clears_the_apps_old_containers(tmp_path):
    """Every deploy of every app probes for a container app's images in engines it no longer uses:
    `docker images` with docker's daemon stopped started it (docker.socket). And a container of the app
    left in that engine (a `fab run`) held its image: every later deploy tried again, never a no-op."""
    step = KindLeftovers(venv_app(tmp_path))
    bin_dir, log = fake_systemctl(tmp_path, "inactive")
    calls = tmp_path / "engines.log"
    for engine in ("docker", "podman"):  # each holds images of the app
        (bin_dir / engine).write_text(f'#!/bin/sh\necho "{engine} $*" >> {calls}\n'
                                      '[ "$1" = images ] && echo 0123abcd\n[ "$1" = ps ] && echo c0ffee\nexit 0\n')
        (bin_dir / engine).chmod(0o755)
    assert run([step.probe], bin_dir).returncode == 1  # podman's
    assert "docker" not in calls.read_text() and "podman images -q localhost/hello" in calls.read_text()
    bin_dir, log = fake_systemctl(tmp_path, "active")
    calls.unlink()
    assert run([step.probe], bin_dir).returncode == 1
    assert calls.read_text().startswith("docker images -q localhost/hello")
    step, facts = kind_facts(venv_app(tmp_path), "container-docker", images=True, sockets=False)
    calls.unlink()
    assert run(step.plan(facts, {"switched"}).commands[1:], bin_dir).returncode == 0
    said = calls.read_text().splitlines()
    assert said.index("docker ps -aq --filter label=provision.app=hello") < said.index("docker rm -f c0ffee") \
        < said.index("docker rmi localhost/hello:0123abcd")


def switch_to_r2(h, engine):
    """The switch of release r2 into slot b, run as on a host (test_switch's fakes), as a rollback."""
    health = {"path": "/health", "host": "", "timeout": 0.3, "header": None}
    command = switch_command(h.layout, "r2", "b", "a", "rollback", "me", health, False, engine=engine)
    return subprocess.run(["bash", "-c", command], text=True, capture_output=True, timeout=30,
                          env=dict(os.environ, FAKE=h.base, PATH=f"{h.base}/bin:{os.environ['PATH']}"))


@contextlib.contextmanager
def switch_host():
    """test_switch's host tree (r1 live in slot a, r2 uploaded) and fakes."""
    base = tempfile.mkdtemp(prefix="sw", dir="/tmp")  # short: room for a unix socket's path
    h = SwitchHost(base)
    try:
        yield h
    finally:
        for server in h.servers:
            server.shutdown()
            server.server_close()
        subprocess.run(["rm", "-rf", base], check=True)


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the switch refuses a release that is not root's")


@as_root
def test_a_rollback_to_a_release_of_the_other_kind_is_refused_in_one_line_naming_the_fix():
    """B13: it failed with "no image ... (it was pruned?)" or "no complete virtualenv (it was pruned?)"."""
    with switch_host() as h:
        own = f"{h.layout.release('r2')}/.provision"
        for venv, engine, said in (
                ("k", "docker", "is a virtualenv app's and the app is a container app's (docker) now"),
                ("container-docker", None, "is a container app's (docker) and the app is a virtualenv app's now"),
                ("container-docker", "podman", "is a container app's (docker) and the app is a container app's "
                                               "(podman) now")):
            h.write(f"{own}/release.json", json.dumps({"venv": venv}))
            before = h.snapshot()
            res = switch_to_r2(h, engine)
            assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
            assert f"release r2 {said} (app.container or app.engine changed since)" in res.stderr
            assert "deploy the app instead" in res.stderr and h.snapshot() == before and h.calls() == []
        # a release of the app's kind goes on (here to its health gate, which nothing answers)
        h.write(f"{own}/release.json", json.dumps({"venv": "k"}))
        res = switch_to_r2(h, None)
        assert "changed since" not in res.stderr and "health check of release r2 failed" in res.stderr


@as_root
def test_a_fifo_in_place_of_a_releases_meta_never_holds_the_switch():
    """An older release was the app's (app-owned layouts): a FIFO in place of its release.json held root's
    switch (and the deploy lock) forever, waiting for a writer; it is refused like any release not root's."""
    with switch_host() as h:
        own = f"{h.layout.release('r2')}/.provision"
        h.write(f"{own}/release.json", "")
        os.unlink(f"{own}/release.json")
        os.mkfifo(f"{own}/release.json")
        res = switch_to_r2(h, None)  # its timeout (30 s) fails the test: the old switch never returned
        assert res.returncode == 1, res.stderr


@as_root
def test_a_slot_whose_start_job_is_still_queued_is_not_taken_for_one_that_exited():
    """Right after `systemctl start --no-block`, a start job queued behind another (a docker restart,
    a busy host) leaves the unit "inactive" with a job pending: the gate refused such a release at once
    ("exited (it is dead)", an empty log), now it waits for the answer."""
    with switch_host() as h:
        h.write(f"{h.base}/state", "ActiveState=inactive\nSubState=dead\nNRestarts=0\nJob=4242\n")
        h.gunicorn(answers=False)  # not yet: the gate asks systemd whether it still starts
        res = h.switch(timeout=0.5)
        assert "no healthy answer within 0.5s" in res.stderr and "exited" not in res.stderr, res.stderr
        h.write(f"{h.base}/state", "ActiveState=inactive\nSubState=dead\nNRestarts=0\n")  # no job: it exited
        res = h.switch(timeout=5)
        assert res.returncode == 1 and "hello@b exited (it is dead)" in res.stderr, res.stderr


@as_root
def test_a_start_systemd_refuses_is_refused_at_once_not_after_the_health_timeout():
    """`systemctl start` that queues no job (the unit cannot load, a dependency refused) leaves the unit
    inactive with no job: refused at once with systemd's words, not after the gate's whole timeout."""
    import time

    with switch_host() as h:
        h.write(f"{h.base}/bin/systemctl", SYSTEMCTL.replace(
            "exit 0\n", '[ "$1" = start ] && { echo "A dependency job for hello@b.service failed."; exit 1; }\n'
                        "exit 0\n"), 0o755)
        h.write(f"{h.base}/state", "ActiveState=inactive\nSubState=dead\nNRestarts=0\nInactiveExitTimestampMonotonic=5\n")
        t0 = time.monotonic()
        res = h.switch(timeout=20)
        assert time.monotonic() - t0 < 5
        assert res.returncode == 1 and "hello@b could not start: A dependency job for hello@b.service failed." \
            in res.stderr, res.stderr


def systemd_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines read as systemd's parser (src/basic/env-file.c) reads them: outside quotes a
    backslash takes the next character, a double quote opens a quoted part; inside double quotes a
    backslash takes the next character when it is one of \\ " ` $ and is kept otherwise; inside single
    quotes nothing is special; whitespace at the end of an unquoted value is dropped."""
    out = {}
    for line in text.splitlines():
        key, _, raw = line.partition("=")
        value, i, quote = "", 0, None
        while i < len(raw):
            c = raw[i]
            if quote is None and c in "\"'":
                quote = c
            elif quote == c:
                quote = None
            elif c == "\\" and quote != "'" and i + 1 < len(raw):
                i += 1
                value += raw[i] if quote is None or raw[i] in '\\"`$' else "\\" + raw[i]
            else:
                value += c
            i += 1
        out[key.strip()] = value if quote else value.rstrip()
    return out


def test_the_proxy_reaches_docker_as_written_whatever_its_password_holds(tmp_path):
    """Nit: the values went raw into the EnvironmentFile: a password with " \\ ' or a space was misread."""
    proxy = "http://bob:p\"a\\s's`$HOME%20x@10.0.0.1:3128"
    s = app(src(tmp_path), proxy=proxy)
    [env] = [st for st in engine_steps(s) if isinstance(st, File) and st.path == ENGINE_PROXY_ENV]
    assert systemd_env_file(env.content.decode()) == {
        "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
        "no_proxy": "localhost,127.0.0.1,::1"}
    assert env.mode == 0o600 and env.sensitive


def test_a_dockerfile_declaring_the_proxy_arguments_is_refused_when_the_proxy_has_a_password(tmp_path):
    """Nit: docker's history keeps a declared build argument's value: `|1 http_proxy=http://bob:pw@... /bin/sh
    -c ...` (seen on a droplet's docker 20.10)."""
    secret = "http://bob:Hq7pw@10.0.0.1:3128"
    for i, (dockerfile, proxy, refused) in enumerate((
            ("FROM x\nARG http_proxy\nRUN true\n", secret, "http_proxy"),
            ("FROM x\narg  A=1 https_proxy=http://y:1\n", secret, "https_proxy"),
            ("FROM x\nARG A \\\n  http_proxy\n", secret, "http_proxy"),
            ("FROM x\nARG http_proxy\n", "http://10.0.0.1:3128", None),  # no password: nothing secret
            ("FROM x\nARG HTTP_PROXY no_proxy\n", secret, None),  # not passed with a value / not secret
            ("FROM x\nRUN echo ARG http_proxy\n", secret, None))):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "Dockerfile").write_text("FROM x\n")
        s = app(d, proxy=proxy)
        (d / "Dockerfile").write_text(dockerfile)
        if refused:
            with pytest.raises(ProvisionError, match=f"declares ARG {refused}: the image's history .* remove that ARG"):
                Deploy(s, scan(s.source), "r1")
        else:
            Deploy(s, scan(s.source), "r1")
    # a pulled image builds nothing
    (tmp_path / "0" / "Dockerfile").write_text("FROM x\nARG http_proxy\n")
    s = app(tmp_path / "0", proxy=secret, image="reg.example.com/x:1")
    Deploy(s, scan(s.source), "r1")
