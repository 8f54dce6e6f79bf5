"""`edgemesh join`: the same command on every box forms one mesh."""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import user_errors

MeshOpt = Annotated[
    str,
    typer.Option("--mesh", help="Mesh name; boxes with the same name and secret form one mesh."),
]
SecretOpt = Annotated[
    Path | None,
    typer.Option(
        "--secret-file",
        help="The mesh secret (copy it from the first box). Default: <state-dir>/secret, "
        "created if missing.",
        dir_okay=False,
    ),
]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="This box's state folder; default $EDGEMESH_STATE_DIR or "
        "~/.local/state/edgemesh/<mesh>.",
        file_okay=False,
    ),
]
IfaceOpt = Annotated[
    str | None,
    typer.Option(
        "--interface",
        help="Interface name or address for the mesh; default: the default route's "
        "interface, else the first one up.",
    ),
]


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # their INFO chatter hides the mesh's own messages
        for noisy in ("zeroconf", "ray", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _detach(state_dir: Path) -> None:
    """Run the same join again in a new session, logging to the state folder."""
    from edgemesh.reexec import edgemesh_argv

    argv = [a for a in sys.argv[1:] if a != "--detach"]
    log_path = state_dir / "agent.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            edgemesh_argv(*argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    typer.echo(f"edgemesh join runs in the background (pid {proc.pid}); log: {log_path}")


def command(
    mesh: MeshOpt = "default",
    secret_file: SecretOpt = None,
    state_dir: StateOpt = None,
    box_id: Annotated[
        str | None,
        typer.Option(
            "--box-id",
            help="This box's id; default: hostname plus a hash of the machine id and the "
            "primary interface's MAC, kept in <state-dir>/box_id so it never changes.",
        ),
    ] = None,
    interface: IfaceOpt = None,
    ray_port: Annotated[
        int, typer.Option(help="The Ray head's GCS port, if this box leads.")
    ] = 6379,
    ray_temp_dir: Annotated[
        Path | None,
        typer.Option(help="Ray's --temp-dir; default: <state-dir>/ray, or a short /tmp path."),
    ] = None,
    object_store_mb: Annotated[int, typer.Option(help="Ray object store size (MiB).")] = 128,
    settle: Annotated[
        float, typer.Option(help="Seconds to listen for other boxes before electing a head.")
    ] = 3.0,
    foreground: Annotated[
        bool,
        typer.Option(
            "--foreground/--detach",
            help="Stay in the foreground until Ctrl-C/SIGTERM (default), or run in the background.",
        ),
    ] = True,
    no_ray: Annotated[
        bool, typer.Option("--no-ray", hidden=True, help="Discovery and election only.")
    ] = False,
    gateway: Annotated[
        bool,
        typer.Option(
            "--gateway",
            help="When this box is (or becomes) the head, start the mesh gateway at once, "
            "with no model yet: its dashboard deploys the first one. Give it on every box "
            "that may lead.",
        ),
    ] = False,
    gateway_host: Annotated[
        str | None,
        typer.Option(
            "--gateway-host",
            help="With --gateway: where it listens, as `edgemesh deploy --host` (default "
            "127.0.0.1, or the mesh address with EDGEMESH_API_KEY set).",
        ),
    ] = None,
    gateway_port: Annotated[
        int | None,
        typer.Option("--gateway-port", help="With --gateway: its port [default: 8000]."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Join (or found) a mesh: find the other boxes over mDNS, elect a head, form a Ray cluster."""
    from edgemesh.mesh.config import JoinSettings, resolve_secret

    with user_errors():
        settings = JoinSettings(
            mesh=mesh,
            state_dir=state_dir,
            secret_file=secret_file,
            box_id=box_id,
            interface=interface,
            ray_port=ray_port,
            ray_temp_dir=ray_temp_dir,
            object_store_mb=object_store_mb,
            settle_s=settle,
        ).resolved()
        settings.paths.ensure()
        secret, created = resolve_secret(settings, create=True)
        settings.save()
    if created:
        typer.echo(
            f"Created a new secret for mesh '{mesh}' at {secret.source} (mode 0600).\n"
            "Copy it to every other box, keeping it private, and join there with:\n"
            f"  edgemesh join --mesh {mesh} --secret-file <copied file>\n"
            f"for example: scp -p {secret.source} otherbox:edgemesh-{mesh}.secret",
            err=True,
        )
    if not foreground:
        _detach(settings.paths.root)
        return
    _configure_logging(verbose)
    from edgemesh.mesh.agent import Agent
    from edgemesh.router.restore import on_head

    with user_errors():
        # The router's restore runs when this box becomes head; the mesh agent
        # below it only calls the hook.
        hook = on_head
        if gateway:  # the restore on becoming head starts the gateway even with no model
            args = ["--host", gateway_host] if gateway_host else []
            args += ["--port", str(gateway_port)] if gateway_port else []
            hook = functools.partial(on_head, gateway_args=args)
        agent = Agent(settings, secret, start_ray=not no_ray, on_head=hook)
        typer.echo(
            f"box {agent.box_id} ({agent.identity.source}) joining mesh '{mesh}' on "
            f"{agent.iface.name} "
            f"({agent.iface.address}); secret id {secret.key_id()}; Ctrl-C leaves",
            err=True,
        )

        def leave(signum: int, _frame: object) -> None:
            logging.getLogger(__name__).info("signal %d: leaving the mesh", signum)
            agent.stop()

        signal.signal(signal.SIGTERM, leave)
        signal.signal(signal.SIGINT, leave)
        agent.run()
