"""Helpers shared by CLI commands: error reporting and JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from edgemesh.errors import EdgemeshError


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn an EdgemeshError into a one-line message and exit code 1."""
    try:
        yield
    except EdgemeshError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
