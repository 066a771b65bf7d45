"""Conventions shared by every command: `--json` output, `--set` overrides, one-line user errors."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the result as one JSON document on stdout (for scripts and CI)."
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe field, e.g. --set train.lr=2e-4 (command line > recipe > default).",
)


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print `result` as one JSON document when --json is given, else as rich text via `render`."""
    if as_json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False, indent=2, default=str) + "\n")
    else:
        render(result)


def console():
    """A rich console; when piped (not a terminal) it is wide enough that tables are not wrapped mid-word."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)
