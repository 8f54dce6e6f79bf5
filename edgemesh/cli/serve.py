"""`edgemesh serve`: one box serving a model over the OpenAI API."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import user_errors
from edgemesh.limits import DEFAULT_LIMITS


def command(
    model: Annotated[
        str | None,
        typer.Option(help="A .gguf file or converted package folder; default: gemma-3-270m."),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. The default, 127.0.0.1, is this box only; "
            "--host 0.0.0.0 opens the API and the dashboard to the network (set --api-key)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="EDGEMESH_API_KEY",
            help="Require 'Authorization: Bearer KEY' (repeatable).",
        ),
    ] = None,
    context: Annotated[
        int, typer.Option(help="Context length per sequence.")
    ] = DEFAULT_LIMITS.context_length,
    max_sequences: Annotated[
        int, typer.Option(help="Sequences decoded together.")
    ] = DEFAULT_LIMITS.max_sequences,
    max_queue: Annotated[
        int, typer.Option(help="Waiting requests before 429.")
    ] = DEFAULT_LIMITS.max_queue,
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
    graph: Annotated[
        list[Path] | None,
        typer.Option(
            "--graph",
            help="Graph package (edgemesh import) to serve on /v2 beside the LLM (repeatable).",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Graph models: largest dynamic batch.")] = 8,
    max_queue_delay_ms: Annotated[
        float, typer.Option(help="Graph models: wait this long for a batch to fill (0 = none).")
    ] = 0.0,
    max_accuracy_loss: Annotated[
        float, typer.Option(help="Graph models: accuracy budget of the precision choice.")
    ] = 0.10,
    replica: Annotated[
        list[str] | None,
        typer.Option(
            "--replica",
            help="Graph models: another box's gateway (http://HOST:PORT) serving the same "
            "package; requests are balanced by queue depth and retried if a box is lost.",
        ),
    ] = None,
    replicas: Annotated[
        str,
        typer.Option(
            help="Graph models with --replica: 'auto' (boxes within 2x of the "
            "fastest's measured p50) or how many."
        ),
    ] = "auto",
) -> None:
    """Serve a model from this box alone (OpenAI API: /v1/completions, /v1/chat/completions)."""
    import uvicorn

    from edgemesh import models, paths
    from edgemesh.gateway import create_app
    from edgemesh.gateway.manager import LocalManager
    from edgemesh.limits import ServingLimits
    from edgemesh.local import LocalOptions, load_service

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from edgemesh.graph.manifest import is_graph_package

    graph_dirs = list(graph or [])
    if model is not None and is_graph_package(model):
        graph_dirs.insert(0, Path(model))
        model = None
    with user_errors():
        graphs = _graph_services(
            graph_dirs,
            threads,
            backend,
            precision,
            max_batch,
            max_queue_delay_ms,
            max_queue,
            max_accuracy_loss,
        )
    if replica:
        if not graphs:
            raise typer.BadParameter("--replica needs --model DIR of a graph package")
        with user_errors():
            graphs[0] = _replica_set(graphs[0], replica, replicas)
    if graphs and model is None and not graph:
        app = create_app(
            [],
            api_keys=api_key or (),
            graphs=graphs,
            manager=LocalManager(state_dir=paths.serve_state_dir()),
        )
        _serve(app, graphs, host, port, log_level)
        return
    with user_errors():
        # the one limits object: the model served now and those the dashboard deploys
        limits = ServingLimits(
            context_length=context,
            max_sequences=max_sequences,
            max_queue=max_queue,
            threads=threads or _default_threads(),
        )
        source = models.resolve(model)
        service = load_service(
            source,
            LocalOptions(
                limits=limits,
                backend=backend,
                precision=precision,
                chat_template=chat_template,
            ),
        )
    app = create_app(
        [service],
        api_keys=api_key or (),
        graphs=graphs,
        manager=LocalManager(
            LocalOptions(limits=limits),
            state_dir=paths.serve_state_dir(),
        ),
    )
    _warn_if_open(host, api_key)
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
        for g in graphs:
            g.close()


def _graph_services(
    dirs: list[Path],
    threads: int | None,
    backend: str | None,
    precision: str | None,
    max_batch: int,
    max_queue_delay_ms: float,
    max_queue: int,
    max_accuracy_loss: float,
) -> list:
    """Graph packages opened for /v2 (backend/precision from the fingerprint unless given)."""
    if not dirs:
        return []
    from edgemesh.graph.batcher import BatchingOptions
    from edgemesh.graph.service import GraphServeOptions, load_graph_service

    batching = BatchingOptions(
        max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue
    )
    return [
        load_graph_service(
            d,
            GraphServeOptions(
                backend=backend,
                precision=precision,
                max_accuracy_loss=max_accuracy_loss,
                threads=threads or _default_threads(),
                batching=batching,
            ),
        )
        for d in dirs
    ]


def _replica_set(local, urls: list[str], replicas: str):
    """This box's service plus the other boxes' replicas, chosen by their measured p50."""
    import httpx

    from edgemesh.errors import ConfigError
    from edgemesh.graph.placement import Candidate, choose_replicas
    from edgemesh.graph.replicas import LocalReplica, RemoteReplica, ReplicaSet

    found = {"local": (LocalReplica(local), local.measured_p50_ms)}
    for url in urls:
        url = url.rstrip("/")
        try:
            stats = httpx.get(f"{url}/v2/models/{local.name}/stats", timeout=10).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ConfigError(f"replica {url} does not serve '{local.name}': {exc}") from exc
        found[url] = (RemoteReplica(url, local.name), stats["edgemesh"].get("measured_p50_ms"))
    count = None if replicas == "auto" else int(replicas)
    chosen = choose_replicas([Candidate(k, p50) for k, (_, p50) in found.items()], count)
    typer.echo(
        "replicas of '"
        + local.name
        + "': "
        + ", ".join(f"{c.box} ({c.p50_ms} ms)" for c in chosen),
        err=True,
    )
    return ReplicaSet(local.name, local.manifest, [found[c.box][0] for c in chosen])


def _serve(app, graphs: list, host: str, port: int, log_level: str) -> None:
    import uvicorn

    for g in graphs:
        info = g.info
        how = (
            f"{info['backend']}/{info['precision']}; {info['chosen_by']}"
            if "backend" in info
            else f"{len(info['replicas'])} replicas"
        )
        typer.echo(
            f"serving graph '{g.name}' on http://{host}:{port}/v2/models/{g.name} ({how})",
            err=True,
        )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    finally:
        for g in graphs:
            g.close()


def _default_threads() -> int:
    from edgemesh.errors import EdgemeshError

    try:
        from edgemesh.fingerprint import collect

        return max(1, round(collect().to_dict()["cpu"]["cores_effective"]))
    except (ImportError, KeyError, EdgemeshError):
        # A fingerprint problem must not stop serving: fall back to the affinity mask.
        return len(os.sched_getaffinity(0))


def _warn_if_open(host: str, api_key: list[str] | None) -> None:
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: listening on {host} without --api-key: anyone who can reach this box "
            "can deploy and undeploy models from the dashboard",
            err=True,
        )
