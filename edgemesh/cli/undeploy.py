"""`edgemesh undeploy NAME`, and the graph-package half of `edgemesh deploy`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors
from edgemesh.cli.join import StateOpt


def parse_replicas(text: str) -> int | None:
    """``auto`` -> None; ``N`` -> N (>= 1)."""
    from edgemesh.errors import ConfigError

    if text.strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--replicas must be 'auto' or a whole number >= 1, got '{text}'")
    return n


def deploy_graph_package(
    model_dir: Path,
    *,
    name: str | None,
    here: str,
    replicas: int | None,
    max_accuracy_loss: float | None,
    port: int,
    host: str | None,
    api_keys: list[str] | tuple[str, ...],
    state_dir: Path,
    json_out: bool,
) -> None:
    """Place a graph package on the mesh (``router.graph_deploy``) and print where."""
    from edgemesh.graph.select import DEFAULT_MAX_ACCURACY_LOSS
    from edgemesh.router.graph_deploy import GraphDeployOptions, deploy_graph

    options = GraphDeployOptions(
        replicas=replicas,
        max_accuracy_loss=DEFAULT_MAX_ACCURACY_LOSS
        if max_accuracy_loss is None
        else max_accuracy_loss,
    )
    record = deploy_graph(
        model_dir,
        name=name,
        here=here,
        options=options,
        port=port,
        host=host,
        api_keys=api_keys,
        state_dir=state_dir,
    )
    if json_out:
        print_json({k: v for k, v in record.items() if k != "manifest"})
        return
    typer.echo(f"deployed graph '{record['name']}' — gateway {record['gateway']}")
    for r in record["replicas"]:
        p50 = "" if r["p50_ms"] is None else f"  p50 {r['p50_ms']:.2f} ms"
        typer.echo(f"  {r['box']:<16} {r['backend']}/{r['precision']} on {r['device']}{p50}")
    for box, p50 in record["not_chosen"].items():
        typer.echo(f"  {box:<16} not chosen (p50 {p50} ms)")
    for box, why in record["refused"].items():
        typer.echo(f"  {box:<16} cannot serve it: {why}")


def command(
    name: Annotated[str, typer.Argument(help="The graph model's name on the mesh.")],
    mesh: Annotated[
        str | None,
        typer.Option(
            "--mesh", help="Mesh name; default: this box's saved settings, else 'default'."
        ),
    ] = None,
    state_dir: StateOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the removed record.")] = False,
) -> None:
    """Stop a graph model's replicas on the mesh and remove it from the gateway."""
    from edgemesh.mesh import connect
    from edgemesh.mesh.config import default_state_dir
    from edgemesh.router.graph_deploy import undeploy_graph

    with user_errors():
        folder = (state_dir or default_state_dir(mesh or "default")).expanduser()
        connect(folder, mesh=mesh, logging_level="warning")
        record = undeploy_graph(name, folder)
    if json_out:
        print_json({k: v for k, v in record.items() if k != "manifest"})
        return
    boxes = ", ".join(r["box"] for r in record.get("replicas", [])) or "none"
    typer.echo(f"undeployed graph '{name}' (replicas stopped on {boxes})")
