"""`edgemesh slim`: AWQ/GPTQ int4, FFN and depth pruning, distillation, quality report.

    edgemesh slim PKG --method awq --bits 4 [--calibration text.txt] --out DIR
    edgemesh slim PKG --method prune-ffn --ratio 0.4 [--recover-steps N] --out DIR
    edgemesh slim PKG --method prune-depth --layers 2 --out DIR
    edgemesh slim distill --teacher PKG_OR_HF --student HF_DIR --text corpus.txt --steps N --out DIR
    edgemesh slim report PKG...

``slim PKG`` runs the hidden ``run`` command: the group treats a first
argument that is not a sub-command as the package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from edgemesh.cli._common import print_json, user_errors


class _PackageFirst(TyperGroup):
    """``edgemesh slim PKG ...`` means ``edgemesh slim run PKG ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_PackageFirst,
    help=(
        "Make a package smaller or faster and measure what it costs (docs/SLIMMING.md).\n\n"
        "edgemesh slim PKG --method awq|gptq|rtn|prune-ffn|prune-depth --out DIR [options]; "
        "`edgemesh slim run --help` lists the options."
    ),
    no_args_is_help=True,
)

METHODS = "awq, gptq, rtn (4-bit weights); prune-ffn, prune-depth (structure)"


def _say(json_output: bool) -> Any:
    return None if json_output else (lambda msg: typer.echo(msg, err=True))


def _summary(result: Any, json_output: bool) -> None:
    data = result.to_dict()
    if json_output:
        print_json(data)
        return
    typer.echo(f"wrote {data['package']} ({data['method']}, {data['seconds']} s)")
    ref = data["reference"]
    typer.echo(f"  fp32 reference: held-out perplexity {ref['perplexity']:.3f}")
    for p, q in data["quality"].items():
        loss = data["loss_vs_fp32"][p]
        speed = q["decode_tokens_per_s"]
        typer.echo(
            f"  {p}: perplexity {q['perplexity']:.3f} ({loss * 100:+.1f}% vs fp32), "
            f"{q['disk_bytes'] / 1e6:.1f} MB" + (f", {speed} tokens/s" if speed else "")
        )


@app.command("run", hidden=True)
def run(
    package: Annotated[Path, typer.Argument(help="A package made by `edgemesh convert`.")],
    method: Annotated[str, typer.Option(help=METHODS)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the new package.")],
    bits: Annotated[int, typer.Option(help="Weight bits for awq/gptq/rtn (4).")] = 4,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Calibration text (default: the bundled text's calibration part)."),
    ] = None,
    ratio: Annotated[
        float | None, typer.Option(help="prune-ffn: share of channels removed.")
    ] = None,
    layers: Annotated[int | None, typer.Option(help="prune-depth: layers removed.")] = None,
    recover_steps: Annotated[
        int, typer.Option(help="Pruning: distillation steps from the unpruned model after.")
    ] = 0,
    source: Annotated[
        Path | None, typer.Option(help="Pruning: the checkpoint the package came from.")
    ] = None,
    precisions: Annotated[
        str | None, typer.Option(help="Pruning: precisions to export (default: the package's).")
    ] = None,
    save_hf: Annotated[
        Path | None, typer.Option(help="Pruning: also keep the pruned Hugging Face folder here.")
    ] = None,
    score: Annotated[
        bool, typer.Option("--score/--no-score", help="Run the downstream score too.")
    ] = True,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Slim PKG with one method into a new package at --out, and measure it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        from edgemesh.errors import SlimInputError

        say = _say(json_output)
        if method in ("awq", "gptq", "rtn"):
            from edgemesh.sharding.slim.weights import slim_weights

            result = slim_weights(
                package,
                out,
                method=method,
                bits=bits,
                calibration=calibration,
                threads=threads,
                overwrite=overwrite,
                score=score,
                progress=say,
            )
        elif method in ("prune-ffn", "prune-depth"):
            from edgemesh.sharding.slim.pruning import slim_prune

            result = slim_prune(
                package,
                out,
                method=method,
                ratio=ratio,
                layers=layers,
                recover_steps=recover_steps,
                calibration=calibration,
                source=source,
                precisions=tuple(p.strip() for p in precisions.split(",")) if precisions else None,
                save_hf_to=save_hf,
                threads=threads,
                overwrite=overwrite,
                score=score,
                progress=say,
            )
        else:
            raise SlimInputError(f"unknown --method '{method}'", hint=METHODS)
    _summary(result, json_output)


@app.command("distill")
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher: a package, or a HF folder / .gguf.")],
    student: Annotated[Path, typer.Option(help="Student: a Hugging Face folder.")],
    steps: Annotated[int, typer.Option(help="Training steps (one 128-token window each).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the student's package.")],
    text: Annotated[
        Path | None, typer.Option(help="Training text (default: the bundled calibration part).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 1.0,
    score: Annotated[bool, typer.Option("--score/--no-score")] = True,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Train a student on a teacher's logits (KL), resumable; package the student."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        from edgemesh.sharding.slim.distillation import slim_distill

        bar = None if json_output else typer.progressbar(length=steps, label="distilling")
        shown = [0]

        def step(done: int, total: int, loss: float) -> None:
            if bar is not None:
                bar.update(done - shown[0])
                shown[0] = done
                bar.label = f"distilling (KL {loss:.4f})"

        try:
            result = slim_distill(
                teacher,
                student,
                text,
                out,
                steps=steps,
                lr=lr,
                temperature=temperature,
                threads=threads,
                overwrite=overwrite,
                score=score,
                progress=_say(json_output),
                step_progress=step,
            )
        finally:
            if bar is not None:
                bar.render_finish()
    _summary(result, json_output)


@app.command("report")
def report(
    packages: Annotated[list[Path], typer.Argument(help="Packages to compare.")],
    precision: Annotated[
        str | None, typer.Option(help="Precisions to show (default: the measured ones).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for measuring.")] = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The quality table (docs/SLIMMING.md) for the packages given."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        from edgemesh.sharding.slim.report import markdown
        from edgemesh.sharding.slim.report import report as build

        wanted = [p.strip() for p in precision.split(",")] if precision else None
        rows = build(packages, precisions=wanted, threads=threads, say=_say(json_output))
    if json_output:
        print_json([r.to_dict() for r in rows])
        return
    typer.echo(markdown(rows))
