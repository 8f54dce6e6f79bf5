"""Which backends a box calls for, which are installed, and its precision.

Backends, best first (names as in ``edgemesh.backends.registry``):

1. ``tensorrt``   an NVIDIA GPU or a Jetson
2. ``rknn``       a Rockchip NPU
3. ``openvino``   an Intel x86 CPU (``GenuineIntel``)
4. ``llamacpp``   an ARM CPU
5. ``onnxruntime`` always, the portable fallback

Default weight precision, first rule that matches:

1. memory limit < 4 GiB                         -> ``int4`` (memory-poor)
2. an NVIDIA GPU or Jetson (fast fp16 tensor cores) -> ``fp16``
3. a Rockchip NPU (its int8 rate is several times its fp16 rate) -> ``int8``
4. CPU only, memory limit >= 8 GiB and int8 dot-product instructions
   (x86 ``avx512_vnni``/``avx_vnni``/``amx_int8``, ARM ``asimddp``/``i8mm``)
   -> ``int8`` (near-lossless, and the dot products keep it compute-cheap)
5. otherwise                                    -> ``int4`` (decode on a CPU
   is bound by memory bandwidth, so the smallest weights decode fastest)

Intel and AMD GPUs are listed by the fingerprint but do not change the
precision: no backend in the list above drives them by default.
"""

from __future__ import annotations

import importlib.util

from edgemesh.fingerprint.model import Accelerator

GIB = 1024**3
MEMORY_POOR_BYTES = 4 * GIB
INT8_MIN_BYTES = 8 * GIB

# backend name -> the module whose presence means it can be imported.
RUNTIME_MODULES: dict[str, str] = {
    "tensorrt": "tensorrt",
    "rknn": "rknnlite",
    "openvino": "openvino",
    "llamacpp": "llama_cpp",
    "onnxruntime": "onnxruntime",
}
_FP16_ACCELERATORS = {"nvidia-gpu", "jetson-gpu"}
_INT8_DOT = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}


def backends_for(arch: str, cpu_vendor: str | None, accelerators: list[Accelerator]) -> list[str]:
    """The backends this hardware calls for, best first."""
    kinds = {a.kind for a in accelerators}
    order: list[str] = []
    if kinds & _FP16_ACCELERATORS:
        order.append("tensorrt")
    if "rockchip-npu" in kinds:
        order.append("rknn")
    if arch in ("x86_64", "i686") and cpu_vendor == "GenuineIntel":
        order.append("openvino")
    if arch.startswith(("aarch64", "arm")):
        order.append("llamacpp")
    order.append("onnxruntime")
    return order


def installed(backends: list[str]) -> list[str]:
    """The subset of ``backends`` whose runtime module is importable here.

    Uses ``find_spec`` only: nothing is imported, so this stays cheap.
    """
    found = []
    for name in backends:
        module = RUNTIME_MODULES.get(name)
        try:
            present = module is not None and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            # A broken half-installed package raises here; it will not import either.
            present = False
        if present:
            found.append(name)
    return found


def default_precision(
    accelerators: list[Accelerator], features: tuple[str, ...], memory_limit_bytes: int
) -> str:
    """The default weight precision; the rule is in this module's docstring."""
    kinds = {a.kind for a in accelerators}
    if memory_limit_bytes < MEMORY_POOR_BYTES:
        return "int4"
    if kinds & _FP16_ACCELERATORS:
        return "fp16"
    if "rockchip-npu" in kinds:
        return "int8"
    if memory_limit_bytes >= INT8_MIN_BYTES and _INT8_DOT & set(features):
        return "int8"
    return "int4"
