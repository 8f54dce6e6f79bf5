"""`edgemesh deploy MODEL_DIR`: plan, place and serve a converted model on the mesh."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors
from edgemesh.cli.join import SecretOpt, StateOpt


def command(
    model_dir: Annotated[
        Path | None, typer.Argument(help="A package folder made by `edgemesh convert`.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Model name in the API; default: the package's.")
    ] = None,
    mesh: Annotated[
        str | None,
        typer.Option(
            "--mesh", help="Mesh name; default: this box's saved settings, else 'default'."
        ),
    ] = None,
    secret_file: SecretOpt = None,
    state_dir: StateOpt = None,
    boxes: Annotated[
        Path | None,
        typer.Option(
            "--boxes", help="Box profiles (as for `edgemesh plan`) instead of measuring each box."
        ),
    ] = None,
    plan_file: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            help="Use this plan (`edgemesh plan --json` output, possibly edited) for the "
            "first placement instead of planning; re-plans after a loss still use the profiles.",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port of the mesh gateway on the head [default: 8000; with --restore, "
            "the recorded one]."
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Where the gateway on the head listens: 127.0.0.1 (the head only; the "
            "default without --api-key), 'mesh' (the head's mesh address; the default with "
            "--api-key), 0.0.0.0 (every interface) or an address. Kept for later deploys.",
        ),
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="EDGEMESH_API_KEY",
            help="Require 'Authorization: Bearer KEY' on the mesh gateway (repeatable; "
            "the records keep only its sha256).",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            help="Seconds to wait for the mesh to settle (every listed box in the Ray "
            "cluster) before deploying; 0 checks once.",
        ),
    ] = 120.0,
    restore: Annotated[
        bool,
        typer.Option(
            "--restore",
            help="Re-deploy every model this box's records list onto the current head "
            "(after a head change; the new head's agent runs this).",
        ),
    ] = False,
    gateway: Annotated[
        bool,
        typer.Option(
            "--gateway",
            help="With --restore: start the gateway (dashboard, management API) even when "
            "no model is recorded, so the first model can be deployed from the page "
            "(`edgemesh join --gateway` runs this on the head).",
        ),
    ] = False,
    replicas: Annotated[
        str,
        typer.Option(
            "--replicas",
            help="Graph packages: 'auto' (every box within reach of the fastest) or N "
            "(the N fastest boxes), each holding a whole copy.",
        ),
    ] = "auto",
    max_accuracy_loss: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-loss",
            help="Graph packages: the accuracy budget each box's precision must meet "
            "[default: the LLM path's].",
        ),
    ] = None,
) -> None:
    """Split MODEL_DIR over the mesh's boxes and serve it from the head (OpenAI API)."""
    from edgemesh.errors import ConfigError
    from edgemesh.mesh import connect
    from edgemesh.mesh.config import default_state_dir, load_settings
    from edgemesh.mesh.settle import wait_settled
    from edgemesh.router.deploy import deploy

    with user_errors():
        folder = (state_dir or default_state_dir(mesh or "default")).expanduser()
        saved = load_settings(folder)
        if secret_file is not None and saved is not None and saved.secret_file is not None:
            # The agent holds the Ray token derived from its secret; a different
            # secret file here means another mesh than the agent's.
            if Path(secret_file).resolve() != Path(saved.secret_file).resolve():
                from edgemesh.errors import AuthError

                raise AuthError(
                    f"--secret-file {secret_file} is not the secret this box joined with",
                    hint=f"use {saved.secret_file} or re-run `edgemesh join`",
                )
        if restore == (model_dir is not None):
            raise ConfigError("give either MODEL_DIR or --restore")
        if gateway and not restore:
            raise ConfigError("--gateway goes with --restore (a deploy always starts the gateway)")
        from edgemesh.graph.manifest import is_graph_package

        graph = model_dir is not None and is_graph_package(model_dir)
        if graph and (boxes is not None or plan_file is not None):
            raise ConfigError(
                "--boxes and --plan are for LLM packages; a graph package is placed by "
                "each box's own measurement",
                hint="drop them, or use --replicas N",
            )
        from edgemesh.cli.undeploy import parse_replicas

        wanted = parse_replicas(replicas) if graph else None  # refused before any wait
        if not restore:
            # `status` lists a box before it is in the Ray cluster: planning then
            # would leave it out (or fail here), so wait for the mesh to settle.
            # (--restore is the new head's own agent, which runs it once its Ray
            # is up; the gateway re-plans as the other boxes come back.)
            wait_settled(
                folder, mesh=mesh, timeout_s=wait, progress=lambda ln: typer.echo(ln, err=True)
            )
        conn = connect(folder, mesh=mesh, logging_level="warning")
        if graph:
            from edgemesh.cli.undeploy import deploy_graph_package

            assert model_dir is not None
            deploy_graph_package(
                model_dir,
                name=name,
                here=conn.box_id,
                replicas=wanted,
                max_accuracy_loss=max_accuracy_loss,
                port=port or 8000,
                host=host,
                api_keys=api_key or (),
                state_dir=folder,
                json_out=json_out,
            )
            return
        if restore:
            from edgemesh.router.restore import restore as restore_all

            done = restore_all(
                folder, port=port, gateway=gateway, host=host, api_keys=api_key or ()
            )
            if json_out:
                print_json(done)
            else:
                typer.echo(
                    f"restored {', '.join(done['restored']) or 'nothing'}: {done['gateway']}"
                )
                for name, why in done["skipped"].items():
                    typer.echo(f"  skipped {name}: {why}", err=True)
            if done["skipped"]:
                raise typer.Exit(1)
            return
        profiles = links = None
        if boxes is not None:
            doc = json.loads(boxes.read_text())
            profiles = doc["boxes"] if isinstance(doc, dict) else doc
            links = doc.get("links") if isinstance(doc, dict) else None
        fixed = None
        if plan_file is not None:
            try:
                fixed = json.loads(plan_file.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read the plan {plan_file}: {exc}") from exc
        record = deploy(
            model_dir,
            name=name,
            here=conn.box_id,
            profiles=profiles,
            links=links,
            port=port or 8000,
            host=host,
            api_keys=api_key or (),
            state_dir=folder,
            fixed_plan=fixed,
        )
    if json_out:
        shown = record.to_dict()
        print_json({k: v for k, v in shown.items() if k not in ("manifest", "profiles")})
        return
    typer.echo(f"deployed '{record.name}' — gateway {record.gateway}")
    for st in record.stages:
        typer.echo(f"  {st.box:<16} layers [{st.start}, {st.stop})  {st.backend}/{st.precision}")
