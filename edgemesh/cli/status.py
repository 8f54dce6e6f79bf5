"""`edgemesh status`: every box of the mesh, from any box."""

from __future__ import annotations

from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors
from edgemesh.cli.join import IfaceOpt, SecretOpt, StateOpt


def command(
    json_out: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    mesh: Annotated[
        str | None,
        typer.Option(
            "--mesh", help="Mesh name; default: this box's saved settings, else 'default'."
        ),
    ] = None,
    secret_file: SecretOpt = None,
    state_dir: StateOpt = None,
    interface: IfaceOpt = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to browse mDNS when no agent runs on this box.")
    ] = 3.0,
) -> None:
    """List every box of the mesh with its role, address, fingerprint and health."""
    from edgemesh.errors import AuthError
    from edgemesh.mesh.config import JoinSettings, default_state_dir, load_settings, resolve_secret
    from edgemesh.mesh.status import collect_status, render

    with user_errors():
        folder = (state_dir or default_state_dir(mesh or "default")).expanduser()
        saved = load_settings(folder) or JoinSettings(mesh=mesh or "default")
        settings = JoinSettings(
            mesh=mesh or saved.mesh,
            state_dir=folder,
            secret_file=secret_file or saved.secret_file,
            interface=interface or saved.interface,
        ).resolved()
        try:
            secret = resolve_secret(settings, create=False)[0]
        except AuthError:
            secret = None  # fine while the agent runs: its state is already verified
        status = collect_status(settings, secret, browse_s=wait)
    from edgemesh.mesh.settle import unsettled_status

    # What `edgemesh deploy` would wait for (only an agent's view can tell).
    settling = unsettled_status(status) if status.source == "agent" else None
    if json_out:
        from edgemesh.router.deploy import status_extras
        from edgemesh.router.graph_deploy import status_here

        extras = {**status_extras(folder), "graphs": status_here(folder)}
        print_json({**status.to_dict(), **extras, "settling": settling})
    else:
        from edgemesh.router.graph_deploy import render_status, status_here

        typer.echo(render(status))
        for line in render_status(status_here(folder)):
            typer.echo(line)
        if settling:
            typer.echo(f"  settling: {'; '.join(settling)}")
