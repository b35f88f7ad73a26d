"""Render templates locally, strictly: a missing variable fails before any host is touched.

A template comes from the project's ``templates/`` folder (``app.templates``) when it holds
one by that name, else from the kit's defaults (``provision/templates/``)."""

from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path

import jinja2

from .errors import ProvisionError


KIT_TEMPLATES = Path(__file__).with_name("templates")
NAMES = ("nginx-site.conf.j2", "app@.service.j2", "gunicorn.conf.py.j2", "container@.service.j2")


def default_template(name: str) -> str:
    """The kit's own version of a template, for users to start theirs from."""
    if name not in NAMES:
        raise ProvisionError(f"no template {name!r}; the templates are {', '.join(NAMES)}")
    return (KIT_TEMPLATES / name).read_text()


@functools.lru_cache(maxsize=None)
def _environment(templates_dir: Path) -> jinja2.Environment:
    # One per folder: each template compiles once per run, however many hosts render it.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(templates_dir), str(KIT_TEMPLATES)]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    # `{{ value | pyrepr }}`: a Python literal of the value, for Python configs: data, never code.
    env.filters["pyrepr"] = repr
    return env


def render(templates_dir: Path, name: str, variables: dict) -> str:
    env = _environment(Path(templates_dir))
    try:
        template = env.get_template(name)  # the project's, else the kit's
    except jinja2.TemplateNotFound as e:
        raise ProvisionError(f"template {e.name} not found in {templates_dir} nor among the kit's ({', '.join(NAMES)}); "
                             "add it or fix the name")
    except jinja2.TemplateSyntaxError as e:
        raise ProvisionError(f"template {e.filename or name}:{e.lineno}: {e.message}; fix the template syntax")
    path = Path(template.filename or Path(templates_dir) / name)
    try:
        return template.render(**variables)
    except jinja2.UndefinedError as e:
        raise ProvisionError(f"template {_where(e, path)}: {e.message}; define it in "
                             "fabric.yaml (app.var_NAME) or the inventory, or fix the template")
    except Exception as e:  # raised by the template's own code, e.g. a division by zero
        raise ProvisionError(f"template {_where(e, path)}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())}; fix the template")


def _where(error: Exception, path: Path) -> str:
    """``file:line`` of the innermost template line in the error's traceback (jinja2 maps
    compiled template code back to template lines), else the template's path."""
    lines = [(frame.f_code.co_filename, n) for frame, n in traceback.walk_tb(error.__traceback__)
             if frame.f_code.co_filename.startswith(f"{path.parent}{os.sep}")]
    return "{}:{}".format(*lines[-1]) if lines else str(path)
