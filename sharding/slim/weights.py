"""``edgemesh slim PKG --method awq|gptq|rtn --bits 4``: re-quantise a package's int4 layers.

Only the decoder layers' ``int4`` pieces change; everything else (fp32,
fp16, int8, the prologue, the int4 embedding and head, which are 8-bit in
``int4`` anyway) is hard-linked from the source. Layers are done in order,
each calibrated on its inputs as produced by the layers already slimmed
(``activations.LayerFeeder``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edgemesh.errors import SlimInputError
from edgemesh.sharding.package.folder import open_package, piece_path
from edgemesh.sharding.slim import quant
from edgemesh.sharding.slim.activations import LayerFeeder, load_piece
from edgemesh.sharding.slim.record import SlimResult, finish
from edgemesh.sharding.slim.text import load_calibration, windows
from edgemesh.sharding.slim.writer import Draft, check_out

log = logging.getLogger(__name__)

PRECISION = "int4"
WINDOW = 128
MAX_WINDOWS = 16


def slim_weights(
    package: Path | str,
    out: Path | str,
    *,
    method: str,
    bits: int = 4,
    calibration: Path | str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    score: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SlimResult:
    """Write a copy of ``package`` whose int4 layers are quantised by ``method``."""
    say = progress or (lambda msg: log.info("%s", msg))
    started = time.perf_counter()
    quant.check(method, bits)
    src = open_package(package)
    for needed in ("fp32", PRECISION):
        if needed not in src.precisions:
            raise SlimInputError(
                f"package '{src.manifest.name}' has no {needed} graphs; {method} needs fp32 "
                f"(to calibrate) and int4 (embedding and head)",
                hint="convert with --precisions fp32,int4 (or all four)",
            )
    out_path = check_out(Path(out), overwrite)
    need = max(quant.MIN_CALIBRATION_TOKENS[method], 1)
    calib = load_calibration(calibration, src.tokenizer(), need, method)
    wins = windows(calib.ids, WINDOW, MAX_WINDOWS) if calib.ids else []
    if method != "rtn" and not wins:
        raise SlimInputError(f"calibration text has under {WINDOW} tokens ({len(calib.ids)})")
    layer_files = set()
    for i in range(src.num_layers):
        rel = piece_path("layer", PRECISION, i)
        layer_files.update({rel, f"{rel}.data"})
    with Draft(out_path, overwrite) as draft:
        for art in src.manifest.artifacts:
            if art.path not in layer_files:
                draft.link(src.root, art.path)
        feeder = LayerFeeder(src, wins, threads) if wins else None
        layers = list(src.manifest.layers)
        for i in range(src.num_layers):
            t = time.perf_counter()
            fp32 = load_piece(src, piece_path("layer", "fp32", i))
            samples = feeder.samples(i) if feeder else []
            slimmed = quant.slim_layer(fp32, samples, method)
            if feeder:  # before writing: write_piece moves the weights out of the proto
                feeder.advance(i, slimmed)
            files = draft.write(slimmed, piece_path("layer", PRECISION, i))
            sizes = dict(layers[i].weight_bytes)
            sizes[PRECISION] = draft.bytes_of(files)
            layers[i] = replace(layers[i], weight_bytes=sizes)
            say(f"layer {i + 1}/{src.num_layers}: {method} in {time.perf_counter() - t:.1f} s")
        graphs = dict(src.manifest.extra["graphs"])
        qcfg = dict(graphs.get("quantization", {}))
        qcfg[PRECISION] = {**qcfg.get(PRECISION, {}), "method": method}
        graphs["quantization"] = qcfg
        manifest = replace(
            src.manifest,
            name=f"{src.manifest.name}-{method}{bits}",
            layers=layers,
            extra={**src.manifest.extra, "graphs": graphs},
        )
        params = {
            "bits": bits,
            "block_size": quant.BLOCK,
            "window": WINDOW,
            "windows": len(wins),
            "sensitive_bits": 8,
            "scheme": quant.GPTQ_SCHEME if method == "gptq" else "sym",
        }
        return finish(
            draft,
            manifest,
            src,
            method=method,
            params=params,
            calibration=calib,
            precisions=[PRECISION],
            started=started,
            threads=threads,
            score=score,
            say=say,
        )
