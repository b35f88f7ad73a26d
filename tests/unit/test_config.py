from pathlib import Path

import pytest

from provision import config as cfg
from provision import secrets
from provision.errors import ProvisionError

ROOT = Path(__file__).resolve().parents[2]


def build(**over):
    return cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, over), ROOT)


def test_defaults_are_valid():
    s = build()
    assert s.name == "hello" and s.source == ROOT / "examples/hello" and s.layout.root == "/srv/hello"
    assert s.requirements == ROOT / "examples/hello/requirements.txt"
    assert s.workers == 2 and s.proxy == "" and s.ca_bundle is None


def test_layers_config_inventory_env_flags():
    raw = cfg.layer({"workers": 2, "name": "a"}, {"name": "from-env"}, {"workers": "4", "name": "inv"}, {"name": "flag"})
    assert raw == {"workers": "4", "name": "flag"}
    raw = cfg.layer({"name": "a"}, {"name": "from-env"}, {"name": "inv"}, {"name": None})
    assert raw["name"] == "from-env"


def test_take_env_takes_the_fabric_app_variables():
    env = {"FABRIC_APP_PACKAGES": "curl,git", "FABRIC_APP_VAR_API_TOKEN": "t", "FABRIC_PORT": "22", "HOME": "/root"}
    assert cfg.take_env(env) == {"packages": "curl,git", "var_api_token": "t"}
    assert env == {"FABRIC_PORT": "22", "HOME": "/root"}


def test_strings_from_inventory_and_env_are_typed():
    s = build(workers="8", packages="libpq5, curl")
    assert s.workers == 8 and s.packages == ("libpq5", "curl")


@pytest.mark.parametrize("over,message", [
    ({"name": "Bad Name"}, "app.name"),
    ({"source": "no/such/dir"}, "no such directory"),
    ({"requirements": "nope.txt"}, "no such file"),
    ({"wsgi": "app"}, "module:callable"),
    ({"workers": "many"}, "whole number"),
    ({"workers": 0}, "whole number"),
    ({"health_path": "health"}, "starting with /"),
    ({"proxy": "proxy:3128"}, "HOST:PORT"),
    ({"packages": ["ok", "Bad;rm"]}, "Debian package"),
    ({"packages": 5}, "app.packages=5: expected a list"),
    ({"packages": [[1]]}, "app.packages=.*expected a list"),
    ({"linked_files": 5}, "app.linked_files=5: expected a list"),
    ({"linked_dirs": {"log": 1}}, "app.linked_dirs=.*expected a list"),
    ({"colour": "blue"}, "unknown setting app.colour"),
])
def test_invalid_settings_give_one_clear_line(over, message):
    with pytest.raises(ProvisionError, match=message) as e:
        build(**over)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["root", "mail", "www-data", "nobody", "sshd", "systemd-network", "postgres", "sudo"])
def test_names_of_system_accounts_are_refused(name):
    with pytest.raises(ProvisionError, match=f"app.name='{name}': .*choose another app name") as e:
        build(name=name)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("name", "hello\n"), ("packages", ["curl\n"]), ("proxy", "http://proxy:3128\n"), ("linked_files", [".env\n"]),
    ("python", "python3\n"), ("wsgi", "app:app\n"),
])
def test_validation_matches_the_whole_value(key, value):
    with pytest.raises(ProvisionError, match=f"app.{key}"):
        build(**{key: value})


@pytest.mark.parametrize("wsgi", ["app:app", "mysite.wsgi:application", "app:create_app()", "_a.b_2:_f"])
def test_wsgi_module_callable_or_factory(wsgi):
    assert build(wsgi=wsgi).wsgi == wsgi


@pytest.mark.parametrize("wsgi", [
    'app:f("+str(__import__("os").system("id"))+")', "app:create_app(1)", "app:f()()", "app:app()x",
    "app.:app", "a..b:app", ".app:app", "app:a.b", "1app:app", "app:app\n", "app:ａpp",
])
def test_wsgi_anything_else_is_refused(wsgi):
    with pytest.raises(ProvisionError, match="app.wsgi"):
        build(wsgi=wsgi)


def test_template_vars_include_own_vars():
    s = build(var_region="fra1")
    v = s.template_vars()
    assert v["region"] == "fra1" and v["upstream_file"] == "/etc/nginx/provision/hello.upstream"
    assert s.layout.socket("b") == "/run/provision/hello/b.sock"


def test_proxy_credentials_are_secrets_and_never_in_messages():
    s = build(proxy="http://bob:s3cret@proxy.corp:3128", var_api_token="tok-123", var_region="fra1")
    assert s.proxy == "http://bob:s3cret@proxy.corp:3128"
    assert set(s.secrets) == {"s3cret", "tok-123"}
    with pytest.raises(ProvisionError) as e:
        build(proxy="ftp://bob:s3cret@proxy.corp")
    assert "s3cret" not in str(e.value) and "****" in str(e.value)


@pytest.mark.parametrize("url,masked", [
    ("http://bob:s3cret@proxy:3128", "http://bob:****@proxy:3128"),
    ("http://bob:s3 cret@proxy:3128", "http://bob:****@proxy:3128"),
    ("http://bob:s3cret@@proxy", "http://bob:****@proxy"),
    ("bob:s3cret@proxy:3128", "bob:****@proxy:3128"),
    ("http://proxy:3128", "http://proxy:3128"),
    ("http://bob@proxy:3128", "http://bob@proxy:3128"),
])
def test_mask_url_valid_or_not(url, masked):
    assert cfg.mask_url(url) == masked


def test_secrets_are_known_before_anything_is_validated():
    with pytest.raises(ProvisionError) as e:
        build(var_db_password="pw-4711", proxy="http://bob:hunter2@proxy:3128", workers="many")
    assert secrets.mask(f"{e.value} pw-4711 hunter2") == f"{e.value} **** ****"


def test_inventory_vars_secrets():
    assert set(cfg.secret_values({"proxy": "http://u:pw1@p:1", "var_api_KEY": "k1", "var_region": "fra1",
                                  "workers": "4"})) == {"pw1", "k1"}


@pytest.mark.parametrize("value", [".", "./log", "log/", "a//b", "log/.", ".."])
def test_linked_paths_name_something_inside_the_release(value):
    with pytest.raises(ProvisionError, match="expected a path inside the release"):
        cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello", linked_dirs=[value]), ROOT)


def test_checks_belong_to_the_app_source(tmp_path):
    (tmp_path / "requirements.txt").write_text("flask\n")
    assert cfg.build(dict(cfg.DEFAULTS, name="hello", source=str(tmp_path)), ROOT).checks == tmp_path / "checks"
    assert cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), ROOT).checks == ROOT / "examples/hello/checks"


@pytest.mark.parametrize("over", [{"linked_dirs": ["uploads", "uploads/thumbs"]},
                                  {"linked_dirs": ["data"], "linked_files": [".env", "data/db.sqlite3"]}])
def test_nothing_is_linked_inside_a_linked_dir(over):
    with pytest.raises(ProvisionError, match="inside linked dir"):
        cfg.build(dict(cfg.DEFAULTS, name="hello", source="examples/hello", **over), ROOT)


@pytest.mark.parametrize("var", ["var_shared", "var_workers", "var_user", "var_sockets"])
def test_a_template_variable_that_provision_sets_is_refused_not_overwritten(var):
    with pytest.raises(ProvisionError, match=rf"invalid setting app\.{var}=.*templates already get"):
        build(**{var: "mine"})
