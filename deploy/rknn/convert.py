"""Convert one layer range of an edgemesh package into RKNN graphs (run on an x86-64 host).

    python deploy/rknn/convert.py PACKAGE --layers 0:9 --target rk3588 [--precision fp16]

Writes ``PACKAGE/rknn/layers_<start>_<stop>/`` (or ``--out``): the static
ONNX graphs (``decode.onnx`` S=1, ``prefill.onnx`` S=chunk), their
``.rknn`` builds, and ``meta.json`` (I/O order, fixed shapes, the range's
graph key so a re-converted package is detected). Copy that folder to the
board next to the package; ``edgemesh.backends.rknn`` loads it with
rknn-toolkit-lite2. See deploy/rknn/README.md.

Exit codes: 0 done, 1 conversion failed, 2 rknn-toolkit2 missing (the static
ONNX graphs are written before that check, so they can be converted elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgemesh.backends.rknn import DEFAULT_CHUNK, DEFAULT_CONTEXT, rknn_dir, static_range_graph
from edgemesh.errors import EdgemeshError
from edgemesh.sharding.package.folder import open_package


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", type=Path, help="a package folder made by `edgemesh convert`")
    p.add_argument("--layers", required=True, help="half-open range START:STOP, e.g. 0:9")
    p.add_argument("--target", default="rk3588", help="rk3588, rk3576, rk3568, rk3566, rk3562")
    p.add_argument("--precision", choices=("fp16", "int8"), default="fp16")
    p.add_argument("--dataset", type=Path, help="int8 only: rknn calibration list (.txt)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="fixed KV slots")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="prefill tokens per call")
    p.add_argument("--out", type=Path, help="default: PACKAGE/rknn/layers_START_STOP")
    return p.parse_args(argv)


def _build(rknn_cls: type, onnx_path: Path, rknn_path: Path, args: argparse.Namespace) -> str:
    """config -> load_onnx -> build -> export_rknn; returns the failed step's name or ''."""
    rknn = rknn_cls(verbose=False)
    try:
        rknn.config(target_platform=args.target, optimization_level=3)
        if rknn.load_onnx(model=str(onnx_path)) != 0:
            return "load_onnx"
        quantize = args.precision == "int8"
        dataset = str(args.dataset) if quantize else None
        if rknn.build(do_quantization=quantize, dataset=dataset) != 0:
            return "build"
        if rknn.export_rknn(str(rknn_path)) != 0:
            return "export_rknn"
        return ""
    finally:
        rknn.release()


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        start, stop = (int(x) for x in args.layers.split(":"))
    except ValueError:
        print(f"--layers takes START:STOP, got '{args.layers}'", file=sys.stderr)
        return 1
    if args.precision == "int8" and args.dataset is None:
        print("--precision int8 needs --dataset (rknn-toolkit2 calibration list)", file=sys.stderr)
        return 1
    try:
        pkg = open_package(args.package)
        extra = pkg.manifest.extra
        out = args.out or rknn_dir(pkg.root, start, stop)
        out.mkdir(parents=True, exist_ok=True)
        graph = pkg.range_graph(start, stop, "fp32")
        meta: dict = {
            "range_key": pkg.range_key(start, stop, "fp32"),
            "layers": [start, stop],
            "precision": args.precision,
            "target": args.target,
            "context": args.context,
            "chunk": args.chunk,
        }
        for name, seq in (("decode", 1), ("prefill", args.chunk)):
            meta[name] = static_range_graph(
                graph,
                out / f"{name}.onnx",
                seq=seq,
                context=args.context,
                kv_heads=int(extra["kv_heads"]),
                head_dim=int(extra["head_dim"]),
            )
    except EdgemeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"static ONNX graphs written to {out}")
    try:
        from rknn.api import RKNN
    except ImportError:
        print(
            "rknn-toolkit2 is not installed: pip install rknn-toolkit2 (x86-64 Linux, "
            "Python 3.8-3.12), then run this command again",
            file=sys.stderr,
        )
        return 2
    for name in ("decode", "prefill"):
        failed = _build(RKNN, out / f"{name}.onnx", out / f"{name}.rknn", args)
        if failed:
            print(f"rknn-toolkit2 {failed} failed for {name}.onnx", file=sys.stderr)
            return 1
        print(f"{name}.rknn written")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"done: copy {out} to the board, next to the package")
    return 0


if __name__ == "__main__":
    sys.exit(main())
