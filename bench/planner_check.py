"""Predicted vs measured stage times: the partitioner's cost model on real boxes.

Two (or more) boxes are emulated on this host by cgroup CPU quotas
(``--quotas 0.5,1.0``). Each box is fingerprinted *inside its cgroup* with
``edgemesh info --json --measure --calibrate MODEL``, exactly as a real box
would be; the partitioner plans the model over those profiles; then every
stage of the plan runs its own layer range inside its box's cgroup, and the
time of one decode step (one sequence, KV cache at the plan's mean position;
the median of five windows' mean step, 1.5 s each) is measured and set against the
stage's ``compute_ms``. The same stages priced by the roofline alone (the
profiles without their calibration) are reported beside them, to show what
calibrating buys. ``--no-calibrate`` plans from the roofline.

    python -m edgemesh.bench.planner_check --model PKG [--quotas 0.5,1.0] [--json]

Writes ``bench/results/planner_check.json``. Needs root (cgroups).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgemesh.lab import cgroups
from edgemesh.reexec import edgemesh_argv, module_argv

RESULTS = Path(__file__).resolve().parent / "results" / "planner_check.json"


def _fingerprint(
    box: cgroups.Limits, box_id: str, cache: Path, model: Path | None
) -> dict[str, Any]:
    argv = edgemesh_argv("info", "--json", "--measure")
    argv += ["--id", box_id, "--cache-dir", str(cache)]
    if model is not None:
        argv += ["--calibrate", str(model)]
    out = subprocess.run(box.wrap(argv), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _measure_stage(
    box: cgroups.Limits, model: Path, stage: dict[str, Any], threads: int, args: argparse.Namespace
) -> dict[str, Any]:
    argv = module_argv("edgemesh.bench.planner_check", "--worker", "--model", str(model))
    argv += ["--layers", f"{stage['layers'][0]},{stage['layers'][1]}"]
    argv += ["--backend", stage["backend"], "--precision", stage["precision"]]
    argv += ["--threads", str(threads), "--position", str(args.position)]
    argv += ["--seconds", str(args.seconds), "--windows", str(args.windows)]
    out = subprocess.run(box.wrap(argv), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(args: argparse.Namespace) -> None:
    """Inside a box: one layer range's decode step at a given KV length (``decode_step_ms``)."""
    from edgemesh.backends import registry
    from edgemesh.backends.base import BackendOptions, LayerRange, ShardSpec
    from edgemesh.fingerprint.calibrate import MAX_STEPS, WARMUP_STEPS, decode_step_ms
    from edgemesh.sharding.package.folder import open_package

    pkg = open_package(args.model)
    start, stop = (int(v) for v in args.layers.split(","))
    spec = ShardSpec(pkg.root, LayerRange(start, stop), pkg.num_layers, args.precision)
    context = min(pkg.manifest.context_length, args.position + WARMUP_STEPS + MAX_STEPS + 1)
    options = BackendOptions(threads=args.threads, context_length=context, max_sequences=1)
    with registry.require_available(args.backend)(spec, options) as backend:
        ms = decode_step_ms(
            backend, pkg.manifest, start == 0, args.position, context, args.seconds, args.windows
        )
    print(json.dumps({"step_ms": ms}))


def _roofline_ms(manifest: Any, boxes: dict[str, dict], stage: Any, options: Any) -> float:
    """The stage's compute time priced without any box's calibration."""
    from edgemesh.sharding.planner.boxes import BoxProfile
    from edgemesh.sharding.planner.costs import CostModel

    bare = [{**b, "profile": {**b["profile"], "calibration": None}} for b in boxes.values()]
    model = CostModel(manifest, [BoxProfile.from_dict(b) for b in bare], None, options)
    b = model.index(stage.box)
    for opt in model.costs[b].options:
        if (opt.backend, opt.precision) == (stage.backend, stage.precision):
            return float(opt.time[stage.layers.start, stage.layers.stop])
    return float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.planner.costs import PlanOptions
    from edgemesh.sharding.planner.plan import plan

    quotas = [float(q) for q in args.quotas.split(",")]
    manifest = open_package(args.model).manifest
    limits = [cgroups.Limits(q, None, name=f"box{i}") for i, q in enumerate(quotas)]
    boxes: dict[str, dict[str, Any]] = {}
    calibrate = None if args.no_calibrate else Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        for i, box in enumerate(limits):
            with box:
                box_id = f"box{i}-{quotas[i]:g}cpu"
                boxes[box_id] = _fingerprint(box, box_id, Path(tmp) / box_id, calibrate)
    # The cost model takes attention and KV reads at half the context, so a
    # context of twice the measured position makes both describe the same step.
    options = PlanOptions(context=2 * args.position, sequences=1)
    the_plan = plan(manifest, list(boxes.values()), None, options)
    rows = []
    for stage in the_plan.stages:
        i = list(boxes).index(stage.box)
        threads = max(1, round(boxes[stage.box]["cpu"]["cores_effective"]))
        with cgroups.Limits(quotas[i], None, name=f"stage{i}") as box:
            measured = _measure_stage(box, Path(args.model), stage.to_dict(), threads, args)
        roofline = _roofline_ms(manifest, boxes, stage, options)
        rows.append(
            {
                "box": stage.box,
                "cpus": quotas[i],
                "layers": [stage.layers.start, stage.layers.stop],
                "backend": stage.backend,
                "precision": stage.precision,
                "priced_by": stage.cost_source,
                "predicted_ms": round(stage.compute_ms, 3),
                "measured_ms": round(measured["step_ms"], 3),
                "ratio": round(measured["step_ms"] / stage.compute_ms, 3),
                "roofline_ms": round(roofline, 3),
                "roofline_ratio": round(measured["step_ms"] / roofline, 3),
            }
        )
    return {
        "model": manifest.name,
        "quotas": quotas,
        "position": args.position,
        "stages": rows,
        "max_relative_error": round(max(abs(r["ratio"] - 1) for r in rows), 3),
        "seconds": args.seconds,
        "windows": args.windows,
        "plan": the_plan.to_dict(),
        "calibrations": {
            box_id: box.get("profile", {}).get("calibration") for box_id, box in boxes.items()
        },
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "command": " ".join(["python -m edgemesh.bench.planner_check", *sys.argv[1:]]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a converted model package")
    parser.add_argument("--quotas", default="0.5,1.0", help="CPU cores per emulated box")
    parser.add_argument("--position", type=int, default=128, help="KV length during decode")
    parser.add_argument(
        "--seconds", type=float, default=1.5, help="seconds per timing window (its mean)"
    )
    parser.add_argument(
        "--windows", type=int, default=5, help="timing windows per stage (their median)"
    )
    parser.add_argument(
        "--no-calibrate", action="store_true", help="plan from the roofline (no calibration)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    why = cgroups.unavailable()
    if why:
        sys.exit(f"planner_check needs cgroups: {why}")
    # A SIGTERM unwinds like Ctrl-C, so the emulated boxes' cgroups are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{'box':<14} {'layers':<9} {'backend/precision':<22} {'predicted':>9} "
        f"{'measured':>9}  ratio   {'roofline':>9}  ratio"
    )
    for r in result["stages"]:
        layers = f"[{r['layers'][0]},{r['layers'][1]})"
        print(
            f"{r['box']:<14} {layers:<9} {r['backend'] + '/' + r['precision']:<22} "
            f"{r['predicted_ms']:>7.2f}ms {r['measured_ms']:>7.2f}ms  x{r['ratio']:.2f}  "
            f"{r['roofline_ms']:>7.2f}ms  x{r['roofline_ratio']:.2f}"
        )
    print(f"max |measured/predicted - 1| = {result['max_relative_error']:.2f}")


if __name__ == "__main__":
    main()
