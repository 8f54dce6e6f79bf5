"""`edgemesh bench ...`: measurements that docs quote (never pass/fail)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors

app = typer.Typer(
    help="Benchmarks: print ratios against a reference measured in the same run.",
    no_args_is_help=True,
)


@app.command("single")
def single(
    model: Annotated[str | None, typer.Option(help="A .gguf file; default: gemma-3-270m.")] = None,
    package: Annotated[
        Path | None,
        typer.Option(help="The ONNX package converted from --model; default: converted once."),
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx/--no-onnx", help="Also run the ONNX-path backends.")
    ] = True,
    tokens: Annotated[int, typer.Option(help="Tokens to decode per run.")] = 64,
    threads: Annotated[int | None, typer.Option(help="CPU threads (same for all).")] = None,
    repeats: Annotated[int, typer.Option(help="Runs per engine; the median is kept.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Single box: edgemesh vs llama-cpp-python on the same model and bit width."""
    from edgemesh.bench import single as bench_single

    with user_errors():
        result = bench_single.run(
            model=model,
            package=package,
            tokens=tokens,
            threads=threads,
            repeats=repeats,
            out=out,
            onnx=onnx,
        )
    if json_out:
        print_json(result)
    else:
        typer.echo(bench_single.render(result))


@app.command("pipeline")
def pipeline(
    model: Annotated[Path, typer.Option(help="A converted package folder (the router runs it).")],
    hidden: Annotated[int, typer.Option(help="Hidden size of the per-hop payload.")] = 640,
    tokens: Annotated[int, typer.Option(help="Greedy tokens per stream.")] = 32,
    repeats: Annotated[int, typer.Option(help="Round trips per data-plane figure.")] = 200,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
) -> None:
    """Router: per-hop cost of 3 data planes; tokens/s through 1-3 stages x 1/4/16 streams."""
    from edgemesh.bench import pipeline as bench_pipeline

    with user_errors():
        result = bench_pipeline.run(model, hidden=hidden, tokens=tokens, repeats=repeats, out=out)
    print_json(result)


@app.command("throughput")
def throughput(
    model: Annotated[str | None, typer.Option(help="A .gguf file; default: gemma-3-270m.")] = None,
    package: Annotated[
        Path | None,
        typer.Option(help="The ONNX package converted from --model; default: converted once."),
    ] = None,
    streams: Annotated[str, typer.Option(help="Concurrent streams to measure.")] = "1,4,8,16",
    tokens: Annotated[int, typer.Option(help="Greedy tokens per stream.")] = 48,
    threads: Annotated[int | None, typer.Option(help="CPU threads (same for all).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """One box: aggregate decode tokens/s at 1/4/8/16 streams, llama.cpp batched as reference."""
    from edgemesh.bench import throughput as bench_throughput

    with user_errors():
        result = bench_throughput.run(
            model=model,
            package=package,
            streams=tuple(int(n) for n in streams.split(",")),
            tokens=tokens,
            threads=threads,
            out=out,
        )
    if json_out:
        print_json(result)
    else:
        typer.echo(bench_throughput.render(result))


@app.command("vision")
def vision(
    models: Annotated[
        list[str] | None,
        typer.Option("--model", help="mobilenet_v3_small, resnet18 or tiny_detector (repeat)."),
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per engine at batch 1.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
) -> None:
    """Graph models: p50/p99 and best-batch images/s per engine and precision vs PyTorch eager."""
    from edgemesh.bench import vision as bench_vision

    argv = ["--runs", str(runs)] + (["--models", *models] if models else [])
    bench_vision.main(argv + (["--out", str(out)] if out else []))


@app.command("gateway")
def gateway(
    tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 32,
    repeats: Annotated[int, typer.Option(help="Requests per path; the median is kept.")] = 5,
    threads: Annotated[int | None, typer.Option(help="CPU threads for llama.cpp.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
) -> None:
    """Gateway: grammar engines' mask cost, constrained vs free decoding, HTTP vs in-process."""
    from edgemesh.bench import gateway as bench_gateway

    argv = ["--tokens", str(tokens), "--repeats", str(repeats)]
    argv += ["--threads", str(threads)] if threads else []
    bench_gateway.main(argv + (["--out", str(out)] if out else []))


@app.command("all")
def all_benchmarks(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only these (repeatable).")
    ] = None,
    package: Annotated[
        Path | None, typer.Option(help="Converted default-model package; default: cached.")
    ] = None,
) -> None:
    """Every benchmark, then docs/BENCHMARKS.md with tables and plots."""
    from edgemesh.bench import all as bench_all

    with user_errors():
        outcome = bench_all.run(only, package)
    print_json(outcome)
    if any(v.get("returncode") for v in outcome.values()):
        raise typer.Exit(1)
