"""`python -m provision init` and `python -m provision template [NAME]`: a project's start.

Errors are one line on stderr, exit 2; nothing is written then."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import scaffold
from .errors import ProvisionError
from .render import NAMES

NEXT_STEPS = """\
next:
  edit fabric.yaml (app settings) and inventory.ini (your hosts)
  fab -H HOST deploy          HOST: an inventory alias or group, or user@address
  fab -H HOST check           smoke checks, plus yours from checks/test_*.py
  python -m provision template NAME > templates/NAME   to start your own version of a template
"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own prints the usage first: one line is enough
        raise ProvisionError(f"{message}; see `python -m provision --help`")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m provision", description="Start a provision project: in your app's directory, "
               "`python -m provision init`, then `fab -H HOST deploy` (`fab --list`: every task).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    init = sub.add_parser("init", help="write fabfile.py, fabric.yaml and inventory.ini into this directory",
                          description="Write fabfile.py, fabric.yaml and inventory.ini into the current "
                          "directory; refuses if any of them exists.")
    init.add_argument("--name", help="app name (default: the directory's name, made valid)")
    template = sub.add_parser("template", help="print one of the kit's templates, to start yours from; "
                              "no NAME: list them", description="Print a default template. A file of the same "
                              "name in templates/ beside the fabfile replaces it.")
    template.add_argument("name", nargs="?", metavar="NAME", help=", ".join(NAMES))
    return p


def init(root: Path, name: str | None) -> None:
    found = scaffold.existing(root)
    if found:
        raise ProvisionError(f"{', '.join(found)} already {'exists' if len(found) == 1 else 'exist'} in {root}; "
                             "run init in a directory without them, or move them away")
    plan = scaffold.plan(root, name)
    written = []
    try:
        for f, text in plan.files.items():
            with open(root / f, "x") as out:  # never over a file that appeared meanwhile
                written.append(root / f)
                out.write(text)
    except OSError as e:  # all or nothing: what was written goes again
        for path in written:
            path.unlink(missing_ok=True)
        raise ProvisionError(f"cannot write {e.filename or root}: {e.strerror or e}; nothing was written")
    print(f"wrote {', '.join(plan.files)} (app.name {plan.name}, app.wsgi {plan.wsgi or 'not set'})")
    for note in plan.notes:
        print(f"note: {note}")
    print(NEXT_STEPS, end="")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.command == "init":
            init(Path.cwd(), args.name)
        elif args.command == "template":
            print(scaffold.template_text(args.name), end="")
        else:
            parser().print_help()
    except ProvisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
