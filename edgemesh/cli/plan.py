"""`edgemesh plan`: which box runs which layers, on which backend and precision, how fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors


def command(
    model: Annotated[
        Path, typer.Option(help="A converted model package folder (holds manifest.json).")
    ],
    boxes: Annotated[
        Path | None,
        typer.Option(
            help="JSON file: a list of boxes (as `edgemesh info --json --measure` prints them, "
            'or hand-written profiles) or {"boxes": [...], "links": [...]}. '
            "Default: this box alone, measured now."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    objective: Annotated[
        str, typer.Option(help="throughput (slowest stage) or latency (one stream).")
    ] = "throughput",
    context: Annotated[
        int | None,
        typer.Option(
            help="Tokens per sequence to reserve KV cache for; default: the model's, ≤ 4096."
        ),
    ] = None,
    sequences: Annotated[int, typer.Option(help="Sequences in flight at once.")] = 4,
    max_accuracy_loss: Annotated[
        float,
        typer.Option(help="Largest relative perplexity increase a precision may cost."),
    ] = 0.10,
    headroom: Annotated[
        float, typer.Option(help="Fraction of each box's memory limit kept free.")
    ] = 0.10,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate",
            help="Without --boxes: also time the model's real layers here (cached) "
            "and price this box from the timings instead of the roofline.",
        ),
    ] = False,
) -> None:
    """Split a model's layers over boxes and predict tokens/s (exit 1 if it cannot fit)."""
    from edgemesh.errors import ConfigError
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.boxes import BoxProfile, load_boxes
    from edgemesh.sharding.planner.costs import PlanOptions
    from edgemesh.sharding.planner.explain import render_plan
    from edgemesh.sharding.planner.plan import plan, whole_model_backends

    with user_errors():
        manifest = Manifest.load(model)
        options = PlanOptions(
            objective=objective,
            context=context,
            sequences=sequences,
            max_accuracy_loss=max_accuracy_loss,
            headroom=headroom,
            whole_model_only=whole_model_backends(),
        )
        if boxes is not None:
            if calibrate:
                raise ConfigError(
                    "--calibrate times this box; with --boxes, calibrate each box instead",
                    hint="run `edgemesh info --json --measure --calibrate MODEL` on every box",
                )
            box_list, links = load_boxes(boxes)
        else:
            from edgemesh.fingerprint import collect

            fp = collect(measure=True, calibrate=[model] if calibrate else None)
            box_list, links = [BoxProfile.from_dict(fp.to_dict())], []
        result = plan(manifest, box_list, links, options)
    if json_output:
        print_json(result.to_dict())
    else:
        typer.echo(render_plan(result))
    from edgemesh.sharding.planner.costs import unmeasured_note

    note = unmeasured_note(manifest, max_accuracy_loss)
    if note:
        typer.echo(note, err=True)
