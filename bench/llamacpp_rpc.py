"""llama.cpp's RPC mode against edgemesh's ONNX pipeline: one model over two boxes.

    python -m edgemesh.bench.llamacpp_rpc [--package DIR] [--tokens 64] [--repeats 3]
        [--splits 1:1,1:2] [--box-cpus 1.0] [--no-ray]

Two ggml RPC servers run as separate Python processes on 127.0.0.1 (each
calls ``ggml_backend_rpc_start_server`` through ctypes with one CPU device
and one thread, optionally inside a cgroup with a CPU quota to emulate a
box). A client process loads the default model's GGUF with the two remote
devices as ``llama_model_params.devices`` and shares the layers between
them with ``tensor_split``. Every engine runs in its own subprocess with
the same prompt token ids and decodes greedily:

* ``llamacpp-local-<T>t``: the same GGUF, same decode loop, on this
  process's CPU with T threads (1 = one box's worth, the reference);
* ``llamacpp-rpc-<a:b>``: the GGUF over the two RPC servers, split a:b;
* ``onnx-2stage-openvino:<p>``: the converted package cut at ``--cut``
  into two in-process stages on OpenVINO, one thread each;
* ``ray-2stage-openvino:<p>``: the same two stages as Ray actors pinned to
  two box resources, driven by the router's ``RayPipeline`` + ``Engine``.

The RPC runs must reproduce the local greedy tokens exactly. Bytes on the
wire are read from the kernel's TCP counters of the client's sockets to
the servers (``ss -tin``): model load, prefill and per decoded token.
Results go to ``bench/results/llamacpp_rpc.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.reexec import module_argv

RESULTS = Path("bench/results")
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from "
    "wine making. Within fifty years printing shops had opened in more than two hundred "
    "European cities, and the price of books fell so far that"
)
_CPU_DEVICE = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU


# -- the ggml RPC C API through ctypes ------------------------------------------


def _ggml() -> tuple[Any, Any]:
    """(libggml-base, libggml-rpc) with the prototypes of ggml-rpc.h (protocol 7)."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(libdir / "libggml-base.so"))
    ggml = ctypes.CDLL(str(libdir / "libggml.so"))
    rpc = ctypes.CDLL(str(libdir / "libggml-rpc.so"))
    vp = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = vp
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,  # endpoint "host:port"
        ctypes.c_char_p,  # cache_dir (NULL: no local tensor cache)
        ctypes.c_size_t,  # n_threads
        ctypes.c_size_t,  # n_devices
        ctypes.POINTER(vp),  # devices
    ]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = vp
    base.ggml_backend_reg_dev_count.argtypes = [vp]
    base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    base.ggml_backend_reg_dev_get.argtypes = [vp, ctypes.c_size_t]
    base.ggml_backend_reg_dev_get.restype = vp
    base.ggml_backend_dev_name.argtypes, base.ggml_backend_dev_name.restype = [vp], ctypes.c_char_p
    base.ggml_backend_dev_description.argtypes = [vp]
    base.ggml_backend_dev_description.restype = ctypes.c_char_p
    base.ggml_backend_dev_by_type = ggml.ggml_backend_dev_by_type
    return base, rpc


def serve(endpoint: str, threads: int, cache_dir: str | None) -> None:
    """Run a ggml RPC server with this host's CPU device; blocks until killed."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    base, rpc = _ggml()
    cpu = base.ggml_backend_dev_by_type(_CPU_DEVICE)
    if not cpu:
        raise RuntimeError("ggml lists no CPU device")
    devices = (ctypes.c_void_p * 1)(cpu)
    cache = cache_dir.encode() if cache_dir else None
    rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache, threads, 1, devices)
    raise RuntimeError(f"the RPC server on {endpoint} returned")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? (no connection is made: the
    RPC server serves one client at a time and a probe would be a client)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        return any((f := line.split())[1] == want and f[3] == "0A" for line in list(fh)[1:] if line)


@contextlib.contextmanager
def rpc_servers(
    n: int, threads: int, box_cpus: float | None, cache_dir: str | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Start ``n`` RPC server processes; yields [{endpoint, pid}], kills them on exit."""
    stack = contextlib.ExitStack()
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[dict[str, Any]] = []
    try:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgemesh-rpc-logs-")))
        for i in range(n):
            port = _free_port()
            endpoint = f"127.0.0.1:{port}"
            argv = module_argv("edgemesh.bench.llamacpp_rpc", "--serve", endpoint)
            argv += ["--threads", str(threads)]
            if cache_dir:
                argv += ["--server-cache", cache_dir]
            if box_cpus:
                from edgemesh.lab.cgroups import Limits

                argv = stack.enter_context(Limits(box_cpus, None, f"rpc{i}")).wrap(argv)
            log = open(logs / f"rpc-{port}.log", "wb")
            stack.callback(log.close)
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            servers.append({"endpoint": endpoint, "pid": procs[-1].pid, "log": log.name})
        deadline = time.monotonic() + 60
        for proc, srv in zip(procs, servers, strict=True):
            port = int(srv["endpoint"].rsplit(":", 1)[1])
            while not _listening(port):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"RPC server {srv['endpoint']} exited with {proc.returncode}: "
                        + Path(srv["log"]).read_text(errors="replace")[-2000:]
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RPC server {srv['endpoint']} did not listen in 60 s")
                time.sleep(0.05)
        yield servers
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=30)
        stack.close()


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- wire bytes from the kernel's TCP counters ----------------------------------


def wire_bytes(ports: Sequence[int]) -> dict[str, int]:
    """Bytes this host's sockets have sent to / received from ``ports`` so far.

    Read from ``ss -tin`` (tcp_info ``bytes_sent``/``bytes_received``) for
    connections whose peer is one of the server ports: what the client put
    on the wire, payload only (no TCP/IP headers).
    """
    out = subprocess.run(
        ["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    sent = received = 0
    peers = {f"127.0.0.1:{p}" for p in ports}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 4 and fields[3] in peers and i + 1 < len(lines):
            info = lines[i + 1]
            if m := re.search(r"bytes_sent:(\d+)", info):
                sent += int(m.group(1))
            if m := re.search(r"bytes_received:(\d+)", info):
                received += int(m.group(1))
    return {"sent": sent, "received": received}


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


# -- llama.cpp client: local CPU or RPC devices, one greedy loop -----------------


class _LlamaRun:
    """A GGUF model on the local CPU or on RPC devices, decoded greedily."""

    def __init__(
        self, gguf: str, threads: int, endpoints: Sequence[str] = (), split: Sequence[float] = ()
    ) -> None:
        from edgemesh.backends.llamacpp import _lib, model_params

        llama = self.llama = _lib()
        params = model_params(llama)  # use_extra_bufts off on AMX CPUs (see there)
        self.devices: list[str] = []
        if endpoints:
            base, rpc = _ggml()
            devs = []
            for ep in endpoints:
                reg = rpc.ggml_backend_rpc_add_server(ep.encode())
                if not reg or base.ggml_backend_reg_dev_count(reg) < 1:
                    raise RuntimeError(f"RPC server {ep} offers no device")
                for i in range(base.ggml_backend_reg_dev_count(reg)):
                    dev = base.ggml_backend_reg_dev_get(reg, i)
                    devs.append(dev)
                    name = base.ggml_backend_dev_name(dev).decode()
                    where = base.ggml_backend_dev_description(dev).decode()
                    self.devices.append(f"{name}[{where}]")
            # devices: NULL-terminated ggml_backend_dev_t[]; tensor_split: float[max devices]
            self._devs = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
            self._split = (ctypes.c_float * llama.LLAMA_MAX_DEVICES)(*split)
            params.devices = ctypes.cast(self._devs, ctypes.c_void_p)
            params.tensor_split = self._split
            params.n_gpu_layers = 999  # every layer and the output onto the devices
        t0 = time.perf_counter()
        self.model = llama.llama_model_load_from_file(gguf.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf} on {self.devices or 'CPU'}")
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = 1024
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = llama.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.load_s = time.perf_counter() - t0
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.batch = llama.llama_batch_init(512, 0, 1)

    def _decode(self, tokens: Sequence[int], pos: int) -> int:
        b, llama = self.batch, self.llama
        for k, tok in enumerate(tokens):
            b.token[k], b.pos[k], b.n_seq_id[k] = tok, pos + k, 1
            b.seq_id[k][0] = 0
            b.logits[k] = k == len(tokens) - 1
        b.n_tokens = len(tokens)
        if llama.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = llama.llama_get_logits_ith(self.ctx, len(tokens) - 1)
        # logits: [V] float32 -> greedy pick
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def generate(self, prompt: Sequence[int], n: int, probe: Any = None) -> dict[str, Any]:
        """Greedy ``n`` tokens; ``probe()`` is read before, after prefill and at the end."""
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.ctx), True)
        marks = [probe()] if probe else []
        t0 = time.perf_counter()
        out = [self._decode(prompt, 0)]
        t1 = time.perf_counter()
        if probe:
            marks.append(probe())
        t1 = time.perf_counter()  # the probe's subprocess is not decode time
        while len(out) < n:
            out.append(self._decode([out[-1]], len(prompt) + len(out) - 1))
        t2 = time.perf_counter()
        if probe:
            marks.append(probe())
        return {"ttft_s": t1 - t0, "decode_s": t2 - t1, "ids": out, "marks": marks}

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)
        self.llama.llama_model_free(self.model)


def _summary(samples: list[dict[str, Any]], load_s: float) -> dict[str, Any]:
    import resource

    rates = [(len(s["ids"]) - 1) / s["decode_s"] for s in samples]
    ids = samples[0]["ids"]
    if any(s["ids"] != ids for s in samples):
        raise RuntimeError("repeats of one engine produced different greedy tokens")
    return {
        "ttft_ms": round(1000 * statistics.median(s["ttft_s"] for s in samples), 2),
        "decode_tokens_per_s": round(statistics.median(rates), 2),
        "decode_tokens_per_s_all": [round(r, 2) for r in rates],
        "load_s": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "token_ids": ids,
    }


def _placement(lines: list[str]) -> dict[str, Any]:
    """llama.cpp's load log -> layers per device (layer n_layer = the output) and buffers."""
    layers: dict[str, list[int]] = {}
    for line in lines:
        if m := re.search(r"layer\s+(\d+) assigned to device (\S+?),", line):
            layers.setdefault(m.group(2), []).append(int(m.group(1)))
    buffers = [
        re.sub(r"^\w+:\s*", "", line)
        for line in lines
        if "buffer size =" in line and not line.startswith("~")
    ]
    return {"layers_per_device": layers, "buffers": buffers}


def _llama_worker(job: dict[str, Any]) -> dict[str, Any]:
    import logging

    # llama.cpp's log lines come through edgemesh's logger; keep the layer placement.
    placement: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "assigned to device" in msg or "offloaded" in msg or "buffer size" in msg:
                placement.append(msg.removeprefix("llama.cpp: "))

    logger = logging.getLogger("edgemesh.backends.llamacpp")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(_Keep())
    ports = [int(ep.rsplit(":", 1)[1]) for ep in job.get("endpoints", [])]
    probe = (lambda: wire_bytes(ports)) if ports else None
    before = probe() if probe else None
    run = _LlamaRun(job["gguf"], job["threads"], job.get("endpoints", ()), job.get("split", ()))
    loaded = probe() if probe else None
    samples = []
    try:
        run.generate(job["prompt"], 4)  # warm-up: first-call allocations
        for _ in range(job["repeats"]):
            samples.append(run.generate(job["prompt"], job["tokens"], probe))
    finally:
        run.close()
    result = {**_summary(samples, run.load_s), "devices": run.devices, **_placement(placement)}
    if probe:
        assert before is not None and loaded is not None
        marks = samples[-1]["marks"]
        steps = len(samples[-1]["ids"]) - 1
        decode = _delta(marks[1], marks[2])
        result["wire_bytes"] = {
            "model_load": _delta(before, loaded),
            "prefill": _delta(marks[0], marks[1]),
            "decode_total": decode,
            "per_decoded_token": {k: round(v / steps) for k, v in decode.items()},
        }
    return result


# -- edgemesh's ONNX pipeline --------------------------------------------------


def _onnx_worker(job: dict[str, Any]) -> dict[str, Any]:
    from edgemesh.backends.base import BackendOptions, SeqInput
    from edgemesh.offline import generate
    from edgemesh.sharding.pipeline import load_pipeline

    opts = BackendOptions(threads=job["threads"], context_length=1024, max_sequences=1)
    t0 = time.perf_counter()
    pipe = load_pipeline(
        job["package"], job["cuts"], job["precision"], backend=job["backend"], options=opts
    )
    load_s = time.perf_counter() - t0
    samples = []
    try:
        generate(pipe, job["prompt"], max_tokens=4)  # warm-up
        for _ in range(job["repeats"]):
            g = generate(pipe, job["prompt"], max_tokens=job["tokens"])
            samples.append({"ttft_s": g.seconds_prefill, "decode_s": g.seconds_decode,
                            "ids": g.token_ids})  # fmt: skip
        # What would cross the cut: the first stage's hidden states for the prompt.
        prompt = np.asarray(job["prompt"], dtype=np.int64)
        hidden = pipe.backends[0].forward([SeqInput(99, 0, tokens=prompt)])[0]  # [S, H]
        pipe.backends[0].release(99)
    finally:
        pipe.close()
    fp16_max = float(np.finfo(np.float16).max)
    return {
        **_summary(samples, load_s),
        "precision": job["precision"],
        "hidden_at_cut": {
            "max_abs": round(float(np.abs(hidden).max()), 1),
            "values_over_fp16_max": int((np.abs(hidden) > fp16_max).sum()),
            "positions_over_fp16_max": sorted(
                {int(i) for i in np.argwhere(np.abs(hidden) > fp16_max)[:, 0]}
            ),
        },
    }


def _ray_worker(job: dict[str, Any]) -> dict[str, Any]:
    import itertools
    from dataclasses import replace

    from edgemesh.engine import Engine, EngineConfig
    from edgemesh.lab.isolation import local_ray
    from edgemesh.mesh.deployment_record import PackageRef
    from edgemesh.router.placement import StaticPlacer
    from edgemesh.router.ray_pipeline import RayPipeline
    from edgemesh.router.stage import StageSpec
    from edgemesh.sampling import SamplingParams
    from edgemesh.sharding.package.folder import open_package

    pkg = open_package(job["package"])
    n = pkg.num_layers
    boxes = ("a", "b")
    # The temporary folder holds Ray's session and the composed ranges; both go at exit.
    with local_ray(boxes, "edgemesh-rpcbench-") as (_ray, tmp):
        points = [0, *job["cuts"], n]
        specs = [
            StageSpec(i, boxes[i], a, b, n, backend=job["backend"], precision=job["precision"],
                      package_dir=job["package"], cache_root=str(tmp / boxes[i]),
                      threads=job["threads"], context_length=1024, max_sequences=4)
            for i, (a, b) in enumerate(itertools.pairwise(points))
        ]  # fmt: skip
        placer = StaticPlacer(specs)
        if job["wire"] != "default":  # the router picks fp16 between int stages
            placer.specs = [replace(s, wire=job["wire"]) for s in placer.specs]
        wire = placer.specs[0].wire
        t0 = time.perf_counter()
        pipe = RayPipeline(placer, PackageRef.from_folder(Path(job["package"])))
        engine = Engine(pipe, pkg.tokenizer(), EngineConfig(context_length=1024, max_sequences=1))
        load_s = time.perf_counter() - t0
        try:

            def once(tokens: int) -> dict[str, Any]:
                params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
                start = time.perf_counter()
                first = None
                ids = []
                for ev in engine.submit(list(job["prompt"]), params):
                    if ev.token_id is not None:
                        ids.append(ev.token_id)
                        if first is None:
                            first = time.perf_counter()
                end = time.perf_counter()
                assert first is not None
                return {"ttft_s": first - start, "decode_s": end - first, "ids": ids}

            once(4)  # warm-up
            samples = [once(job["tokens"]) for _ in range(job["repeats"])]
        finally:
            engine.close()
    return {**_summary(samples, load_s), "precision": job["precision"], "wire": wire}


# -- the driver -----------------------------------------------------------------


def _spawn(job: dict[str, Any]) -> dict[str, Any]:
    from edgemesh.lab.isolation import run_worker

    return run_worker("edgemesh.bench.llamacpp_rpc", job, job["name"])


def _parse_split(text: str) -> list[float]:
    parts = [float(p) for p in text.split(":")]
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"a split is two positive shares like 1:2, got '{text}'")
    return parts


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgemesh import models
    from edgemesh.backends.llamacpp import GgufTokenizer

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    gguf = str(args.gguf or models.default_model_path())
    package = str(args.package or models.default_package())
    tok = GgufTokenizer(Path(gguf))
    prompt = tok.encode(PROMPT)
    common = {"gguf": gguf, "prompt": prompt, "tokens": args.tokens, "repeats": args.repeats}
    runs: dict[str, Any] = {}
    for threads in sorted({1, args.local_threads}):
        name = f"llamacpp-local-{threads}t"
        runs[name] = _spawn({**common, "name": name, "kind": "llama", "threads": threads})
    servers_info: dict[str, Any] = {}
    with rpc_servers(2, 1, args.box_cpus, args.server_cache) as servers:
        endpoints = [s["endpoint"] for s in servers]
        for split in args.splits:
            name = "llamacpp-rpc-" + ":".join(f"{s:g}" for s in split)
            if name in runs:  # the same split again (a warm server cache loads less)
                name += f"-again{sum(k.startswith(name) for k in runs)}"
            job = {**common, "name": name, "kind": "llama", "threads": 1,
                   "endpoints": endpoints, "split": split}  # fmt: skip
            runs[name] = _spawn(job)
        servers_info = {
            "endpoints": endpoints,
            "threads_each": 1,
            "cpu_quota_each": args.box_cpus,
            "tensor_cache": args.server_cache,
            "peak_rss_mb": [_peak_rss_mb(s["pid"]) for s in servers],
        }
    # In-process stages on OpenVINO; the Ray stages' backend also in process, so the
    # Ray rows compare with the same engine without the hops.
    backends = list(dict.fromkeys(["openvino", *([args.ray_backend] if args.ray else [])]))
    for backend in backends:
        for precision in args.precisions:
            base = {**common, "package": package, "cuts": [args.cut], "threads": 1,
                    "backend": backend, "precision": precision}  # fmt: skip
            name = f"onnx-2stage-{backend}:{precision}"
            runs[name] = _spawn({**base, "name": name, "kind": "onnx"})
            if args.ray and backend == args.ray_backend:
                for wire in ("default", "float32"):
                    name = f"ray-2stage-{backend}:{precision}"
                    name += "" if wire == "default" else f"-{wire}-wire"
                    runs[name] = _spawn({**base, "name": name, "kind": "ray", "wire": wire})

    ref_name = "llamacpp-local-1t"
    ref = runs[ref_name]
    for r in runs.values():
        r["text"] = tok.decode(r["token_ids"])
        r["same_tokens_as_local"] = r["token_ids"] == ref["token_ids"]
        r["matching_prefix_tokens"] = next(
            (
                i
                for i, (a, b) in enumerate(zip(r["token_ids"], ref["token_ids"], strict=False))
                if a != b
            ),
            min(len(r["token_ids"]), len(ref["token_ids"])),
        )
    for name, r in runs.items():
        if name.startswith("ray-"):
            local = runs[name.replace("ray-", "onnx-", 1).removesuffix("-float32-wire")]
            r["same_tokens_as_in_process_stages"] = r["token_ids"] == local["token_ids"]
    ratios = {
        k: {
            "decode": round(v["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3),
            "ttft": round(v["ttft_ms"] / ref["ttft_ms"], 3),
        }
        for k, v in runs.items()
    }
    hidden = 640
    result = {
        "command": "python -m edgemesh.bench.llamacpp_rpc " + " ".join(sys.argv[1:]),
        "model": "gemma-3-270m",
        "gguf": gguf,
        "package": package,
        "prompt_tokens": len(prompt),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "cut": args.cut,
        "machine": {
            "cpu": _cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "system": platform.platform(),
            "llama_cpp_python": _version("llama_cpp"),
            "openvino": _version("openvino"),
            "note": "all boxes on one host: RPC servers and stages talk over loopback",
        },
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "rpc_servers": servers_info,
        "reference": ref_name,
        "runs": runs,
        "ratios_vs_llamacpp_local_1t": ratios,
        "onnx_hop_payload_bytes_per_decoded_token": {
            "float16": hidden * 2,
            "float32": hidden * 4,
            "note": "one hidden state [1, 640] per hop; the Ray path's last stage returns a "
            "token id. Computed from the shapes, not read from sockets",
        },
    }
    out = args.out or RESULTS / "llamacpp_rpc.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    names = {"llama_cpp": "llama-cpp-python"}
    try:
        return version(names.get(module, module))
    except PackageNotFoundError:
        return None


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}: {result['prompt_tokens']}-token prompt, {result['tokens']} greedy "
        f"tokens, median of {result['repeats']}; load avg {result['loadavg_at_start']} at the "
        f"start, {result['loadavg_at_end']} at the end",
        f"{'engine':<40}{'decode tok/s':>13}{'TTFT ms':>9}{'x decode':>9}{'x TTFT':>8}"
        f"{'same':>6}{'B/token':>10}",
    ]
    for name, r in result["runs"].items():
        ratio = result["ratios_vs_llamacpp_local_1t"][name]
        wire = r.get("wire_bytes", {}).get("per_decoded_token")
        per_token = f"{wire['sent'] + wire['received']:>10}" if wire else f"{'-':>10}"
        lines.append(
            f"{name:<40}{r['decode_tokens_per_s']:>13.1f}{r['ttft_ms']:>9.1f}"
            f"{ratio['decode']:>9.3f}{ratio['ttft']:>8.3f}"
            f"{'yes' if r['same_tokens_as_local'] else r['matching_prefix_tokens']:>6}{per_token}"
        )
    for name, r in result["runs"].items():
        if "wire_bytes" in r:
            load = r["wire_bytes"]["model_load"]
            lines.append(f"{name}: model load sent {load['sent'] / 2**20:.1f} MiB to the servers")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", type=Path, help="converted package (default: the default model's)")
    p.add_argument("--gguf", type=Path, help="GGUF (default: the default model's)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cut", type=int, default=9, help="layer where the ONNX pipeline is cut")
    p.add_argument("--splits", type=_parse_split, nargs="+", default=[[1.0, 1.0], [1.0, 2.0]])
    p.add_argument("--precisions", nargs="+", default=["int4", "int8"])
    p.add_argument("--local-threads", type=int, default=2)
    p.add_argument("--box-cpus", type=float, help="CPU quota per RPC server (cgroup)")
    p.add_argument("--server-cache", help="RPC servers' local tensor cache folder")
    p.add_argument("--no-ray", dest="ray", action="store_false")
    p.add_argument(
        "--ray-backend",
        default="onnxruntime",
        help="backend of the Ray stages (OpenVINO fails there: read-only hidden states)",
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.threads, args.server_cache)
        return
    if args.worker:
        job = json.loads(args.worker)
        work = {"llama": _llama_worker, "onnx": _onnx_worker, "ray": _ray_worker}[job["kind"]]
        print(json.dumps(work(job)))
        return
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
