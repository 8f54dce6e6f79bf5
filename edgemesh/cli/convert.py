"""`edgemesh convert`: a checkpoint -> an edgemesh model package (per-layer ONNX)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors


def command(
    source: Annotated[
        str,
        typer.Argument(
            help="A local Hugging Face model folder, a .gguf file, or 'gemma-3-270m' "
            "(the default model's package)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the package into.")],
    precisions: Annotated[
        str, typer.Option(help="Comma-separated precisions to produce (fp32 is required).")
    ] = "fp32,fp16,int8,int4",
    name: Annotated[str | None, typer.Option(help="Model name in the manifest.")] = None,
    evaluate: Annotated[
        bool,
        typer.Option("--eval/--no-eval", help="Measure perplexity per precision (accuracy)."),
    ] = True,
    eval_tokens: Annotated[
        int | None, typer.Option(help="Evaluate on at most this many tokens of the text.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for export and eval.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Convert a decoder-only LLM into a package that can be cut into layer ranges.

    Nothing is downloaded. Every layer becomes its own ONNX graph at every
    precision; `edgemesh generate` and the mesh compose any range [start, stop)
    from them in seconds.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        from edgemesh.models import DEFAULT_MODEL, default_model_path
        from edgemesh.sharding.convert.run import ConvertOptions, convert

        path: Path | str = source
        if source == DEFAULT_MODEL:
            path = default_model_path()
            name = name or DEFAULT_MODEL
        options = ConvertOptions(
            precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
            name=name,
            evaluate=evaluate,
            eval_tokens=eval_tokens,
            threads=threads,
            overwrite=overwrite,
        )
        say = None if json_output else (lambda msg: typer.echo(msg, err=True))
        report = convert(path, out, options, progress=say)
    summary = report.to_dict()
    if json_output:
        print_json(summary)
        return
    typer.echo(f"wrote {summary['package']} ({summary['bytes'] / 1e6:.1f} MB)")
    typer.echo(
        f"  {summary['architecture']}, {summary['layers']} layers, precisions "
        f"{', '.join(summary['precisions'])}"
    )
    typer.echo(
        f"  export {summary['seconds_export']} s, eval {summary['seconds_eval']} s, "
        f"peak memory {summary['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    for precision, ppl in summary["perplexity"].items():
        loss = summary["accuracy"].get(precision)
        shown = "" if loss is None else f" ({loss * 100:+.2f}% vs fp32)"
        typer.echo(f"  perplexity {precision}: {ppl:.3f}{shown}")
    if summary["accuracy_note"]:
        typer.echo(f"  {summary['accuracy_note']}")
