"""`edgemesh import`: a PyTorch, TensorFlow, PaddlePaddle or ONNX model -> a graph package."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors


def command(
    model: Annotated[
        str,
        typer.Argument(
            help="model.pt2 (torch.export), model.pt (TorchScript), module:factory, a "
            "SavedModel folder, model.keras, a Paddle inference model, or model.onnx."
        ),
    ],
    out: Annotated[Path, typer.Option(help="The graph package folder to write.")],
    calibration: Annotated[
        Path | None,
        typer.Option(help="Folder of images/.npy/.npz samples: int8 static QDQ + accuracy."),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="Example input shape, e.g. 1,3,224,224 (repeat per input; TorchScript, "
            "factories without examples, Keras models without fixed shapes).",
        ),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option("--precision", help="Precisions to produce (repeatable); default all."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset for the exporters.")] = 18,
    name: Annotated[str | None, typer.Option(help="Model name; default: the folder's.")] = None,
    task: Annotated[
        str | None, typer.Option(help="classifier or generic; default: guessed from outputs.")
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406")
    ] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225")] = None,
    scale: Annotated[float, typer.Option(help="Pixel scale before mean/std.")] = 1 / 255,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "warning",
) -> None:
    """Import a model into a graph package: fp32/fp16/int8 ONNX, each measured against the
    source framework's own outputs (graph.json). Serve it with `edgemesh serve --model DIR`."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from edgemesh.errors import ConfigError
    from edgemesh.graph.build import PRECISIONS, BuildOptions, build_package
    from edgemesh.graph.sources import ImportOptions, parse_shape

    with user_errors():
        preprocessing = None
        if mean or std:
            preprocessing = {
                "scale": scale,
                "mean": _floats(mean, "--mean") if mean else [0.0],
                "std": _floats(std, "--std") if std else [1.0],
            }
        if task not in (None, "classifier", "generic"):
            raise ConfigError(f"--task must be classifier or generic, got '{task}'")
        manifest = build_package(
            model,
            out,
            BuildOptions(
                name=name,
                calibration=calibration,
                precisions=tuple(precision) if precision else PRECISIONS,
                preprocessing=preprocessing,
                task=task,
                import_options=ImportOptions(
                    input_shapes=tuple(parse_shape(s) for s in input_shape or ()), opset=opset
                ),
                force=force,
            ),
        )
    if json_out:
        print_json(manifest.to_dict())
        return
    typer.echo(
        f"imported {manifest.source.framework} {manifest.source.version or ''} -> {out} "
        f"in {manifest.import_seconds} s (opset {manifest.opset}, task {manifest.task})"
    )
    for p, entry in manifest.precisions.items():
        acc = entry.accuracy
        top1 = (
            "" if acc is None or acc.top1_agreement is None else f", top-1 {acc.top1_agreement:.3f}"
        )
        figures = (
            ""
            if acc is None
            else f"max abs {acc.max_abs:.3g}, rel L2 {acc.rel_l2:.3g}{top1}, "
            f"loss {acc.loss:.4f} on {acc.samples} {acc.sample_source} samples"
        )
        typer.echo(f"  {p:5} {entry.method:11} {entry.bytes / 1e6:8.2f} MB  {figures}")


def _floats(text: str, flag: str) -> list[float]:
    from edgemesh.errors import ConfigError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got '{text}'") from None
