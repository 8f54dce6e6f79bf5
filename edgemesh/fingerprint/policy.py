"""Which backends a box calls for, which are installed, and its precision.

The backends judge the box themselves: every registered backend, in-tree or
an entry point (``edgemesh.backends.registry``), answers ``suits(box)`` with
a rank or None, and the box's list is the suiting ones, best first. In-tree
(see each backend's ``suits``): ``tensorrt`` on an NVIDIA GPU or a Jetson,
``rknn`` on a Rockchip NPU, ``openvino`` on an Intel x86 CPU, ``llamacpp``
on an ARM CPU, ``onnxruntime`` everywhere (the portable fallback).

Default weight precision, first rule that matches:

1. memory limit < 4 GiB                         -> ``int4`` (memory-poor)
2. the best-ranked backend prefers a precision  -> that one (``tensorrt``:
   ``fp16`` on tensor cores; ``rknn``: ``int8``, its NPU's int8 rate is
   several times its fp16 rate)
3. CPU only, memory limit >= 8 GiB and int8 dot-product instructions
   (x86 ``avx512_vnni``/``avx_vnni``/``amx_int8``, ARM ``asimddp``/``i8mm``)
   -> ``int8`` (near-lossless, and the dot products keep it compute-cheap)
4. otherwise                                    -> ``int4`` (decode on a CPU
   is bound by memory bandwidth, so the smallest weights decode fastest)

Intel and AMD GPUs are listed by the fingerprint but do not change the
precision: no in-tree backend claims them.
"""

from __future__ import annotations

from edgemesh.backends import registry
from edgemesh.backends.base import BoxFacts

GIB = 1024**3
MEMORY_POOR_BYTES = 4 * GIB
INT8_MIN_BYTES = 8 * GIB

_INT8_DOT = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}


def backends_for(box: BoxFacts) -> list[str]:
    """The backends this hardware calls for, best first (each backend's ``suits``)."""
    return registry.ranked(box)


def installed(backends: list[str]) -> list[str]:
    """The subset of ``backends`` whose runtime module is importable here.

    Uses ``find_spec`` only: nothing is imported, so this stays cheap.
    """
    known = registry.all_backends()
    return [name for name in backends if name in known and known[name].installed()]


def default_precision(box: BoxFacts, backends: list[str] | None = None) -> str:
    """The default weight precision; the rule is in this module's docstring.

    ``backends``: the box's list as from ``backends_for`` (computed when None).
    """
    if box.memory_limit_bytes < MEMORY_POOR_BYTES:
        return "int4"
    order = backends_for(box) if backends is None else backends
    preferred = registry.get(order[0]).preferred_precision if order else None
    if preferred is not None:
        return preferred
    if box.memory_limit_bytes >= INT8_MIN_BYTES and _INT8_DOT & set(box.features):
        return "int8"
    return "int4"
