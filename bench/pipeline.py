"""Figure: the mesh pipeline — per-hop overhead, and tokens/s through 1, 2, 3 stages.

Run: ``python -m edgemesh.bench.pipeline --model PKG [--hidden 640]``
(writes ``bench/results/pipeline.json``).

1. **Data plane per hop.** Echo stages (no compute) in a chain of 1, 2 and
   3 Ray actors pinned to box resources; one token's hidden state
   (``hidden`` values, fp16) goes driver -> stages -> driver. Three planes:
   plain Ray actor calls with ObjectRefs passed stage to stage (what the
   router uses), a Ray compiled graph (``experimental_compile``), and a
   direct msgpack-over-TCP stream between adjacent stages. The per-hop
   overhead is the slope of round-trip time over the number of stages
   (least squares), so the fixed driver cost is not counted per hop.
2. **Through the real router.** ``RayPipeline`` + ``Engine`` on the given
   package cut into 1, 2 and 3 stages: single-stream decode tokens/s, and
   aggregate tokens/s with 1, 4 and 16 concurrent greedy streams.

Every figure is measured in the run; the JSON records the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path("bench/results")
BOXES = ("a", "b", "c")


# -- echo stages for the data-plane comparison --------------------------------


class EchoStage:
    """Returns what it gets; also a TCP relay for the stream plane."""

    def echo(self, x: Any) -> Any:
        return x

    def tcp_start(self, downstream: tuple[str, int] | None) -> int:
        """Listen for the upstream stage; relay each frame downstream."""
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(1)
        self._down = downstream
        threading.Thread(target=self._relay, daemon=True).start()
        return self._srv.getsockname()[1]

    def _relay(self) -> None:
        import msgpack

        up, _ = self._srv.accept()
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._down is not None
        down = socket.create_connection(self._down)
        down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            frame = _recv_frame(up)
            if frame is None:
                return
            msg = msgpack.unpackb(frame)  # decoded as a stage would, then re-encoded
            _send_frame(down, msgpack.packb(msg))


def _send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    return _recv_exact(sock, struct.unpack("!I", head)[0])


def _payload(hidden: int) -> dict[str, Any]:
    return {
        "seq_ids": [1],
        "start_pos": [17],
        "hidden": np.random.default_rng(0).standard_normal(hidden).astype(np.float16).tobytes(),
    }


def _timeit(fn: Any, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _slope(xs: list[int], ys: list[float]) -> float:
    return float(np.polyfit(np.array(xs, float), np.array(ys, float), 1)[0])


def data_planes(ray: Any, hidden: int, repeats: int) -> dict[str, Any]:
    import msgpack

    payload = _payload(hidden)
    remote = ray.remote(EchoStage)
    out: dict[str, Any] = {
        "payload_bytes": {
            "hidden_fp16": hidden * 2,
            "msgpack_frame": len(msgpack.packb(payload)) + 4,
            "ray_serialized": len(ray.cloudpickle.dumps(payload)),
        }
    }
    planes: dict[str, dict[int, float]] = {
        "ray_actor_calls": {},
        "compiled_graph": {},
        "tcp_msgpack": {},
    }
    errors: dict[str, str] = {}
    for n in (1, 2, 3):
        actors = [
            remote.options(resources={f"box:{BOXES[i]}": 0.001}, num_cpus=0).remote()
            for i in range(n)
        ]
        ray.get([a.echo.remote(0) for a in actors])

        def chained(actors: list[Any] = actors) -> None:
            ref: Any = payload
            for a in actors:
                ref = a.echo.remote(ref)
            ray.get(ref)

        planes["ray_actor_calls"][n] = _timeit(chained, repeats)
        try:
            planes["compiled_graph"][n] = _compiled(ray, actors, payload, repeats)
        except Exception as exc:  # experimental API: record why it could not run
            errors["compiled_graph"] = repr(exc)[:300]
        for a in actors:
            ray.kill(a)
        actors = [
            remote.options(resources={f"box:{BOXES[i]}": 0.001}, num_cpus=0).remote()
            for i in range(n)
        ]
        planes["tcp_msgpack"][n] = _tcp(ray, actors, payload, repeats)
        for a in actors:
            ray.kill(a)
    for name, series in planes.items():
        if len(series) == 3:
            xs = sorted(series)
            out[name] = {
                "round_trip_ms": {str(k): round(series[k], 4) for k in xs},
                "per_hop_ms": round(_slope(xs, [series[k] for k in xs]), 4),
            }
    out["errors"] = errors
    return out


def _compiled(ray: Any, actors: list[Any], payload: Any, repeats: int) -> float:
    from ray.dag import InputNode

    with InputNode() as inp:
        node: Any = inp
        for a in actors:
            node = a.echo.bind(node)
    dag = node.experimental_compile()
    try:
        return _timeit(lambda: ray.get(dag.execute(payload)), repeats)
    finally:
        dag.teardown()


def _tcp(ray: Any, actors: list[Any], payload: Any, repeats: int) -> float:
    import msgpack

    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    downstream: tuple[str, int] = ("127.0.0.1", sink.getsockname()[1])
    for a in reversed(actors):
        downstream = ("127.0.0.1", ray.get(a.tcp_start.remote(downstream)))
    first = socket.create_connection(downstream)
    first.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back, _ = sink.accept()
    try:

        def round_trip() -> None:
            _send_frame(first, msgpack.packb(payload))
            msgpack.unpackb(_recv_frame(back))

        return _timeit(round_trip, repeats)
    finally:
        first.close()
        back.close()
        sink.close()


# -- the real router ------------------------------------------------------------


def router_figures(package: Path, tokens: int, tmp: Path) -> dict[str, Any]:
    from edgemesh.engine import Engine, EngineConfig
    from edgemesh.router.placement import StaticPlacer
    from edgemesh.router.ray_pipeline import RayPipeline
    from edgemesh.router.stage import StageSpec
    from edgemesh.sampling import SamplingParams
    from edgemesh.sharding.package.folder import open_package

    pkg = open_package(package)
    n = pkg.num_layers
    tok = pkg.tokenizer()
    from edgemesh.mesh.deployment_record import PackageRef

    manifest = PackageRef.from_folder(package)
    out: dict[str, Any] = {"model": pkg.manifest.name, "num_layers": n, "tokens": tokens}
    rng = np.random.default_rng(1)
    prompts = [[1, *rng.integers(5, 300, size=8).tolist()] for _ in range(16)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for stages in (1, 2, 3):
        if stages > n:
            continue
        cuts = [round(n * i / stages) for i in range(1, stages)]
        points = [0, *cuts, n]
        limits = EngineConfig(context_length=512, max_sequences=16, max_queue=64)
        specs = [
            StageSpec(
                i,
                BOXES[i],
                a,
                b,
                n,
                package_dir=str(package),
                cache_root=str(tmp / BOXES[i]),
                threads=1,
                max_sequences=limits.max_sequences,  # every stage holds what the engine admits
            )
            for i, (a, b) in enumerate(itertools.pairwise(points))
        ]
        pipe = RayPipeline(StaticPlacer(specs), manifest)
        engine = Engine(pipe, tok, limits)
        row: dict[str, Any] = {"layers": [[s.start, s.stop] for s in specs]}
        try:
            list(engine.submit(prompts[0], params))  # warm-up
            for streams in (1, 4, 16):
                t0 = time.perf_counter()
                gens = [engine.submit(p, params) for p in prompts[:streams]]
                count = sum(1 for g in gens for ev in g if ev.token_id is not None)
                row[f"aggregate_tok_s_{streams}"] = round(count / (time.perf_counter() - t0), 2)
            row["single_stream_tok_s"] = row["aggregate_tok_s_1"]
            row["ratio_16_vs_1"] = round(row["aggregate_tok_s_16"] / row["aggregate_tok_s_1"], 2)
            row["stage_calls"] = pipe.stage_stats()
        finally:
            engine.close()
        out[f"{stages}_stages"] = row
    return out


def run(
    model: Path,
    *,
    hidden: int = 640,
    tokens: int = 32,
    repeats: int = 200,
    out: Path | None = RESULTS / "pipeline.json",
) -> dict[str, Any]:
    """Measure the data planes and the router on a local Ray node; write ``out``."""
    from edgemesh.lab.isolation import local_ray

    with local_ray(BOXES, "edgemesh-bench-") as (ray, tmp):
        result = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": len(os.sched_getaffinity(0)),
                "python": platform.python_version(),
                "ray": ray.__version__,
                "note": "all stages on one host (loopback), one Ray node with box resources",
            },
            "command": (
                f"edgemesh bench pipeline --model <{Path(model).name} package> "
                f"--hidden {hidden} --tokens {tokens} --repeats {repeats}"
            ),
            "data_plane": data_planes(ray, hidden, repeats),
            "router": router_figures(Path(model).resolve(), tokens, tmp),
        }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a converted package folder")
    ap.add_argument("--hidden", type=int, default=640, help="hidden size for the hop payload")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline.json")
    args = ap.parse_args(argv)
    result = run(
        args.model, hidden=args.hidden, tokens=args.tokens, repeats=args.repeats, out=args.out
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
