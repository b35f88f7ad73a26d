"""Processes, timers, static files and maintenance: settings, units, steps (facts in, commands out)."""

import json
import shutil
from pathlib import Path

import pytest

from provision import config as cfg
from provision.app import Deploy, Rollback, rendered
from provision.cli.info import process_unit as logs_unit
from provision.errors import ProvisionError
from provision.facts import Facts, collect_facts
from provision.layout import Layout
from provision.processes import (AppUnits, MaintenanceReady, calendar_check, hardening, maintenance_page,
                                 maintenance_steps, parse_procfile, systemd_quote, unit_steps)
from provision.source import scan
from provision.steps import File, plan

ROOT = Path(__file__).resolve().parents[2]
LAY = Layout("hello")
RUNNING = {"loaded": True, "active": True, "enabled": True, "pid": 7}
STOPPED = {"loaded": False, "active": False, "enabled": False, "pid": 0}
TIMER = {"schedule": "*:0/15", "command": "python manage.py clearsessions"}


def settings(source=None, **over):
    raw = dict(cfg.DEFAULTS, name="hello", source=str(source or ROOT / "examples/hello"))
    return cfg.build(cfg.layer(raw, {}, {}, over), ROOT)


@pytest.fixture
def app(tmp_path):
    shutil.copytree(ROOT / "examples/hello", tmp_path / "app")
    return tmp_path / "app"


def test_procfile_lines_are_name_and_command():
    text = "# the app\nweb: gunicorn app:app\n\nworker:  celery -A app worker --loglevel=info\nrelease: ./migrate\n"
    assert parse_procfile(text) == {"web": "gunicorn app:app", "worker": "celery -A app worker --loglevel=info",
                                    "release": "./migrate"}


@pytest.mark.parametrize("line,why", [
    ("worker python w.py", "expected `name: command`"),
    ("Worker: python w.py", "a process name is lowercase"),
    ("worker:", "expected a shell command"),
    ("worker: a\x07b", "without control characters"),
])
def test_a_bad_procfile_line_is_one_line_naming_it(line, why):
    with pytest.raises(ProvisionError) as e:
        parse_procfile(f"web: gunicorn app:app\n{line}\n", "/app/Procfile")
    assert str(e.value).startswith("/app/Procfile, line 2: ") and why in str(e.value)
    assert str(e.value).endswith("; fix that line") and "\n" not in str(e.value)
    with pytest.raises(ProvisionError, match="line 2: 'web' is there twice"):
        parse_procfile("web: a\nweb: b\n")


def test_the_procfile_gives_processes_and_the_release_command(app):
    (app / "Procfile").write_text("web: gunicorn app:app\nworker: python worker.py\nclock: python clock.py\n"
                                  "release: python manage.py migrate\n")
    s = settings(app)
    assert s.processes == {"clock": "python clock.py", "worker": "python worker.py"}
    assert s.release_command == "python manage.py migrate"
    s = settings(app, processes={"worker": "python other.py", "mail": "python mail.py"}, release_command="true")
    assert s.processes == {"clock": "python clock.py", "mail": "python mail.py", "worker": "python other.py"}
    assert s.release_command == "true"  # the setting wins
    assert settings().processes == {} and settings().release_command == ""  # no Procfile


def test_mappings_come_from_fabric_yaml_or_as_json_from_the_inventory_and_environment():
    s = settings(static='{"/static/": "staticfiles"}', timers=json.dumps({"sessions": TIMER}),
                 processes={"worker": "python w.py"})
    assert s.static == (("/static/", "staticfiles"),) and s.timers == {"sessions": TIMER}
    with pytest.raises(ProvisionError, match=r"^invalid setting app.static='/static/=x': expected a mapping"):
        settings(static="/static/=x")


@pytest.mark.parametrize("over,message", [
    ({"static": {"/": "static"}}, "app.static='/': expected a URL prefix between slashes"),
    ({"static": {"static": "static"}}, "app.static='static': expected a URL prefix"),
    ({"static": {"/a/../b/": "static"}}, "app.static='/a/../b/'"),
    ({"static": {"/s/": "../etc"}}, "app.static./s/='../etc': expected a directory inside the release"),
    ({"static": {"/s/": "."}}, "app.static./s/='.': expected a directory inside the release"),
    ({"static": {"/s/": "/etc/"}}, None),  # the leading slash is dropped: etc inside the release
    ({"static": {"/s/": "a b"}}, "expected a directory inside the release"),
    ({"static": {"/s/": ".provision"}}, "it holds or is '.provision'"),
    ({"static": {"/s/": "uploads/avatars"}}, "it holds or is 'uploads', which is provision's or the app's own"),
    ({"static": {"/s/": "public"}, "linked_dirs": "log,public/media"}, "it holds or is 'public/media'"),
    ({"processes": {"Worker": "x"}}, "app.processes='Worker': use lowercase"),
    ({"processes": {"a.b": "x"}}, "app.processes='a.b'"),
    ({"processes": {"worker": ""}}, "app.processes.worker='': expected a shell command"),
    ({"processes": {"worker": "a\nb"}}, "expected one line"),
    ({"processes": ["worker"]}, "app.processes=['worker']: expected a mapping"),
    ({"timers": {"t": {"schedule": "daily"}}}, "app.timers.t={'schedule': 'daily'}: expected {schedule:"),
    ({"timers": {"t": {"schedule": "daily; rm -rf /", "command": "x"}}}, "app.timers.t.schedule="),
    ({"timers": {"t": {"schedule": "%H", "command": "x"}}}, "expected a systemd calendar expression"),
    ({"timers": {"t": {"schedule": "daily", "command": 3}}}, "app.timers.t.command=3: expected a shell command"),
    ({"timers": {"w": TIMER}, "processes": {"w": "x"}}, "app.timers='w': a process is named 'w' too"),
])
def test_bad_settings_are_one_line(over, message):
    if message is None:
        assert settings(**over).static == (("/s/", "etc"),)
        return
    with pytest.raises(ProvisionError) as e:
        settings(**over)
    assert str(e.value).startswith("invalid setting app.") and message in str(e.value) and "\n" not in str(e.value)


def test_commands_reach_the_shell_as_written():
    assert systemd_quote('echo "$HOME" 100% \\o/') == '"echo \\"$$HOME\\" 100%% \\\\o/"'


def test_processes_take_the_web_units_environment_and_hardening_but_not_its_slot():
    unit = rendered(settings(), "app@.service.j2").decode()
    lines = hardening(unit)
    assert {"NoNewPrivileges=true", "PrivateTmp=true", "EnvironmentFile=-/srv/hello/shared/.env"} <= set(lines)
    assert not any("%i" in l or l.startswith(("ExecStart", "User", "Type", "WorkingDirectory")) for l in lines)
    assert hardening("[Unit]\nPrivateTmp=yes\n[Service]\nProtectSystem=strict\nReadWritePaths=/srv/x/%i\n") == [
        "ProtectSystem=strict"]


def test_a_process_runs_in_the_release_as_the_app_user_and_a_timer_as_a_oneshot():
    s = settings(processes={"worker": "celery -A proj worker"}, timers={"sessions": TIMER})
    files = {st.path: st.content.decode() for st in unit_steps(s, "r1", rendered(s, "app@.service.j2").decode())
             if isinstance(st, File)}
    worker = files["/etc/systemd/system/hello.worker.service"]
    for line in ("User=hello", "Group=hello", "WorkingDirectory=/srv/hello/releases/r1",
                 "Environment=PATH=/srv/hello/releases/r1/.venv/bin:/usr/local/sbin:",
                 "Environment=VIRTUAL_ENV=/srv/hello/releases/r1/.venv", "NoNewPrivileges=true",
                 'ExecStart=/bin/sh -c "celery -A proj worker"', "TimeoutStopSec=35", "Restart=always",
                 "WantedBy=multi-user.target"):
        assert "\n" + line in worker, line
    job = files["/etc/systemd/system/hello.sessions.service"]
    assert "\nType=oneshot\n" in job and '\nExecStart=/bin/sh -c "python manage.py clearsessions"\n' in job
    assert "[Install]" not in job and "Restart=" not in job
    timer = files["/etc/systemd/system/hello.sessions.timer"]
    assert "\nOnCalendar=*:0/15\nAccuracySec=1s\n" in timer and "\nWantedBy=timers.target\n" in timer


def test_a_command_holding_a_secret_is_refused():
    with pytest.raises(ProvisionError) as e:
        settings(var_api_token="s3cr3t-token", timers={"t": dict(TIMER, command="curl -H 'X: s3cr3t-token' x")})
    assert str(e.value).startswith("invalid setting app.timers.t.command=") and "it holds a secret" in str(e.value)


def app_units(s, release="r1"):
    steps = unit_steps(s, release, rendered(s, "app@.service.j2").decode())
    return steps, steps[-1]


def facts_for(steps, ls=(), services=None, same_files=True, calendar=0):
    answers = {}
    for kind, arg in collect_facts(steps):
        answers[(kind, arg)] = {"ls": sorted(ls), "service": (services or {}).get(arg, RUNNING),
                                "command": calendar}.get(kind)
    if same_files:
        for st in steps:
            if isinstance(st, File):
                answers[("file", st.path)] = {"type": "file", "sha256": st.sha256, "owner": "root", "group": "root",
                                              "mode": 0o644}
    return Facts(answers)


def commands(planned):
    return [c for p in planned if p.change for c in p.change.commands]


def test_a_fresh_host_gets_the_units_enabled_and_started():
    s = settings(processes={"worker": "python w.py"}, timers={"sessions": TIMER})
    steps, units = app_units(s)
    planned = plan(steps, facts_for(steps, services={u: STOPPED for u in units.running}, same_files=False))
    cmds = commands(planned)
    assert cmds[-2:] == ["systemctl enable --quiet hello.worker.service hello.sessions.timer",
                         "systemctl start hello.worker.service hello.sessions.timer"]
    assert "systemctl daemon-reload" not in cmds  # enable reloads
    assert planned[-1].change.summary == "start hello.worker.service hello.sessions.timer"


def test_nothing_changed_is_no_change_and_a_new_release_restarts_the_processes_only():
    s = settings(processes={"worker": "python w.py"}, timers={"sessions": TIMER})
    steps, _ = app_units(s)
    facts = facts_for(steps, ls=["hello.worker.service", "hello.sessions.service", "hello.sessions.timer", "nginx"])
    assert commands(plan(steps, facts)) == []
    newer, _ = app_units(s, "r2")  # the unit files hold the release: they change
    planned = plan(newer, facts)
    assert [p.step.name for p in planned if p.change][:3] == [
        "file /etc/systemd/system/hello.worker.service", "file /etc/systemd/system/hello.sessions.service",
        "processes and timers of hello"]
    assert planned[-1].change.commands == ["systemctl daemon-reload", "systemctl restart hello.worker.service"]
    # a new schedule re-arms the timer
    steps, _ = app_units(settings(processes={"worker": "python w.py"}, timers={"sessions": dict(TIMER, schedule="daily")}))
    facts = Facts({**facts._answers, ("command", calendar_check("daily")): 0})
    assert plan(steps, facts)[-1].change.commands == ["systemctl daemon-reload", "systemctl restart hello.sessions.timer"]


def test_a_process_that_is_down_is_started_and_dropped_units_are_removed():
    s = settings(processes={"worker": "python w.py"})
    steps, _ = app_units(s)
    facts = facts_for(steps, ls=["hello.worker.service", "hello.old.service", "hello.tick.timer", "hello.tick.service",
                                 "hellothere.x.service", "other.tick.timer", "hello@a.service"],
                      services={"hello.worker.service": dict(RUNNING, active=False)})
    change = plan(steps, facts)[-1].change
    stale = "hello.old.service hello.tick.service hello.tick.timer"
    assert change.commands == [
        f"systemctl stop {stale} 2>/dev/null || true",
        "rm -f " + " ".join(f"/etc/systemd/system/{d}{u}" for u in stale.split()
                            for d in ("", "multi-user.target.wants/", "timers.target.wants/")),
        "systemctl daemon-reload", "systemctl start hello.worker.service"]
    assert change.summary == f"remove {stale}; start hello.worker.service"
    none, units = app_units(settings())  # none left: still removed
    assert none == [units] and plan(none, facts)[-1].change.summary == (
        "remove hello.old.service hello.tick.service hello.tick.timer hello.worker.service")


def test_a_schedule_the_hosts_systemd_refuses_stops_the_plan():
    steps, units = app_units(settings(timers={"sessions": dict(TIMER, schedule="Mon..Foo 08:00")}))
    assert ("command", calendar_check("Mon..Foo 08:00")) in collect_facts(steps)
    with pytest.raises(ProvisionError, match=r"^invalid setting app.timers.sessions.schedule='Mon..Foo 08:00': "
                                             "systemd on the host refuses it"):
        plan(steps, facts_for(steps, calendar=1))
    assert plan(steps, facts_for(steps, calendar=127))[-1].change is None  # no systemd-analyze: not known


def test_processes_move_after_the_switch_in_deploys_and_rollbacks():
    s = settings(processes={"worker": "python w.py"})
    src = scan(s.source)
    for recipe in (Deploy(s, src, "r1"), Rollback(s, None)):
        names = [st.name for st in recipe.steps("r1")]
        at = names.index("processes and timers of hello")
        assert names.index("switch hello") < names.index("file /etc/systemd/system/hello.worker.service") < at
        assert names[at + 1].startswith("prune") or names[at + 1].startswith("health")
        assert collect_facts(recipe.steps(None)) == collect_facts(recipe.steps("r1"))


def test_the_site_serves_static_directories_from_the_live_release_and_knows_maintenance():
    site = rendered(settings(static={"/static/": "staticfiles", "/media/": "public/media"}),
                    "nginx-site.conf.j2").decode()
    for block in ("location /static/ {\n        alias /srv/hello/current/staticfiles/;\n"
                  "        disable_symlinks on from=/srv/hello/current;\n"
                  "        add_header Cache-Control $provision_static_cache_hello;\n",
                  "location /media/ {\n        alias /srv/hello/current/public/media/;\n",
                  '"~\\.[0-9a-fA-F]{8,}\\.[A-Za-z0-9]+$" "public, max-age=31536000, immutable";',
                  "if (-f /etc/nginx/provision/hello.maintenance.html) {",
                  "if ($provision_local_hello) {", "try_files /maintenance.html @provision_maintenance_hello_default;",
                  "root /etc/nginx/provision;\n        add_header Cache-Control \"no-store\" always;\n"
                  "        try_files /hello.maintenance.html =503;"):
        assert block in site, block
    plain = rendered(settings(), "nginx-site.conf.j2").decode()
    assert "alias" not in plain and "static_cache" not in plain and "hello.maintenance.html" in plain


def test_a_site_of_your_own_that_does_not_serve_a_static_prefix_stops_the_deploy(tmp_path):
    (tmp_path / "nginx-site.conf.j2").write_text("server { location / { proxy_pass http://{{ name }}_app; } }\n")
    s = settings(templates=str(tmp_path), static={"/static/": "staticfiles"})
    with pytest.raises(ProvisionError, match=r"^app.static has /static/: staticfiles, but your nginx-site.conf.j2 "
                                             r"has no `location /static/` for it; "):
        Deploy(s, scan(s.source), "r1")
    Deploy(settings(templates=str(tmp_path)), scan(s.source), "r1")  # no static: nothing to serve


def test_maintenance_writes_an_escaped_page_where_the_site_looks_and_off_removes_it():
    page = maintenance_page("<script>alert(1)</script> & more").decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page and "<script>" not in page
    assert "down for maintenance" in maintenance_page(None).decode()
    ready, write = maintenance_steps(LAY, True, "x")
    assert write.path == LAY.maintenance_file and write.content == maintenance_page("x")
    site = rendered(settings(), "nginx-site.conf.j2").decode()
    assert plan([ready], Facts({("content", LAY.site_enabled): site}))[0].change is None
    for found, why in ((None, "not deployed yet"), ("server {}", "/etc/nginx/provision/hello.maintenance.html is not in")):
        with pytest.raises(ProvisionError, match=f"^the nginx site of app hello has no maintenance mode .*{why}"):
            plan([MaintenanceReady(LAY)], Facts({("content", LAY.site_enabled): found}))
    [off] = maintenance_steps(LAY, False)
    assert plan([off], Facts({("file", LAY.maintenance_file): {"type": "file"}}))[0].change.commands == [
        "rm -rf /etc/nginx/provision/hello.maintenance.html"]


def test_logs_of_one_process_name_one_the_settings_have():
    s = settings(processes={"worker": "python w.py"}, timers={"sessions": TIMER})
    assert logs_unit(s, "worker") == "hello.worker.service" and logs_unit(s, "sessions") == "hello.sessions.service"
    with pytest.raises(ProvisionError, match=r"^app hello has no process or timer 'mail'; it has worker, sessions$"):
        logs_unit(s, "mail")


def test_processes_get_the_apps_whole_environment_in_the_units_order():
    """app.env (the release's), then the secrets, then shared/.env: later ones win, as for the web unit."""
    s = settings(processes={"worker": "python worker.py"}, env={"MODE": "worker"})
    files = {st.path: st.content.decode() for st in unit_steps(s, "r1", rendered(s, "app@.service.j2").decode())
             if isinstance(st, File)}
    envs = [l for l in files["/etc/systemd/system/hello.worker.service"].splitlines() if l.startswith("EnvironmentFile")]
    assert envs == ["EnvironmentFile=-/srv/hello/releases/r1/.provision/env", "EnvironmentFile=-/srv/hello/secrets.env",
                    "EnvironmentFile=-/srv/hello/shared/.env"]


def test_a_static_folder_behind_a_symlink_of_the_app_is_refused_before_any_host(app):
    """Root makes the folders the release command fills: never through a link (this one leads into
    uploads/, a linked dir the app writes, where it could point build at /etc/systemd/system)."""
    (app / "uploads/x").mkdir(parents=True)
    (app / "uploads/x/.keep").write_text("")
    (app / "assets").symlink_to("uploads/x")
    s = settings(app, static={"/static/": "assets/build"}, release_command="python manage.py collectstatic",
                 linked_dirs=["log"])
    with pytest.raises(ProvisionError, match="app.static directory assets/build lies behind the symlink assets"):
        Deploy(s, scan(s.source), "r1")
    s = settings(app, static={"/static/": "uploads/x/build"}, release_command="true", linked_dirs=["log"])
    assert Deploy(s, scan(s.source), "r1").fills == ("uploads/x/build",)  # a real folder: fine
