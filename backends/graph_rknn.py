"""RKNN graph backend: a graph package on a Rockchip NPU (RK3588 and kin).

The NPU runs static shapes and its own model format, so the ``.rknn`` file
is built offline on an x86 host with rknn-toolkit2 (``build_rknn`` below,
the same split as ``deploy/rknn`` for LLMs) from the package's fp32 ONNX
graph at batch 1, with the package's calibration samples for int8
(``RKNN.build(do_quantization=True, dataset=...)``: the NPU quantizes with
its own scheme, so the QDQ graph is not used), and copied to the box's
``engines/<box-key>/model.<precision>.rknn``. On the board,
``RKNNLite.load_rknn`` + ``init_runtime`` + ``inference`` run it; a batch
of N runs as N calls (static batch 1).

Cannot run here (rknn-toolkit-lite2 ships for aarch64 only, and needs the
NPU); its tests skip with the reason.
"""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import numpy as np

from edgemesh.backends.graph_base import GraphBackend, GraphCapabilities, GraphOptions
from edgemesh.errors import InferenceError, ModelNotFoundError, ShardLoadError, require
from edgemesh.graph.tensors import TensorSpec

TARGET = "rk3588"


class RknnGraph(GraphBackend):
    name = "rknn"
    capabilities = GraphCapabilities(
        precisions=("fp16", "int8"),
        fast_fp16_devices=("npu",),
        devices=("npu",),
        compiled_format="rknn",
        max_batch=16,
    )
    extra = "rknn"
    module = "rknnlite"

    @classmethod
    def available(cls) -> str | None:
        if platform.machine() != "aarch64":
            return f"rknn-toolkit-lite2 runs on aarch64 boards only (this is {platform.machine()})"
        reason = super().available()
        if reason is not None:
            return reason
        if not Path("/dev/dri").exists() and not Path("/sys/kernel/debug/rknpu").exists():
            return "no Rockchip NPU driver (rknpu) on this box"
        return None

    def __init__(
        self,
        graph: Path,
        inputs: list[TensorSpec],
        precision: str,
        options: GraphOptions | None = None,
    ) -> None:
        super().__init__(graph, inputs, precision, options)
        lite = require("rknnlite.api", self.extra)
        if self.options.engine_dir is None:
            raise ShardLoadError("the RKNN backend needs the package's per-box engine folder")
        path = Path(self.options.engine_dir) / f"model.{precision}.rknn"
        if not path.is_file():
            raise ModelNotFoundError(
                f"no compiled RKNN model at '{path}'",
                hint='build it on an x86 host with rknn-toolkit2: python -c "from '
                "edgemesh.backends.graph_rknn import build_rknn; build_rknn(PACKAGE, "
                f"'{precision}', OUT)\" and copy OUT to that path",
            )
        self._rknn = lite.RKNNLite()
        if self._rknn.load_rknn(str(path)) != 0:
            raise ShardLoadError(f"RKNNLite.load_rknn refused '{path}'")
        if self._rknn.init_runtime(core_mask=lite.RKNNLite.NPU_CORE_AUTO) != 0:
            raise ShardLoadError(f"RKNNLite.init_runtime failed for '{path}'")
        self.compiled_from = "cache"
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [s.name for s in self.inputs]
        rows = next(iter(feeds.values())).shape[0]
        with self._lock:
            if self._rknn is None:
                raise InferenceError("the RKNN graph backend is closed")
            per_row = []
            for i in range(rows):  # static batch 1 on the NPU
                out = self._rknn.inference(inputs=[feeds[n][i : i + 1] for n in names])
                if out is None:
                    raise InferenceError("RKNNLite.inference returned nothing")
                per_row.append(out)
        return [np.concatenate([r[k] for r in per_row]) for k in range(len(per_row[0]))]

    def close(self) -> None:
        with self._lock:
            if self._rknn is not None:
                self._rknn.release()
            self._rknn = None


def build_rknn(package: Path | str, precision: str, out: Path | str, target: str = TARGET) -> Path:
    """Build ``out`` (.rknn) from a graph package with rknn-toolkit2 (x86 host).

    int8 calibrates with ``package/calibration/*.npy`` when the import kept
    samples there, else it refuses (the NPU's int8 needs real samples)."""
    from edgemesh.errors import CalibrationError
    from edgemesh.graph.manifest import GraphManifest

    rknn_api = require("rknn.api", "rknn")
    package = Path(package)
    manifest = GraphManifest.load(package)
    spec = manifest.inputs[0]
    rknn = rknn_api.RKNN()
    rknn.config(target_platform=target)
    shapes = [list(s.concrete(1)) for s in manifest.inputs]
    if (
        rknn.load_onnx(
            model=str(package / "model.fp32.onnx"), inputs=[spec.name], input_size_list=shapes
        )
        != 0
    ):
        raise ShardLoadError("rknn-toolkit2 could not load the ONNX graph")
    dataset = None
    if precision == "int8":
        samples = sorted((package / "calibration").glob("*.npy"))
        if not samples:
            raise CalibrationError(
                f"int8 on the NPU needs calibration samples in '{package / 'calibration'}'"
            )
        dataset = package / "calibration" / "dataset.txt"
        dataset.write_text("\n".join(str(p) for p in samples) + "\n")
    if rknn.build(do_quantization=precision == "int8", dataset=str(dataset) if dataset else None):
        raise ShardLoadError("rknn-toolkit2 build failed")
    out = Path(out)
    if rknn.export_rknn(str(out)) != 0:
        raise ShardLoadError(f"rknn-toolkit2 could not write '{out}'")
    rknn.release()
    return out


GRAPH_BACKEND = RknnGraph
