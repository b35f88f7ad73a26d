"""The app's desired state planned against a fresh host's recorded facts."""

import json
import shlex
from pathlib import Path

import pytest

from provision import config as cfg
from provision.app import Deploy, provision_steps, proxy_env, rendered
from provision.release import Release, manifest_path, meta_path, slot_facts
from provision.errors import ProvisionError
from provision.source import scan
from provision.facts import Facts, collect_facts
from provision.steps import plan

ROOT = Path(__file__).resolve().parents[2]
FRESH_SERVICE = {"loaded": False, "active": False, "enabled": False, "pid": 0}


def LINK(target):
    return {"type": "link", "target": target, "mode": 0o777, "owner": "root", "group": "root"}


def settings(**over):
    return cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, over), ROOT)


def fresh_facts(steps, found=None):
    """A host that has nothing the steps ask about, but the answers in ``found``."""
    answers = {}
    for kind, arg in collect_facts(steps):
        answers[(kind, arg)] = {"package": False, "service": FRESH_SERVICE, "http": 0, "command": 1}.get(kind)
    return Facts({**answers, **(found or {})})


def test_fresh_host_changes_everything_in_a_safe_order():
    s = settings(proxy="http://10.0.0.1:3128", ca_bundle="/etc/ssl/certs/ca-certificates.crt")
    src = scan(s.source)
    steps = Deploy(s, src, src.release_id(0)).steps(src.release_id(0))
    planned = plan(steps, fresh_facts(steps))
    names = [p.step.name for p in planned if p.change]
    order = [next(i for i, n in enumerate(names) if n.startswith(prefix)) for prefix in (
        "file /etc/apt/apt.conf.d/80provision-proxy", "file /usr/local/share/ca-certificates",
        "packages python3-pip-whl", "user hello", "virtualenv", "packages python3-venv python3-pip-whl nginx",
        "release",
        "file /etc/systemd/system/hello@.socket", "switch hello", "prune",
        # Debian's welcome site is a default server too: gone before the app's site is enabled (and tested)
        "absent /etc/nginx/sites-enabled/default", "file /etc/nginx/sites-available/hello", "service nginx",
        "health")]
    assert order == sorted(order)
    by_name = {p.step.name: p for p in planned}
    # the venv builds in the background; the switch waits for it; apt-get update runs once
    venv = names[order[4]]
    assert [p.step.name for p in planned if p.change and p.change.background] == ["update-ca-certificates", venv]
    assert by_name[venv].step.barrier  # pip needs the CA in place
    assert by_name["switch hello"].step.barrier
    assert by_name["packages python3-pip-whl"].change.commands[0] == "apt-get update -qq"
    second = by_name["packages python3-venv python3-pip-whl nginx"].change
    assert "apt-get update -qq" not in second.commands and second.summary == "install python3-venv nginx"
    switch = json.loads(shlex.split(by_name["switch hello"].change.commands[0])[-1])
    assert switch == dict(switch, old=None, release=src.release_id(0), daemon_reload=True, action="deploy")
    assert switch["new"]["slot"] == "a"
    nginx = by_name["service nginx"].change.commands
    assert nginx[-2] == "nginx -t -q" and shlex.split(nginx[-1])[:2] == ["python3", "-c"]
    # nginx_reload.py: returns once the old workers are gone
    assert json.loads(shlex.split(nginx[-1])[-1]) == {"service": "nginx", "action": "reload-or-restart",
                                                      "pid_file": "/run/nginx.pid"}
    assert planned[-1].change.check


def test_a_second_default_server_on_the_host_is_refused_while_planning():
    s = settings(name="second")
    src = scan(s.source)
    steps = Deploy(s, src, src.release_id(0)).steps(src.release_id(0))
    facts = fresh_facts(steps, {("files", "/etc/nginx/sites-enabled"): {
        "hello": rendered(settings(), "nginx-site.conf.j2").decode()}})
    with pytest.raises(ProvisionError, match=r"^app second and app hello \(/etc/nginx/sites-enabled/hello\) are both "
                                             "nginx's default server for port 80; give one of them a server_name"):
        plan(steps, facts)


CONFIGS = {"unit": b"[Service]\n", "gunicorn.conf.py": b"workers = 2\n"}
ROOTS = {"type": "dir", "mode": 0o755, "owner": "root", "group": "root"}


def live(meta, own=ROOTS, idle=None):
    """Facts of a host whose live release (slot a) has ``meta``; ``idle``: the meta of the release
    the idle slot b runs."""
    return Facts({("content", meta_path(settings())): json.dumps(meta), ("content", manifest_path(settings())): None,
                  ("file", "/srv/hello/current"): LINK("releases/r0"), ("file", "/srv/hello/current/.provision"): own,
                  ("content", "/etc/nginx/provision/hello.upstream"): settings().layout.upstream("a"),
                  ("content", "/srv/hello/slots/a/.provision/release.json"): json.dumps(meta),
                  ("file", "/srv/hello/slots/a/.provision"): own, ("file", "/srv/hello/slots/a"): LINK("../releases/r0"),
                  ("content", "/srv/hello/slots/b/.provision/release.json"): idle and json.dumps(idle),
                  ("file", "/srv/hello/slots/b/.provision"): idle and ROOTS,
                  ("file", "/srv/hello/slots/b"): idle and LINK(f"../releases/{idle['id']}")})


def test_release_is_skipped_when_the_running_digest_venv_and_configs_match():
    s = settings()
    src = scan(s.source)
    step = Release(s, src, "r1", "venvkey", CONFIGS)
    same = {"digest": src.digest, "id": "r0", "venv": "venvkey", "config": step.config}
    assert step.plan(live(same), set()) is None and step.target(live(same)) == "r0"
    for changed in ({"venv": "old"}, {"config": "old"}, {"digest": "old"}):
        facts = live(dict(same, **changed))
        change = step.plan(facts, set())
        assert step.target(facts) == "r1", changed
    assert any("tar -xz" in c for c in change.commands)
    assert "ln -sfn ../../venvs/venvkey /srv/hello/releases/r1.provision-tmp/.venv" in change.commands
    assert any(c.startswith("ln -s /srv/hello/shared/.env ") for c in " ".join(change.commands).split(" && "))
    assert change.commands[-1] == "rm -rf /srv/hello/releases/r1 && mv -T /srv/hello/releases/r1.provision-tmp " \
                                  "/srv/hello/releases/r1"
    # the configs a slot runs are part of the release, written by root (from the upload)
    assert dict(change.upload.extra)[".provision/unit"] == CONFIGS["unit"]
    assert not any("chown" in c for c in change.commands)


def test_a_release_prepared_in_the_idle_slot_is_used_instead_of_a_new_upload():
    s = settings()
    src = scan(s.source)
    step = Release(s, src, "r2", "venvkey", CONFIGS)
    new = {"digest": src.digest, "venv": "venvkey", "config": step.config}
    old = dict(new, id="r0", digest="old")
    facts = live(old, idle=dict(new, id="r1"))
    assert step.plan(facts, set()) is None and step.target(facts) == "r1"
    # content decides, not the id: another source, virtualenv or config in the idle slot is not it
    for other in ({"digest": "x"}, {"venv": "x"}, {"config": "x"}, {"linked": {"files": [], "dirs": []}}):
        facts = live(old, idle=dict(new, id="r1", **other))
        assert step.plan(facts, set()) is not None and step.target(facts) == "r2", other
    # a release.json that names another release than the slot runs (tampered, moved) is not trusted
    facts = live(old, idle=dict(new, id="r1"))
    facts._answers[("file", "/srv/hello/slots/b")] = LINK("../releases/r9")
    assert step.target(facts) == "r2"
    # nor one that is not root's
    facts = live(old, idle=dict(new, id="r1"))
    facts._answers[("file", "/srv/hello/slots/b/.provision")] = dict(ROOTS, owner="hello")
    assert step.target(facts) == "r2"
    # the live release itself is never "prepared"
    assert step.target(live(dict(new, id="r0"))) == "r0"


def test_a_live_release_root_did_not_make_is_replaced():
    s = settings()
    src = scan(s.source)
    step = Release(s, src, "r1", "venvkey", CONFIGS)
    same = {"digest": src.digest, "id": "r0", "venv": "venvkey", "config": step.config}
    assert step.target(live(same, own=dict(ROOTS, owner="hello"))) == "r1"  # an older layout, app-owned
    assert step.target(live(same, own=None)) == "r1"


def test_a_plain_directory_current_is_kept_as_a_release():
    s = settings()
    step = Release(s, scan(s.source), "20260101T000000Z-abc", "k", CONFIGS)
    facts = Facts({**dict.fromkeys(slot_facts(s)), ("content", meta_path(s)): None,
                   ("file", "/srv/hello/current"): {"type": "dir"},
                   ("file", "/srv/hello/current/.provision"): None})
    cmds = step.plan(facts, set()).commands
    assert cmds[0] == "mv -T /srv/hello/current /srv/hello/releases/20260101T000000Z-legacy"


def test_proxy_and_ca_are_settings():
    s = settings(proxy="http://10.0.0.1:3128", ca_bundle="/etc/ssl/certs/ca-certificates.crt")
    assert proxy_env(s)["https_proxy"] == "http://10.0.0.1:3128"
    assert proxy_env(s)["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt"
    assert not proxy_env(settings())
    assert [st.name for st in provision_steps(settings())][0] == "packages python3-venv python3-pip-whl nginx"


def test_bad_template_variable_fails_before_any_step(tmp_path):
    for t in (ROOT / "provision/templates").iterdir():
        (tmp_path / t.name).write_text(t.read_text())
    (tmp_path / "nginx-site.conf.j2").write_text("server_name {{ domain_typo }};\n")
    s = settings(templates=str(tmp_path))
    with pytest.raises(ProvisionError, match="'domain_typo' is undefined"):
        Deploy(s, scan(s.source), "r1")


def test_a_template_that_renders_a_secret_is_refused(tmp_path):
    for t in (ROOT / "provision/templates").iterdir():
        (tmp_path / t.name).write_text(t.read_text())
    with open(tmp_path / "app@.service.j2", "a") as fh:
        fh.write("Environment=API_TOKEN={{ api_token }}\n")  # units are world-readable
    s = settings(templates=str(tmp_path), var_api_token="s3cr3t-token")
    with pytest.raises(ProvisionError, match="renders a secret .* shared/.env"):
        Deploy(s, scan(s.source), "r1")


def test_the_target_is_decided_once_from_the_facts_and_the_steps_get_the_value():
    s = settings()
    src = scan(s.source)
    deploy = Deploy(s, src, "r1")
    # a step's facts never depend on the target: steps(None) tells the runner what to gather
    assert collect_facts(deploy.steps(None)) == collect_facts(deploy.steps("r1"))
    assert set(deploy.release.facts()) <= set(deploy.facts())
    fresh = fresh_facts(deploy.steps("r1"))
    assert deploy.target(fresh) == "r1"  # nothing live: the new release
    switch = next(st for st in deploy.steps("r1") if st.name == "switch hello")
    prune = next(st for st in deploy.steps("r1") if st.name.startswith("prune"))
    assert switch.target == prune.target == "r1"


def test_a_release_s_origin_goes_into_its_meta_and_the_release_log_line_but_does_not_make_it_new():
    s = settings()
    src = scan(s.source)
    origin = {"commit": "f" * 40, "tests": {"result": "passed", "seconds": 4.0}, "via": "ship"}
    steps = Deploy(s, src, "r1", origin=origin).steps("r1")
    planned = {p.step.name: p for p in plan(steps, fresh_facts(steps))}
    release = next(p for n, p in planned.items() if n.startswith("release "))
    own = dict(release.change.upload.extra)
    assert json.loads(own[".provision/release.json"])["origin"] == origin
    switch = json.loads(shlex.split(planned["switch hello"].change.commands[0])[-1])
    assert switch["log"] == origin
    # the same tree shipped again with another test run is the same release
    again = Release(s, src, "r2", release.step.venv_key, release.step.configs, origin={"commit": "0" * 40})
    assert again.same(json.loads(own[".provision/release.json"]))
