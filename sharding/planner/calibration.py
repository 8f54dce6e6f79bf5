"""A box's decode timings measured on the real model: the planner's calibration.

The roofline of ``costs.py`` prices a layer from matmul micro-benchmarks. A
real layer is some thirty operators, each with its own dispatch cost, and a
runtime may spin threads against a CPU quota; on this project's test host
that left real stages 1.2x to 4x slower than their roofline (docs/PLANNER.md).
So a box can time the model it will serve (``edgemesh info --measure
--calibrate PKG``) and the planner prices that box's stages from the
timings instead, as Petals does with its measured block throughput.

A stage ``[j, k)`` of ``L`` layers then costs, per decode token::

    overhead_ms + sum(layer_ms * w_i for i in [j, k))
                + embed_ms if j == 0 + head_ms if k == L

where ``w_i`` is layer ``i``'s roofline at the plan's mean position divided
by the mean roofline of the timed layers at the timed position: layers that
differ (wider MLPs, global vs local attention) or a longer context scale
the measured figure the way the roofline says they should.

JSON, as ``edgemesh info --json --measure --calibrate PKG`` prints it under
``profile.calibration`` (a list: one entry per model)::

    {"model": "Gemma 3 270m", "digest": "ecc41e789bc5f66c", "position": 128,
     "threads": 1, "layers": [1, 9],
     "timings": {"onnxruntime/int8": {"layer_ms": 0.9, "overhead_ms": 0.3,
                                      "embed_ms": 0.4, "head_ms": 21.0}}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgemesh.backends.base import PRECISIONS
from edgemesh.errors import ConfigError


@dataclass(frozen=True)
class StageTiming:
    """Measured ms per decode token of one (backend, precision), one sequence."""

    layer_ms: float
    """One decoder layer (the mean of the timed layers)."""
    overhead_ms: float
    """Once per stage: feeding inputs, the runtime call, reading the output."""
    embed_ms: float
    """Added when a stage starts at layer 0 (token ids -> hidden)."""
    head_ms: float
    """Added when a stage ends at the last layer (final norm + LM head)."""

    def to_dict(self) -> dict[str, float]:
        return {
            "layer_ms": round(self.layer_ms, 4),
            "overhead_ms": round(self.overhead_ms, 4),
            "embed_ms": round(self.embed_ms, 4),
            "head_ms": round(self.head_ms, 4),
        }

    @classmethod
    def from_dict(cls, where: str, data: Any) -> StageTiming:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be an object with layer_ms, overhead_ms, ...")
        values = []
        for name in ("layer_ms", "overhead_ms", "embed_ms", "head_ms"):
            value = data.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{where}: {name} must be a number >= 0, got {value!r}")
            values.append(float(value))
        if values[0] <= 0:
            raise ConfigError(f"{where}: layer_ms must be > 0, got {values[0]}")
        return cls(*values)


@dataclass(frozen=True)
class Calibration:
    """One model's timings on one box, keyed ``"<backend>/<precision>"``."""

    model: str
    digest: str
    """``Manifest.digest()`` of the package that was timed."""
    position: int
    """KV-cache length (tokens) during the timed decode steps."""
    threads: int
    layers: tuple[int, int]
    """The ``[start, stop)`` whose layers gave ``layer_ms``."""
    timings: dict[str, StageTiming] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """``"<backend>/<precision>"`` -> why it was not timed."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "digest": self.digest,
            "position": self.position,
            "threads": self.threads,
            "layers": list(self.layers),
            "timings": {k: v.to_dict() for k, v in sorted(self.timings.items())},
            "skipped": dict(sorted(self.skipped.items())),
            "seconds": round(self.seconds, 1),
        }

    @classmethod
    def from_dict(cls, box_id: str, data: Any) -> Calibration:
        where = f"box '{box_id}': calibration"
        if not isinstance(data, dict):
            raise ConfigError(f"{where} entries must be objects, got {type(data).__name__}")
        digest, position = data.get("digest"), data.get("position")
        if not isinstance(digest, str) or not digest:
            raise ConfigError(f"{where} has no 'digest' (the model package's Manifest.digest())")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ConfigError(f"{where} '{digest}': position must be an integer >= 0")
        layers = data.get("layers") or [0, 0]
        if not (isinstance(layers, list) and len(layers) == 2):
            raise ConfigError(f"{where} '{digest}': layers must be [start, stop)")
        raw = data.get("timings")
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} '{digest}': timings must map '<backend>/<precision>'")
        timings = {}
        for key, value in sorted(raw.items()):
            backend, sep, precision = str(key).partition("/")
            if not sep or not backend or precision not in PRECISIONS:
                raise ConfigError(f"{where} '{digest}': key '{key}' is not '<backend>/<precision>'")
            timings[key] = StageTiming.from_dict(f"{where} '{digest}' {key}", value)
        return cls(
            model=str(data.get("model", "")),
            digest=digest,
            position=position,
            threads=int(data.get("threads", 0)),
            layers=(int(layers[0]), int(layers[1])),
            timings=timings,
            skipped={str(k): str(v) for k, v in (data.get("skipped") or {}).items()},
            seconds=float(data.get("seconds", 0.0)),
        )


def parse_calibrations(box_id: str, raw: Any) -> tuple[Calibration, ...]:
    """A profile's ``calibration``: a list of entries, one entry, or absent."""
    if raw is None:
        return ()
    entries = raw if isinstance(raw, list) else [raw]
    found = [Calibration.from_dict(box_id, entry) for entry in entries]
    digests = [c.digest for c in found]
    if len(set(digests)) != len(digests):
        raise ConfigError(f"box '{box_id}': two calibrations for the same model digest")
    return tuple(sorted(found, key=lambda c: c.digest))
