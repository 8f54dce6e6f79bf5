"""Graph models (vision): latency and throughput per engine and precision, in one run.

For MobileNetV3-small, ResNet-18 (torchvision's architectures) and a
YOLO-style detector, random weights (``edgemesh/lab/vision_models.py``):

* ``edgemesh import`` with a calibration folder of synthetic frames:
  import time, package size per precision, measured accuracy;
* the source framework's eager run (PyTorch, same threads) — the reference;
* onnxruntime called directly on the package's fp32 file;
* every installed graph backend x every precision of the package, in-process
  (``backend.run``): p50/p99 at batch 1 and images/s at the best batch;
* through the gateway (``edgemesh serve --model``, fingerprint-chosen engine)
  with ``tritonclient.http``: p50/p99 at batch 1, and the gateway's cost over
  the same engine in-process.

    python -m edgemesh.bench.vision [--models mobilenet_v3_small ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.reexec import edgemesh_argv

MODELS = {
    "mobilenet_v3_small": ("edgemesh.lab.vision_models:mobilenet_v3_small", (3, 224, 224)),
    "resnet18": ("edgemesh.lab.vision_models:resnet18", (3, 224, 224)),
    "tiny_detector": ("edgemesh.lab.vision_models:tiny_detector", (3, 320, 320)),
}
BATCHES = (1, 4, 8, 16)
RESULT = Path(__file__).resolve().parent / "results" / "vision.json"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _latency(run: Callable[[], Any], n: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    p50, p99 = np.percentile(times, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3), "runs": n}


def _throughput(run_batch: Callable[[int], Any], seconds: float = 1.5) -> dict[str, Any]:
    best: dict[str, Any] = {"images_per_s": 0.0, "batch": 1}
    per_batch = {}
    for b in BATCHES:
        run_batch(b)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or count < 3:
            run_batch(b)
            count += 1
        rate = count * b / (time.perf_counter() - start)
        per_batch[b] = round(rate, 1)
        if rate > best["images_per_s"]:
            best = {"images_per_s": round(rate, 1), "batch": b}
    return {**best, "per_batch": per_batch}


def _frames(folder: Path, n: int = 32) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((240, 320, 3), 128, np.int16) + rng.integers(-30, 30, (240, 320, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def bench_model(name: str, work: Path, threads: int, runs: int) -> dict[str, Any]:
    import torch

    from edgemesh.backends import registry
    from edgemesh.backends.graph_base import GraphOptions
    from edgemesh.graph.build import BuildOptions, build_package

    spec, shape = MODELS[name]
    package = work / name
    start = time.perf_counter()
    manifest = build_package(
        spec,
        package,
        BuildOptions(
            calibration=_frames(work / "frames"),
            preprocessing={"scale": 1 / 255, "mean": IMAGENET[0], "std": IMAGENET[1]},
            force=True,
        ),
    )
    result: dict[str, Any] = {
        "import_s": round(time.perf_counter() - start, 2),
        "precisions": {
            p: {
                "bytes": e.bytes,
                "method": e.method,
                "accuracy": None if e.accuracy is None else e.accuracy.__dict__,
            }
            for p, e in manifest.precisions.items()
        },
        "engines": {},
    }
    rng = np.random.default_rng(1)
    x1 = rng.standard_normal((1, *shape)).astype(np.float32)
    xb = {b: rng.standard_normal((b, *shape)).astype(np.float32) for b in BATCHES}
    in_name = manifest.inputs[0].name

    # The source framework's eager run: the reference every figure is compared with.
    torch.set_num_threads(threads)
    module_name, _, attr = spec.partition(":")
    import importlib

    model, _ = getattr(importlib.import_module(module_name), attr)()
    with torch.no_grad():
        t1 = torch.from_numpy(x1)
        tb = {b: torch.from_numpy(v) for b, v in xb.items()}
        result["engines"]["pytorch-eager/fp32"] = {
            **_latency(lambda: model(t1), runs),
            "throughput": _throughput(lambda b: model(tb[b])),
        }

    # onnxruntime called directly on the package's file (no edgemesh code in the loop).
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    for p in ("fp32", "int8"):
        if p not in manifest.precisions:
            continue
        sess = ort.InferenceSession(
            str(package / manifest.precisions[p].file), so, providers=["CPUExecutionProvider"]
        )
        result["engines"][f"onnxruntime-direct/{p}"] = {
            **_latency(lambda s=sess: s.run(None, {in_name: x1}), runs),
            "throughput": _throughput(lambda b, s=sess: s.run(None, {in_name: xb[b]})),
        }

    for backend_name, cls in registry.graph_backends().items():
        reason = cls.available()
        if reason is not None:
            result["engines"][f"{backend_name}/*"] = {"skipped": reason}
            continue
        for p in manifest.precisions:
            if p not in cls.capabilities.precisions:
                continue
            graph = manifest.verify(package, p)
            engine_dir = package / "engines" / f"bench-{backend_name}"
            backend = cls(
                graph,
                manifest.inputs,
                p,
                GraphOptions(
                    threads=threads,
                    device=cls.capabilities.devices[0],
                    engine_dir=engine_dir,
                    max_batch=max(BATCHES),
                ),
            )
            try:
                result["engines"][f"{backend_name}/{p}"] = {
                    **_latency(lambda be=backend: be.run({in_name: x1}), runs),
                    "throughput": _throughput(lambda b, be=backend: be.run({in_name: xb[b]})),
                }
            finally:
                backend.close()
    result["http"] = _http(package, name, in_name, x1, threads, runs)
    result["http"]["gateway_overhead_p50_ms"] = result["http"]["gateway_overhead"]["p50_ms"]
    return result


def _interleaved(
    package: Path,
    in_name: str,
    x1: np.ndarray,
    threads: int,
    runs: int,
    http_call: Callable[[], None],
    backend_name: str,
    precision: str,
) -> dict[str, Any]:
    """The gateway's cost: the engine and precision the server chose, called
    in-process, alternated call by call with the HTTP request, so load that drifts
    during the run hits both sides alike. Per pair: HTTP - in-process."""
    from edgemesh.backends import registry
    from edgemesh.backends.graph_base import GraphOptions
    from edgemesh.graph.manifest import GraphManifest

    manifest = GraphManifest.load(package)
    cls = registry.get_graph(backend_name)
    backend = cls(
        manifest.verify(package, precision),
        manifest.inputs,
        precision,
        GraphOptions(
            threads=threads,
            device=cls.capabilities.devices[0],
            engine_dir=package / "engines" / f"bench-{backend_name}",
        ),
    )
    try:
        local, remote = [], []
        for _ in range(5):
            backend.run({in_name: x1})
            http_call()
        for _ in range(runs):
            t0 = time.perf_counter()
            backend.run({in_name: x1})
            t1 = time.perf_counter()
            http_call()
            t2 = time.perf_counter()
            local.append((t1 - t0) * 1e3)
            remote.append((t2 - t1) * 1e3)
    finally:
        backend.close()
    deltas = np.asarray(remote) - np.asarray(local)
    return {
        "p50_ms": round(float(np.median(deltas)), 3),
        "in_process_p50_ms": round(float(np.median(local)), 3),
        "http_p50_ms": round(float(np.median(remote)), 3),
        "engine": f"{backend_name}/{precision}",
        "pairs": runs,
    }


def _http(package: Path, name: str, in_name: str, x1: np.ndarray, threads: int, runs: int):
    import tritonclient.http as httpclient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            *edgemesh_argv("serve"),
            "--model",
            str(package),
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        while True:
            try:
                if client.is_model_ready(name):
                    break
            except Exception:  # not listening yet
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("edgemesh serve did not start")
            time.sleep(0.3)

        def one() -> None:
            t = httpclient.InferInput(in_name, list(x1.shape), "FP32")
            t.set_data_from_numpy(x1)
            client.infer(name, [t])

        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{name}/stats") as r:
            info = json.loads(r.read())["edgemesh"]
        figures = _latency(one, runs)
        figures["gateway_overhead"] = _interleaved(
            package, in_name, x1, threads, runs, one, info["backend"], info["precision"]
        )
        return {
            **figures,
            "backend": info["backend"],
            "precision": info["precision"],
            "chosen_by": info["chosen_by"],
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(models: list[str], threads: int, runs: int, out: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgemesh-bench-vision-"))
    result: dict[str, Any] = {
        "command": "python -m edgemesh.bench.vision " + " ".join(sys.argv[1:]),
        "machine": _machine(threads),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": {},
    }
    try:
        for name in models:
            print(f"[vision] {name}", flush=True)
            result["models"][name] = bench_model(name, work, threads, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # packages and frames: tens of MB a run
    result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _machine(threads: int) -> dict[str, Any]:
    import platform

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }


def figure(result: dict[str, Any] | None) -> str:
    """The docs/BENCHMARKS.md section (called by ``report.render``)."""
    from edgemesh.bench.tables import missing, provenance, table

    title = "\n## Graph models (vision): engines and precisions\n"
    if result is None:
        return title + missing("python -m edgemesh.bench.vision")
    parts = [
        title,
        (
            "\nLatency at batch 1 and images/s at the best batch, in-process unless marked; "
            "`ratio` = PyTorch eager p50 / this p50 (same threads, same run). "
            "Accuracy: the package's measured loss (1 - top-1 agreement for the classifiers, "
            "relative L2 error for the detector) vs PyTorch on the calibration frames.\n"
        ),
    ]
    for name, m in result["models"].items():
        eager = m["engines"]["pytorch-eager/fp32"]["p50_ms"]
        rows = []
        for key, e in m["engines"].items():
            if "skipped" in e:
                rows.append([key, None, None, None, None, e["skipped"][:60]])
                continue
            p = key.split("/")[1]
            acc = (m["precisions"].get(p) or {}).get("accuracy") or {}
            tp = e["throughput"]
            rows.append(
                [
                    key,
                    e["p50_ms"],
                    e["p99_ms"],
                    round(eager / e["p50_ms"], 2),
                    f"{tp['images_per_s']:.0f} (b{tp['batch']})",
                    acc.get("loss"),
                ]
            )
        h = m["http"]
        rows.append(
            [
                f"HTTP /v2 tritonclient ({h['backend']}/{h['precision']})",
                h["p50_ms"],
                h["p99_ms"],
                round(eager / h["p50_ms"], 2),
                None,
                f"gateway +{h.get('gateway_overhead_p50_ms', '?')} ms p50 (interleaved)",
            ]
        )
        sizes = ", ".join(f"{p} {v['bytes'] / 1e6:.1f} MB" for p, v in m["precisions"].items())
        parts.append(f"\n### {name}\n\nImport {m['import_s']} s; package: {sizes}.\n")
        parts.append(
            table(
                [
                    "engine/precision",
                    "p50 ms",
                    "p99 ms",
                    "ratio vs eager",
                    "images/s (batch)",
                    "accuracy loss / note",
                ],
                rows,
            )
        )
    parts.append(provenance(result))
    parts.append(f"_Load average after the run:_ {' '.join(result.get('loadavg_after', []))}\n")
    machine = result.get("machine", {})
    # The 1-minute averages only: the longer ones still hold whatever ran before,
    # and the run itself keeps the cores busy (its own load shows up "after").
    cores = machine.get("cores", 1)
    before = [float(x) for x in machine.get("loadavg_before", [])[:1]]
    after = [float(x) for x in result.get("loadavg_after", [])[:1]]
    loads = before + after
    if (before and before[0] > cores / 2) or (after and after[0] > cores):
        parts.append(
            f"\n_This run shared the machine with other work (load average up to {max(loads):.0f} "
            f"on {machine.get('cores')} cores): every figure, the ratios and the gateway's cost "
            "included (it can even come out negative), is distorted by that contention. Re-run "
            "`python -m edgemesh.bench.vision` on a quiet box before quoting one._\n"
        )
    return "".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    result = run(args.models, args.threads, args.runs, args.out)
    print(
        json.dumps(
            {
                k: {e: v.get("p50_ms") for e, v in m["engines"].items()}
                for k, m in result["models"].items()
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
