import ast
from pathlib import Path

import pytest

from provision import config as cfg
from provision.errors import ProvisionError
from provision.render import render

ROOT = Path(__file__).resolve().parents[2]


def settings(**over):
    return cfg.build(cfg.layer(dict(cfg.DEFAULTS, name="hello", source="examples/hello"), {}, {}, over), ROOT)


def test_project_templates_render():
    v = settings(server_name="example.com www.example.com").template_vars()
    site = render(ROOT / "provision/templates", "nginx-site.conf.j2", v)
    assert "server_name example.com www.example.com;" in site and "default_server" not in site
    assert "include /etc/nginx/provision/hello.upstream;" in site
    unit = render(ROOT / "provision/templates", "app@.service.j2", v)
    assert ("ExecStart=/srv/hello/slots/%i/.venv/bin/gunicorn --config /srv/hello/slots/%i/.provision/gunicorn.conf.py "
            "--chdir /srv/hello/slots/%i\n") in unit
    assert "Requires=hello@%i.socket" in unit
    assert "User=hello" in unit
    conf = render(ROOT / "provision/templates", "gunicorn.conf.py.j2", v)
    compile(conf, "gunicorn.conf.py", "exec")
    assert "wsgi_app = 'app:app'" in conf and "workers = 2" in conf


def test_wsgi_is_rendered_as_a_string_literal():
    wsgi = 'app:f("+str(__import__("os").system("id"))+"\')\\'
    conf = render(ROOT / "provision/templates", "gunicorn.conf.py.j2", dict(settings().template_vars(), wsgi=wsgi))
    assigned = {n.targets[0].id: n.value for n in ast.parse(conf).body if isinstance(n, ast.Assign)}
    assert isinstance(assigned["wsgi_app"], ast.Constant) and assigned["wsgi_app"].value == wsgi


def test_undefined_variable_fails_with_one_line(tmp_path):
    (tmp_path / "t.j2").write_text("listen {{ port }};\n")
    with pytest.raises(ProvisionError, match="'port' is undefined") as e:
        render(tmp_path, "t.j2", {})
    assert "\n" not in str(e.value)


def test_undefined_in_an_included_template_names_its_line(tmp_path):
    (tmp_path / "t.j2").write_text("{% include 'i.j2' %}\n")
    (tmp_path / "i.j2").write_text("\n\n{{ workers.nope }}\n")
    with pytest.raises(ProvisionError, match=r"i.j2:3: 'int object' has no attribute 'nope'"):
        render(tmp_path, "t.j2", {"workers": 2})


def test_missing_template_and_syntax_error(tmp_path):
    with pytest.raises(ProvisionError, match="not found"):
        render(tmp_path, "nope.j2", {})
    (tmp_path / "bad.j2").write_text("{% if %}")
    with pytest.raises(ProvisionError, match="bad.j2:1"):
        render(tmp_path, "bad.j2", {})


def test_error_while_rendering_names_the_template_and_line(tmp_path):
    (tmp_path / "t.j2").write_text("a\n{{ workers / 0 }}\n")
    with pytest.raises(ProvisionError, match=r"t.j2:2: ZeroDivisionError: division by zero; fix the template") as e:
        render(tmp_path, "t.j2", {"workers": 2})
    assert "\n" not in str(e.value)


def test_an_error_names_the_template_that_failed_the_kits_or_the_projects(tmp_path):
    variables = dict(settings().template_vars())
    del variables["graceful_timeout"]
    with pytest.raises(ProvisionError, match=r"template .*/provision/templates/gunicorn.conf.py.j2:\d+: "
                                             "'graceful_timeout' is undefined"):
        render(tmp_path, "gunicorn.conf.py.j2", variables)  # the project overrides nothing: the kit's failed
    own = tmp_path / "templates"
    own.mkdir()
    (own / "gunicorn.conf.py.j2").write_text("x = 1\n{{ nope }}\n")
    with pytest.raises(ProvisionError, match=rf"template {own}/gunicorn.conf.py.j2:2: 'nope' is undefined"):
        render(own, "gunicorn.conf.py.j2", variables)
