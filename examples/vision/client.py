"""Post camera frames to the served line-inspection model with tritonclient and
print the verdicts and latency percentiles.

    python client.py --url 127.0.0.1:8000 --model line --frames FOLDER
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from frames import load_frame


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--model", default="line")
    ap.add_argument("--frames", type=Path, required=True)
    ap.add_argument("--package", type=Path, required=True, help="for the preprocessing")
    args = ap.parse_args(argv)

    manifest = json.loads((args.package / "graph.json").read_text())
    pre = manifest["preprocessing"]
    spec = manifest["inputs"][0]
    size = spec["shape"][2]
    client = httpclient.InferenceServerClient(args.url)
    assert client.is_model_ready(args.model), f"model {args.model} is not ready"
    paths = sorted(args.frames.glob("*.png"))
    rows = [load_frame(p, size, pre["mean"], pre["std"]) for p in paths]
    for x in rows[:3]:  # warm-up
        _infer(client, args.model, spec["name"], x)
    latencies, verdicts = [], {"ok": 0, "defect": 0}
    for x in rows:
        start = time.perf_counter()
        logits = _infer(client, args.model, spec["name"], x)
        latencies.append((time.perf_counter() - start) * 1e3)
        verdicts[("ok", "defect")[int(logits.argmax())]] += 1
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    with urllib.request.urlopen(f"http://{args.url}/v2/models/{args.model}/stats") as r:
        engine = json.loads(r.read())["edgemesh"]
    print(f"{len(rows)} frames on {engine['backend']}/{engine['precision']}: {verdicts}")
    print(f"latency ms: p50 {p50:.2f}  p90 {p90:.2f}  p99 {p99:.2f}")
    return {
        "frames": len(rows),
        "p50_ms": p50,
        "p99_ms": p99,
        "verdicts": verdicts,
        "engine": engine,
    }


def _infer(client: httpclient.InferenceServerClient, model: str, name: str, x: np.ndarray):
    t = httpclient.InferInput(name, list(x.shape), "FP32")
    t.set_data_from_numpy(x)  # binary tensor extension
    return client.infer(model, [t]).as_numpy("output")[0]


if __name__ == "__main__":
    main()
