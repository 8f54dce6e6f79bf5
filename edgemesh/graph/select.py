"""Which graph backend and precision a box runs a graph package with.

Backend: the first of the fingerprint's backends (best first, see
``edgemesh.fingerprint.policy``) that has a graph backend usable here;
onnxruntime is the fallback, as on the LLM path.

Precision: the fingerprint's default weight precision (``int4`` counts as
``int8``: graphs have no int4), moved towards fp32 (int8 -> fp16 -> fp32)
until the package has it, the backend runs it natively on the device, and
its measured ``loss`` (``graph.json``) is within ``max_accuracy_loss`` —
the LLM planner's rule and default budget (``PlanOptions.max_accuracy_loss``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from edgemesh.errors import BackendUnavailableError, ConfigError
from edgemesh.graph.manifest import PRECISION_ORDER, GraphManifest

DEFAULT_MAX_ACCURACY_LOSS = 0.10
"""Same default as the LLM path (``sharding.costs.PlanOptions.max_accuracy_loss``)."""


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    device: str
    reason: str


def precision_refusal(
    manifest: GraphManifest, precision: str, max_loss: float, caps: Any, device: str
) -> str | None:
    entry = manifest.precisions.get(precision)
    if entry is None:
        return f"{precision}: not in the package"
    if precision not in caps.precisions:
        return f"{precision}: the backend does not run it"
    if precision == "fp16" and device.partition(":")[0] not in caps.fast_fp16_devices:
        return f"fp16: no native fp16 kernels on {device} (emulated, slower than fp32)"
    if entry.accuracy is None:
        return None if precision == "fp32" else f"{precision}: accuracy not measured"
    if entry.accuracy.loss > max_loss:
        return (
            f"{precision}: accuracy loss {entry.accuracy.loss:.4f} > max_accuracy_loss "
            f"{max_loss:.4f}"
        )
    return None


def choose(
    manifest: GraphManifest,
    *,
    backend: str | None = None,
    precision: str | None = None,
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS,
    fingerprint: dict[str, Any] | None = None,
) -> Choice:
    from edgemesh.backends import registry

    if max_accuracy_loss < 0:
        raise ConfigError(f"max_accuracy_loss must be >= 0, got {max_accuracy_loss}")
    fp = fingerprint
    if fp is None and (backend is None or precision is None):
        from edgemesh.fingerprint import collect

        fp = collect().to_dict()
    why: list[str] = []
    if backend is None:
        assert fp is not None
        refused = []
        for name in dict.fromkeys([*fp["backends"], "onnxruntime"]):
            cls = registry.graph_backends().get(name)
            reason = "no graph backend" if cls is None else cls.available()
            if reason is None:
                backend = name
                break
            refused.append(f"{name}: {reason}")
        if backend is None:
            raise BackendUnavailableError(
                "no graph backend can run here: " + "; ".join(refused),
                hint="pip install 'edgemesh[onnx]'",
            )
        why.append(f"backend from this box's fingerprint {fp['backends']}")
    cls = registry.get_graph(backend)
    reason = cls.available()
    if reason is not None:
        raise BackendUnavailableError(f"graph backend '{backend}' cannot run here: {reason}")
    device = cls.capabilities.devices[0]
    if precision is not None:
        refusal = precision_refusal(manifest, precision, float("inf"), cls.capabilities, device)
        if refusal is not None and not refusal.startswith("fp16: no native"):
            raise ConfigError(
                f"cannot serve '{manifest.name}' at {precision}: {refusal}",
                hint=f"the package has {', '.join(manifest.precisions)}",
            )
        return Choice(backend, precision, device, "; ".join([*why, "precision from options"]))
    assert fp is not None
    wanted = "int8" if fp["precision"] in ("int4", "int8") else fp["precision"]
    if wanted not in PRECISION_ORDER:
        wanted = "fp32"
    refusals = []
    for p in PRECISION_ORDER[PRECISION_ORDER.index(wanted) :]:
        refusal = precision_refusal(manifest, p, max_accuracy_loss, cls.capabilities, device)
        if refusal is None:
            said = f"fingerprint says {fp['precision']}"
            note = f" ({said}; {'; '.join(refusals)})" if refusals else ""
            why.append(f"precision {p}{note}")
            return Choice(backend, p, device, "; ".join(why))
        refusals.append(refusal)
    raise ConfigError(
        f"no precision of '{manifest.name}' can be served: {'; '.join(refusals)}",
        hint="raise --max-accuracy-loss or pass --precision fp32",
    )


def box_key(backend_cls: Any, device: str, fingerprint: dict[str, Any] | None = None) -> str:
    """The compiled-artifact cache key of this box for ``backend_cls``:
    engine version + CPU model/features + accelerators, so a box with other
    hardware or another engine release compiles afresh."""
    if fingerprint is None:
        from edgemesh.fingerprint import collect

        fingerprint = collect().to_dict()
    cpu = fingerprint.get("cpu", {})
    facts = {
        "backend": backend_cls.name,
        "version": backend_cls.runtime_version(),
        "device": device,
        "arch": fingerprint.get("arch"),
        "cpu": cpu.get("model"),
        "features": sorted(cpu.get("features", [])),
        "accelerators": [
            (a.get("kind"), a.get("name")) for a in fingerprint.get("accelerators", [])
        ],
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{backend_cls.name}-{digest}"
