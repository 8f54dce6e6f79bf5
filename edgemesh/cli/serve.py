"""`edgemesh serve`: one box serving a model over the OpenAI API."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import user_errors


def command(
    model: Annotated[
        str | None,
        typer.Option(help="A .gguf file or converted package folder; default: gemma-3-270m."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="EDGEMESH_API_KEY",
            help="Require 'Authorization: Bearer KEY' (repeatable).",
        ),
    ] = None,
    context: Annotated[int, typer.Option(help="Context length per sequence.")] = 4096,
    max_sequences: Annotated[int, typer.Option(help="Sequences decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Waiting requests before 429.")] = 32,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads; default: the box's effective cores.")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Packages: onnxruntime or openvino; default: the first this box's "
            "fingerprint calls for that runs packages."
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Packages: fp32, fp16, int8 or int4; default: the box's, moved towards "
            "fp32 until the package has it within its accuracy budget."
        ),
    ] = None,
    chat_template: Annotated[
        Path | None, typer.Option(help="Jinja chat template file overriding the model's.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
) -> None:
    """Serve a model from this box alone (OpenAI API: /v1/completions, /v1/chat/completions)."""
    import uvicorn

    from edgemesh import models
    from edgemesh.gateway import create_app
    from edgemesh.local import LocalOptions, load_service

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        source = models.resolve(model)
        service = load_service(
            source,
            LocalOptions(
                threads=threads or _default_threads(),
                context_length=context,
                max_sequences=max_sequences,
                max_queue=max_queue,
                backend=backend,
                precision=precision,
                chat_template=chat_template,
            ),
        )
    app = create_app([service], api_keys=api_key or ())
    runtime = "/".join(str(service.info[k]) for k in ("backend", "precision") if k in service.info)
    typer.echo(
        f"serving '{service.name}' on http://{host}:{port}/v1 "
        f"({runtime}, context {service.context_length})",
        err=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    finally:
        service.close()


def _default_threads() -> int:
    from edgemesh.errors import EdgemeshError

    try:
        from edgemesh.fingerprint import collect

        return max(1, round(collect().to_dict()["cpu"]["cores_effective"]))
    except (ImportError, KeyError, EdgemeshError):
        # A fingerprint problem must not stop serving: fall back to the affinity mask.
        return len(os.sched_getaffinity(0))
