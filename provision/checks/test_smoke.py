"""Built-in smoke checks run by `fab check` against every selected host."""

import json


def test_nginx_installed_enabled_running(host):
    assert host.package("nginx").is_installed
    nginx = host.service("nginx")
    assert nginx.is_enabled
    assert nginx.is_running


def live_slot(host, app):
    return host.file(f"{app['root']}/live-slot").content_string.strip()


def test_app_service_enabled_running(host, app):
    assert host.file(f"/etc/systemd/system/{app['name']}@.service").exists
    slot = live_slot(host, app)
    svc = host.service(f"{app['name']}@{slot}")
    assert svc.is_enabled
    assert svc.is_running
    idle = host.service(f"{app['name']}@{'b' if slot == 'a' else 'a'}")
    assert not idle.is_running and not idle.is_enabled


def test_app_socket_listening_and_nginx_points_at_it(host, app):
    sock = f"/run/{app['name']}/{live_slot(host, app)}/gunicorn.sock"
    assert host.socket(f"unix://{sock}").is_listening
    assert sock in host.file(f"/etc/nginx/provision/{app['name']}.upstream").content_string


def test_live_release_is_current(host, app):
    slot_target = host.file(f"{app['root']}/slots/{live_slot(host, app)}").linked_to
    assert slot_target == host.file(f"{app['root']}/current").linked_to


def test_nginx_config_valid(host):
    res = host.run("nginx -t")
    assert res.rc == 0, res.stderr


def test_http_through_nginx_answers_200(host, app):
    host_header = "" if app["server_name"] == "_" else app["server_name"].split()[0]
    probe = (
        "import sys,urllib.request as u,urllib.error as e\n"
        "o=u.build_opener(u.ProxyHandler({}))\n"
        "h={'Host':sys.argv[2]} if sys.argv[2] else {}\n"
        "try: print(o.open(u.Request(sys.argv[1],headers=h),timeout=10).status)\n"
        "except e.HTTPError as x: print(x.code)\n"
    )
    res = host.run("python3 -c %s %s %s", probe, "http://127.0.0.1" + app["health_path"], host_header)
    assert res.stdout.strip() == "200", res.stdout + res.stderr


def test_release_owned_by_app_user_not_world_writable(host, app):
    current = host.file(f"{app['root']}/current")
    assert current.is_symlink
    release = host.file(f"{app['root']}/{current.linked_to.split(app['root'] + '/', 1)[-1]}")
    assert release.is_directory
    assert release.user == app["user"]
    meta = json.loads(host.file(f"{app['root']}/current/.provision-release").content_string)
    assert meta["digest"]
    for tree in (f"{app['root']}/current/", f"{app['root']}/current/.venv/"):
        wrong_owner = host.check_output("find %s ! -user %s ! -type l -print -quit", tree, app["user"])
        assert wrong_owner == "", f"not owned by {app['user']}: {wrong_owner}"
        writable = host.check_output("find %s -perm -o+w ! -type l -print -quit", tree)
        assert writable == "", f"world-writable: {writable}"
