"""The Flask tutorial's shape (flaskr): a package with create_app(), pyproject.toml and no
requirements.txt, its SQLite database in Flask's instance/ folder, deployed from its own
repository through settings only; the data outlives a code-change deploy."""

import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

FAB = str(Path(sys.executable).with_name("fab"))
FILES = {
    "pyproject.toml": """\
[project]
name = "flaskr"
version = "1.0.0"
dependencies = ["flask>=3,<4"]
""",
    "flaskr/__init__.py": """\
import os

from flask import Flask, request


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(DATABASE=os.path.join(app.instance_path, "flaskr.sqlite"))
    os.makedirs(app.instance_path, exist_ok=True)
    from . import db
    db.init_app(app)

    @app.get("/")
    def index():
        posts = db.get_db().execute("SELECT body FROM post ORDER BY id").fetchall()
        return "Posts: " + ", ".join(p["body"] for p in posts) + "\\n"

    @app.post("/create")
    def create():
        conn = db.get_db()
        conn.execute("INSERT INTO post (body) VALUES (?)", (request.form["body"],))
        conn.commit()
        return "created\\n"

    return app
""",
    "flaskr/db.py": """\
import sqlite3

import click
from flask import current_app, g


def get_db():
    if "db" not in g:
        g.db = sqlite3.connect(current_app.config["DATABASE"])
        g.db.row_factory = sqlite3.Row
    return g.db


def close_db(e=None):
    db = g.pop("db", None)
    if db is not None:
        db.close()


@click.command("init-db")
def init_db_command():
    get_db().executescript(current_app.open_resource("schema.sql").read().decode())
    click.echo("Initialized the database.")


def init_app(app):
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
""",
    "flaskr/schema.sql": "CREATE TABLE IF NOT EXISTS post (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);\n",
}
SETTINGS = """\
  wsgi: flaskr:create_app()
  linked_dirs: [log, instance]
  release_command: flask --app flaskr init-db
"""
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flaskr") / "flaskr-app"
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    init = subprocess.run([sys.executable, "-m", "provision", "init", "--name", "flaskr"], cwd=root,
                          capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    assert "no requirements.txt" not in init.stdout  # pyproject.toml says what to install
    with open(root / "fabric.yaml", "a") as fh:
        fh.write(SETTINGS)
    return root


def fab(droplet, project, *args):
    return subprocess.run([FAB, "-H", droplet.name, *args], cwd=project, env=droplet.env(), capture_output=True,
                          text=True, timeout=600)


def page(address: str, path: str = "/", form: dict | None = None) -> str:
    data = urllib.parse.urlencode(form).encode() if form else None
    with OPENER.open(f"http://{address}{path}", data=data, timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def test_the_tutorials_shape_deploys_and_its_instance_data_outlives_a_release(droplet, project):
    res = fab(droplet, project, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Initialized the database." in res.stdout  # the release command ran, its output shown
    assert page(droplet.address) == "Posts: \n"
    assert page(droplet.address, "/create", {"body": "first"}) == "created\n"
    # the database is in shared/instance (the app's), not inside the release
    assert droplet.sh("stat -c %U /srv/flaskr/shared/instance/flaskr.sqlite").strip() == "flaskr"
    init = project / "flaskr/__init__.py"
    init.write_text(init.read_text().replace('"Posts: "', '"All posts: "'))
    res = fab(droplet, project, "deploy")
    assert res.returncode == 0, res.stdout + res.stderr
    assert page(droplet.address) == "All posts: first\n"
    assert "the live release holds data" not in res.stdout  # nothing left behind in a release
