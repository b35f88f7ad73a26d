"""Built-in smoke checks run by `fab check` against every selected host."""

import json

from provision.layout import Layout


def test_nginx_installed_enabled_running(host):
    assert host.package("nginx").is_installed
    nginx = host.service("nginx")
    assert nginx.is_enabled
    assert nginx.is_running


def live_slot(host, app):
    """The slot nginx sends traffic to (the upstream file names its socket, or a container app's port)."""
    slot = Layout(app["name"], container=app.get("container", False)).live_slot(
        host.file(app["upstream_file"]).content_string)
    assert slot, f"{app['upstream_file']} names no slot of {app['name']}; deploy first"
    return slot


def test_app_service_enabled_running(host, app):
    slot = live_slot(host, app)
    live, idle_unit = app["units"][slot], next(u for s, u in app["units"].items() if s != slot)
    assert host.file(app["unit_files"][slot]).user == "root"
    for kind in ("service",) if app.get("container") else ("service", "socket"):
        unit = host.service(f"{live}.{kind}")
        assert unit.is_enabled and unit.is_running, f"{live}.{kind}"
        idle = f"{idle_unit}.{kind}"  # may never have existed
        assert host.run("systemctl is-active --quiet %s", idle).rc != 0, f"{idle} runs"
        assert host.run("systemctl is-enabled --quiet %s", idle).rc != 0, f"{idle} is enabled"


def test_app_socket_only_for_nginx_and_nginx_points_at_it(host, app):
    if app.get("container"):  # its slot's port, published on the host's loopback only
        port = app["slot_ports"][live_slot(host, app)]
        assert host.socket(f"tcp://127.0.0.1:{port}").is_listening
        assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
        return
    sock = app["sockets"][live_slot(host, app)]
    assert host.socket(f"unix://{sock}").is_listening
    f = host.file(sock)
    assert (f.user, f.group, f.mode) == ("root", "www-data", 0o660)


def test_live_release_is_current(host, app):
    slot_target = host.file(f"{app['slots']}/{live_slot(host, app)}").linked_to
    assert slot_target == host.file(app["current"]).linked_to


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


def test_app_runs_nothing_it_can_write(host, app):
    """Root owns the code, the virtualenv, the configs and the links; the app writes only shared/ data."""
    current = host.file(app["current"])
    assert current.is_symlink
    meta = json.loads(host.file(f"{app['current']}/{app['own_dir']}/release.json").content_string)
    assert meta["digest"]
    venv = () if app.get("container") else (f"{app['current']}/{app['venv']}/",)  # a container app has none
    for tree in (f"{app['root']}/", f"{app['current']}/", *venv):
        not_root = host.check_output("find %s -path %s -prune -o ! -user root -print -quit", tree, app["shared"])
        assert not_root == "", f"not owned by root: {not_root}"
        writable = host.check_output("find %s -perm /022 ! -type l -print -quit", tree)
        assert writable == "", f"group- or world-writable: {writable}"
