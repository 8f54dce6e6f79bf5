"""Markdown pieces every section of docs/BENCHMARKS.md is built from: a
table, the provenance line under a figure, and the note a figure shows
when its result file is missing.

Its own module so ``report`` (which assembles the page) and each benchmark
that renders its own section (``vision``) share them without importing
each other.
"""

from __future__ import annotations

from typing import Any


def provenance(result: dict[str, Any]) -> str:
    """The command and machine that produced ``result``, as printed under its figure."""
    machine = result.get("machine", "")
    if isinstance(machine, dict):
        machine = ", ".join(f"{k} {v}" for k, v in machine.items())
    when = result.get("measured_at") or result.get("date") or ""
    return f"\n_Command:_ `{result.get('command', '?')}`  \n_Machine:_ {machine} {when}\n"


def missing(command: str) -> str:
    """What a figure says instead of numbers when nobody has run ``command`` yet."""
    return f"\n_Not measured yet: run `{command}`._\n"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats to 3 significant digits (whole numbers from 100), None as —."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n" + "\n".join(lines) + "\n"
