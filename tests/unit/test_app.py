"""The app's desired state planned against a fresh host's recorded facts."""

import json
from pathlib import Path

import pytest

from provision import config as cfg
from provision.app import Release, deploy_steps, provision_steps, proxy_env
from provision.errors import ProvisionError
from provision.source import scan
from provision.steps import Facts, collect_facts, plan

ROOT = Path(__file__).resolve().parents[2]
FRESH_SERVICE = {"loaded": False, "active": False, "enabled": False, "pid": 0}


def settings(**over):
    return cfg.build(cfg.layer(dict(cfg.DEFAULTS), {}, {}, over), ROOT)


def fresh_facts(steps):
    answers = {}
    for kind, arg in collect_facts(steps):
        answers[(kind, arg)] = {"package": False, "service": FRESH_SERVICE, "http": 0, "command": 1}.get(kind)
    return Facts(answers)


def test_fresh_host_changes_everything_in_a_safe_order():
    s = settings(proxy="http://10.0.0.1:3128", ca_bundle="/etc/ssl/certs/ca-certificates.crt")
    src = scan(s.source)
    steps = deploy_steps(s, src, src.release_id(0))
    planned = plan(steps, fresh_facts(steps))
    names = [p.step.name for p in planned if p.change]
    order = [next(i for i, n in enumerate(names) if n.startswith(prefix)) for prefix in (
        "file /etc/apt/apt.conf.d/80provision-proxy", "file /usr/local/share/ca-certificates",
        "packages python3-venv", "user hello", "virtualenv", "packages python3-venv nginx", "release",
        "file /etc/systemd/system/hello.service", "file /etc/nginx/sites-available/hello",
        "absent /etc/nginx/sites-enabled/default", "link /srv/hello/venv", "service hello", "service nginx", "health")]
    assert order == sorted(order)
    by_name = {p.step.name: p for p in planned}
    # the venv builds in the background; the link to it waits; apt-get update runs once
    assert [p.step.name for p in planned if p.change and p.change.background] == [
        "update-ca-certificates", names[order[4]]]
    assert by_name[names[order[4]]].step.barrier  # pip needs the CA in place
    assert by_name["packages python3-venv nginx"].change.summary == "install nginx"
    assert by_name["link /srv/hello/venv"].step.barrier
    assert by_name["packages python3-venv"].change.commands[0] == "apt-get update -qq"
    assert "apt-get update -qq" not in by_name["packages python3-venv nginx"].change.commands
    app = next(p for p in planned if p.step.name == "service hello").change.commands
    assert app == ["systemctl daemon-reload", "systemctl enable --quiet hello", "systemctl restart hello"]
    nginx = next(p for p in planned if p.step.name == "service nginx").change.commands
    assert nginx[-2:] == ["nginx -t -q", "systemctl restart nginx"]
    assert planned[-1].change.check


def test_release_is_skipped_when_the_running_digest_matches():
    s = settings()
    src = scan(s.source)
    step = Release(s, src, "r1")
    running = json.dumps({"digest": src.digest, "id": "r0"})
    assert step.plan(Facts({("content", step.meta_path): running}), set()) is None
    change = step.plan(Facts({("content", step.meta_path): json.dumps({"digest": "old"})}), set())
    assert any("tar -xz" in c for c in change.commands)
    assert change.commands[-1] == "mv -Tf /srv/hello/current.provision-tmp /srv/hello/current"


def test_code_change_reloads_but_requirements_change_restarts(tmp_path):
    (tmp_path / "app.py").write_text("app = None\n")
    (tmp_path / "requirements.txt").write_text("flask\n")
    s = settings(source=str(tmp_path))
    steps = deploy_steps(s, scan(tmp_path), "r1")
    key = next(st for st in steps if st.name.startswith("virtualenv")).creates
    answers = {k: v for k, v in fresh_facts(steps)._answers.items()}
    answers.update({("file", key): {"type": "file"}, ("service", "hello"): dict(FRESH_SERVICE, loaded=True,
                    active=True, enabled=True, pid=5), ("file", "/srv/hello/venv"): {"type": "link", "target":
                    "venvs/" + key.split("/")[4]}})
    planned = {p.step.name: p for p in plan(steps, Facts(answers))}
    assert "systemctl restart hello" in planned["service hello"].change.commands  # unit file is new
    # Same host with the unit in place: only the code changes -> graceful reload
    from provision.steps import File
    for st in steps:
        if isinstance(st, File):
            answers[("file", st.path)] = {"type": "file", "sha256": st.sha256, "mode": st.mode, "owner": st.owner,
                                          "group": st.group}
    planned = {p.step.name: p for p in plan(steps, Facts(answers))}
    cmds = planned["service hello"].change.commands
    assert len(cmds) == 1 and cmds[0].startswith("python3 -c") and "SIGHUP" in cmds[0]


def test_proxy_and_ca_are_settings():
    s = settings(proxy="http://10.0.0.1:3128", ca_bundle="/etc/ssl/certs/ca-certificates.crt")
    assert proxy_env(s)["https_proxy"] == "http://10.0.0.1:3128"
    assert proxy_env(s)["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt"
    assert not proxy_env(settings())
    assert [st.name for st in provision_steps(settings())][0] == "packages python3-venv nginx"


def test_bad_template_variable_fails_before_any_step(tmp_path):
    for t in (ROOT / "templates").iterdir():
        (tmp_path / t.name).write_text(t.read_text())
    (tmp_path / "nginx-site.conf.j2").write_text("server_name {{ domain_typo }};\n")
    s = settings(templates=str(tmp_path))
    with pytest.raises(ProvisionError, match="'domain_typo' is undefined"):
        deploy_steps(s, scan(s.source), "r1")
