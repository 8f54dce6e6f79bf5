"""The ``edgemesh`` command line. Commands parse options and delegate.

Each command lives in its own module of this package; heavy imports happen
inside the command functions, so ``edgemesh --help`` stays fast.
"""

from __future__ import annotations

import typer

from edgemesh.cli import (
    bench,
    convert,
    deploy,
    generate,
    import_,
    info,
    join,
    plan,
    serve,
    slim,
    status,
    undeploy,
)

app = typer.Typer(
    name="edgemesh",
    help="Turn a room of mismatched edge boxes into one LLM serving mesh.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("info")(info.command)
app.command("serve")(serve.command)
app.command("join")(join.command)
app.command("status")(status.command)
app.command("plan")(plan.command)
app.command("convert")(convert.command)
app.command("generate")(generate.command)
app.command("deploy")(deploy.command)
app.command("undeploy")(undeploy.command)  # graph models on the mesh
app.command("import")(import_.command)  # graph models (vision...): edgemesh.graph
app.add_typer(bench.app, name="bench")
app.add_typer(slim.app, name="slim")  # AWQ/GPTQ, pruning, distillation: sharding/slim


def main() -> None:
    app()
