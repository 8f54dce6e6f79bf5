"""`edgemesh bench ...`: measurements that docs quote (never pass/fail)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors

app = typer.Typer(
    help="Benchmarks: print ratios against a reference measured in the same run.",
    no_args_is_help=True,
)


@app.command("single")
def single(
    model: Annotated[str | None, typer.Option(help="A .gguf file; default: gemma-3-270m.")] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to decode per run.")] = 128,
    threads: Annotated[int | None, typer.Option(help="CPU threads (same for all).")] = None,
    repeats: Annotated[int, typer.Option(help="Runs per engine; the median is kept.")] = 3,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Single box: edgemesh vs llama-cpp-python on the same model and bit width."""
    from edgemesh.bench import single as bench_single

    with user_errors():
        result = bench_single.run(
            model=model, tokens=tokens, threads=threads, repeats=repeats, out=out
        )
    if json_out:
        print_json(result)
    else:
        typer.echo(bench_single.render(result))
