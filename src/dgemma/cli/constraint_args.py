"""The structured-output options of `dgemma generate`: --json-schema FILE | --regex RE | --choice A,B,C | --grammar
FILE, read and checked (before any weights load) into a `dgemma.Constraint`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CLIError


def add_constraint_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (the output is valid by construction; at most one)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="FILE", help="a JSON Schema file the output must validate against")
    one.add_argument("--regex", metavar="RE", help="a regular expression the whole output must match")
    one.add_argument("--choice", metavar="A,B,C", help="comma-separated strings; the output is one of them")
    one.add_argument("--grammar", metavar="FILE", help="a grammar file in llguidance's Lark syntax")
    g.add_argument("--constraint-policy", choices=("argmax", "dp"), default="argmax",
                   help="how a pass's draft is made valid: masked argmax left to right (default), or the dynamic "
                        "program for the most probable valid canvas")


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read the {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def constraint_from_args(args: argparse.Namespace):
    """The `Constraint` the options ask for (checked: a bad one is a `CLIError`), or None."""
    from ..sampling.grammar import Constraint, ConstraintError

    try:
        if args.json_schema is not None:
            text = _read(args.json_schema, "JSON schema")
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as e:
                raise CLIError(f"{args.json_schema} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
            constraint = Constraint(json_schema=schema)
        elif args.regex is not None:
            constraint = Constraint(regex=args.regex)
        elif args.choice is not None:
            constraint = Constraint(choice=[c for c in args.choice.split(",") if c] if args.choice.strip(",") else [])
        elif args.grammar is not None:
            constraint = Constraint(grammar=_read(args.grammar, "grammar"))
        else:
            return None
        constraint.source()  # compiles the grammar text: errors surface before the weights load
    except ConstraintError as e:
        raise CLIError(str(e)) from None
    return constraint
