"""Configs are dataclasses whose fields are the CLI flags (one source of truth), and every CLI ends alike: a
user's mistake is one `error:` line and exit status 1 (2 for bad flags), Ctrl-C is status 130."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import MISSING, field


def flag(default=MISSING, help: str = "", **argparse_kw):  # noqa: A002 - mirrors argparse's name
    """A dataclass field that is also a documented CLI flag. No default makes it required; `nargs="?"` makes it
    an optional positional argument; other keywords go to argparse (nargs, choices)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _kind(f: dataclasses.Field) -> type:
    """The value type of a field's flag: its default's, else its annotation's (a string under `annotations`)."""
    if _default(f) is not MISSING and _default(f) is not None:
        return type(_default(f))
    annotation = str(f.type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def add_flags(parser: argparse.ArgumentParser, *classes: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field (--snake-case, dest = the field's name); bools are --x / --no-x."""
    for cls in classes:
        group = parser.add_argument_group(cls.__name__) if len(classes) > 1 else parser
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            kw = {k: v for k, v in f.metadata.items() if k != "help"}
            kw["help"] = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help ("95%")
            default = _default(f)
            if kw.get("nargs") == "?":  # an optional positional argument
                group.add_argument(f.name, type=_kind(f), default=default, **kw)
                continue
            if default is MISSING:
                kw["required"] = True
            else:
                kw["default"] = default
            name = "--" + f.name.replace("_", "-")
            if isinstance(default, bool) or (default is None and "bool" in str(f.type)):
                group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, **kw)
            else:
                group.add_argument(name, dest=f.name, type=_kind(f), **kw)


def parser_for(*classes: type, prog: str | None = None, description: str = "") -> Parser:
    parser = Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, *classes)
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> set[str]:
    """Names of the fields the user set on the command line (so hardware defaults fill only the rest)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def config_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run_cli(
    body: Callable[[], int | None],
    errors: tuple[type[BaseException], ...] = (ValueError, OSError),
    interrupted: str = "interrupted",
) -> int:
    """Run a CLI's work: the errors a user can cause become one `error:` line and status 1; Ctrl-C is 130."""
    try:
        return body() or 0
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
