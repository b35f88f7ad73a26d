"""The bundled example: a minimal Flask app served by provision."""

import os
import socket

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "Hello from provision!\n"


@app.get("/whoami")
def whoami():
    return {"host": socket.gethostname(), "pid": os.getpid()}
