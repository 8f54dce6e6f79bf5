"""`edgemesh generate`: run a converted package locally through chosen layer cuts.

One request through the serving engine's decode loop (``edgemesh.offline``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from edgemesh.cli._common import print_json, user_errors


def command(
    model: Annotated[Path, typer.Argument(help="A package folder made by `edgemesh convert`.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    cuts: Annotated[
        str | None,
        typer.Option(help="Layer indices where one shard ends and the next begins, e.g. 6,12."),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(help="fp32, fp16, int8 or int4; or one per range, e.g. fp16,int4,int4."),
    ] = "fp32",
    backend: Annotated[str, typer.Option(help="Shard backend, by registry name.")] = "onnxruntime",
    threads: Annotated[int | None, typer.Option(help="CPU threads per shard.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, tensorrt or auto.")] = "cpu",
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt as one user turn of the chat template.")
    ] = False,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past end-of-sequence.")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where composed range graphs are cached.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print token_ids (generated only) and text as JSON.")
    ] = False,
) -> None:
    """Generate text from a package cut into layer ranges, all in this process (no mesh)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from edgemesh.backends.base import BackendOptions
    from edgemesh.offline import generate
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline, parse_cuts

    with user_errors():
        package = open_package(model)
        tokenizer = package.tokenizer()
        if chat:
            ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = tokenizer.encode(prompt)
        cut_list = parse_cuts(cuts)
        precisions = [p.strip() for p in precision.split(",")]
        options = BackendOptions(threads=threads, device=device, cache_dir=cache_dir)
        pipe = load_pipeline(
            package,
            cut_list,
            precisions[0] if len(precisions) == 1 else precisions,
            backend=backend,
            options=options,
        )
        try:
            result = generate(
                pipe,
                ids,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                eos_ids=() if ignore_eos else sorted(tokenizer.eos_ids),
            )
        finally:
            pipe.close()
    text = tokenizer.decode(result.token_ids)
    if json_output:
        print_json(
            {
                "token_ids": result.token_ids,
                "text": text,
                "prompt_tokens": result.prompt_tokens,
                "finish_reason": result.finish_reason,
                "ranges": [[b.shard.layers.start, b.shard.layers.stop] for b in pipe.backends],
                "precision": precisions,
                "backend": backend,
                "prefill_seconds": round(result.seconds_prefill, 4),
                "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
            }
        )
        return
    typer.echo(text)
