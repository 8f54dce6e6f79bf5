"""``edgemesh slim PKG --method prune-ffn|prune-depth``: prune, optionally recover, export.

Order of work: every option is checked against the manifest first (ratio,
layer count, output folder, calibration length); then the source checkpoint
is loaded in float32, importance measured on the calibration windows, the
model pruned, optionally recovered by distilling from the unpruned model
(``train.distill``, ``--recover-steps``), saved as a Hugging Face folder and
converted into the draft package (``torchsrc.export_package``), measured,
and renamed into place.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from edgemesh.errors import SlimInputError, require
from edgemesh.sharding.package.folder import open_package
from edgemesh.sharding.slim import prune
from edgemesh.sharding.slim.record import SlimResult, finish
from edgemesh.sharding.slim.text import load_calibration, windows
from edgemesh.sharding.slim.torchsrc import export_package, save_hf, source_of
from edgemesh.sharding.slim.train import TrainConfig, distill, torch_teacher
from edgemesh.sharding.slim.writer import Draft, check_out

log = logging.getLogger(__name__)

METHODS = ("prune-ffn", "prune-depth")
WINDOW = 128
MAX_WINDOWS = 16
MIN_CALIBRATION_TOKENS = 256
"""Two windows: channel and layer importance are means over tokens; fewer
than a few hundred positions rank channels mostly by noise."""
RECOVERY_LR = 5e-5


def slim_prune(
    package: Path | str,
    out: Path | str,
    *,
    method: str,
    ratio: float | None = None,
    layers: int | None = None,
    recover_steps: int = 0,
    calibration: Path | str | None = None,
    source: Path | str | None = None,
    precisions: tuple[str, ...] | None = None,
    measure_precisions: tuple[str, ...] = ("fp32",),
    save_hf_to: Path | str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    score: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SlimResult:
    """Write a pruned copy of ``package``; see the module docstring."""
    say = progress or (lambda msg: log.info("%s", msg))
    started = time.perf_counter()
    torch = require("torch", "convert")
    src = open_package(package)
    extra = src.manifest.extra
    if method == "prune-ffn":
        if ratio is None:
            raise SlimInputError("--method prune-ffn needs --ratio R, R in (0, 1)")
        keep = prune.kept_channels(int(extra["intermediate_size"]), ratio)
        params: dict = {
            "ratio": ratio,
            "kept_channels": keep,
            "intermediate_size": int(extra["intermediate_size"]),
        }
    elif method == "prune-depth":
        if layers is None:
            raise SlimInputError("--method prune-depth needs --layers K")
        prune.check_depth(src.num_layers, layers)
        params = {"layers": layers}
    else:
        raise SlimInputError(f"unknown pruning method '{method}', expected one of {METHODS}")
    if recover_steps < 0:
        raise SlimInputError(f"--recover-steps must be >= 0, got {recover_steps}")
    precisions = precisions or tuple(src.precisions)
    out_path = check_out(Path(out), overwrite)
    calib = load_calibration(calibration, src.tokenizer(), MIN_CALIBRATION_TOKENS, method)
    wins = windows(calib.ids, WINDOW, MAX_WINDOWS)
    checkpoint = source_of(src, source)
    with Draft(out_path, overwrite) as draft:
        if threads:
            torch.set_num_threads(threads)
        say(f"loading the source checkpoint {checkpoint.path}")
        model = checkpoint.load_model().float().eval()
        teacher = copy.deepcopy(model) if recover_steps else None
        if method == "prune-ffn":
            score_ = prune.ffn_importance(model, wins)
            prune.prune_ffn(model, score_, keep)
            say(f"pruned FFN to {keep} of {params['intermediate_size']} channels per layer")
        else:
            influence = prune.depth_importance(model, wins)
            removed = prune.prune_depth(model, influence, layers)  # type: ignore[arg-type]
            params["removed"] = removed
            params["influence"] = [round(v, 5) for v in influence]
            say(f"removed layers {removed} (least hidden-state change)")
        if teacher is not None:
            cfg = TrainConfig(steps=recover_steps, lr=RECOVERY_LR)
            history = distill(
                model,
                torch_teacher(teacher),
                wins,
                cfg,
                draft.work / "train",
                progress=lambda s, n, loss: say(f"recovery step {s}/{n}: KL {loss:.4f}"),
            )
            params["recover_steps"] = recover_steps
            params["recovery_lr"] = RECOVERY_LR
            params["recovery_loss"] = [history[0]["loss"], history[-1]["loss"]] if history else []
            del teacher
        hf = save_hf(model, src, draft.work / "hf")
        del model
        suffix = f"ffn{round((ratio or 0) * 100)}" if method == "prune-ffn" else f"d{layers}"
        suffix += "r" if recover_steps else ""
        manifest = export_package(
            hf, draft.root, src, f"{src.manifest.name}-{suffix}", precisions, threads
        )
        say(f"exported {manifest.num_layers} layers at {', '.join(precisions)}")
        if save_hf_to is not None:
            target = Path(save_hf_to).expanduser()
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(hf, target)
        return finish(
            draft,
            manifest,
            src,
            method=method,
            params=params,
            calibration=calib,
            precisions=measure_precisions,
            started=started,
            threads=threads,
            score=score,
            say=say,
        )
