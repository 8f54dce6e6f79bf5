"""The planner's view of a box and of the links between boxes.

A box is read from what ``edgemesh info --json --measure`` prints (its
``profile`` key) or from a profile written by hand, so users can plan for
hardware they do not own yet::

    {"id": "pi5", "memory_limit_bytes": 8000000000,
     "backends": ["onnxruntime"],                      # best first
     "compute": {"onnxruntime/fp32": {"gflops": 25, "bandwidth_gbps": 9}},
     "link_gbps": 0.94, "link_latency_ms": 0.3}          # optional

plus, optionally, ``calibration``: timings of a real model on the box
(``calibration.py``), which replace the roofline for that model.

Units: ``gflops`` is 1e9 FLOP/s, a compute entry's ``bandwidth_gbps`` is
weight *bytes* streamed per second (1e9 B/s, as memory bandwidth is quoted),
while a link's ``gbps`` is 1e9 *bits* per second (as network links are
quoted). Memory is in bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.backends.base import PRECISIONS
from edgemesh.errors import ConfigError
from edgemesh.sharding.planner.calibration import Calibration, parse_calibrations

DEFAULT_LINK_GBPS = 1.0
"""A link nobody measured is taken to be gigabit Ethernet..."""
DEFAULT_LINK_LATENCY_MS = 0.5
"""...with half a millisecond per hop (a switch and two TCP stacks)."""
REFERENCE_BACKEND = "cpu"
"""``edgemesh info --measure`` adds ``cpu/<precision>`` numpy figures; they are
a floor for listed backends that could not be micro-benchmarked, never a
backend of their own (unless a profile lists ``cpu`` in ``backends``)."""


@dataclass(frozen=True)
class ComputeRate:
    """Measured speed of one backend at one precision on one box."""

    gflops: float
    bandwidth_gbps: float
    memory_limit_bytes: int | None = None
    """Device memory for this backend (a discrete GPU's VRAM); None: the box's."""
    derived_from: str | None = None
    """Set when copied from the ``cpu`` reference figure rather than measured."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"gflops": self.gflops, "bandwidth_gbps": self.bandwidth_gbps}
        if self.memory_limit_bytes is not None:
            d["memory_limit_bytes"] = self.memory_limit_bytes
        if self.derived_from is not None:
            d["derived_from"] = self.derived_from
        return d


@dataclass(frozen=True)
class BoxProfile:
    """One box as the planner sees it. ``compute`` keys are ``"<backend>/<precision>"``."""

    id: str
    memory_limit_bytes: int
    backends: tuple[str, ...]
    compute: dict[str, ComputeRate] = field(default_factory=dict)
    link_gbps: float | None = None
    link_latency_ms: float | None = None
    default_precision: str | None = None
    """The fingerprint's default precision; used by the baselines."""
    calibrations: tuple[Calibration, ...] = ()
    """Timings measured on real models (``calibration.py``), by model digest."""

    def calibration_for(self, digest: str) -> Calibration | None:
        """This box's timings of the model with ``Manifest.digest() == digest``."""
        return next((c for c in self.calibrations if c.digest == digest), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "memory_limit_bytes": self.memory_limit_bytes,
            "backends": list(self.backends),
            "compute": {k: v.to_dict() for k, v in self.compute.items()},
            "link_gbps": self.link_gbps,
            "link_latency_ms": self.link_latency_ms,
            "default_precision": self.default_precision,
            "calibration": [c.to_dict() for c in self.calibrations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoxProfile:
        """Read an ``edgemesh info --json --measure`` dict or a hand-written profile."""
        if not isinstance(data, dict):
            raise ConfigError(f"a box must be a JSON object, got {type(data).__name__}")
        src = dict(data)
        if isinstance(data.get("profile"), dict):
            # The fingerprint's planner view; top-level keys fill what it lacks.
            src = {**{k: v for k, v in data.items() if k != "profile"}, **data["profile"]}
            if src.get("memory_limit_bytes") is None and isinstance(data.get("memory"), dict):
                src["memory_limit_bytes"] = data["memory"].get("limit_bytes")
        box_id = src.get("id")
        if not isinstance(box_id, str) or not box_id:
            raise ConfigError(f"a box has no 'id' (keys: {', '.join(sorted(src)) or 'none'})")
        limit = src.get("memory_limit_bytes")
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit <= 0:
            raise ConfigError(f"box '{box_id}': memory_limit_bytes must be > 0, got {limit!r}")
        backends = src.get("backends") or []
        if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
            raise ConfigError(f"box '{box_id}': backends must be a list of names, best first")
        compute = _parse_compute(box_id, src.get("compute") or {})
        default = src.get("default_precision") or src.get("precision")
        return cls(
            id=box_id,
            memory_limit_bytes=int(limit),
            backends=tuple(backends),
            compute=_fill_from_reference(tuple(backends), compute),
            link_gbps=_optional_positive(box_id, "link_gbps", src.get("link_gbps")),
            link_latency_ms=_optional_nonneg(box_id, "link_latency_ms", src.get("link_latency_ms")),
            default_precision=default if default in PRECISIONS else None,
            calibrations=parse_calibrations(box_id, src.get("calibration")),
        )

    def runnable(self) -> list[tuple[str, str, ComputeRate]]:
        """(backend, precision, rate) this box can run, best backend first.

        A compute key whose backend is not in ``backends`` (e.g. the ``cpu``
        reference) is not runnable; with no ``backends`` listed, every key is.
        """
        order = {name: i for i, name in enumerate(self.backends)}
        found = []
        for key, rate in self.compute.items():
            backend, _, precision = key.partition("/")
            if self.backends and backend not in order:
                continue
            found.append((backend, precision, rate))
        found.sort(key=lambda t: (order.get(t[0], len(order)), t[0], PRECISIONS.index(t[1])))
        return found


def _parse_compute(box_id: str, raw: Any) -> dict[str, ComputeRate]:
    if not isinstance(raw, dict):
        raise ConfigError(f"box '{box_id}': compute must map '<backend>/<precision>' to figures")
    out: dict[str, ComputeRate] = {}
    for key, fig in sorted(raw.items()):
        backend, sep, precision = str(key).partition("/")
        if not sep or not backend:
            raise ConfigError(f"box '{box_id}': compute key '{key}' is not '<backend>/<precision>'")
        if precision not in PRECISIONS:
            raise ConfigError(
                f"box '{box_id}': compute '{key}' has unknown precision '{precision}' "
                f"(expected one of {', '.join(PRECISIONS)})"
            )
        if not isinstance(fig, dict):
            raise ConfigError(f"box '{box_id}': compute '{key}' must be an object")
        try:
            gflops = float(fig["gflops"])
            bandwidth = float(fig["bandwidth_gbps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"box '{box_id}': compute '{key}' needs numeric gflops and bandwidth_gbps"
            ) from exc
        if gflops <= 0 or bandwidth <= 0:
            raise ConfigError(
                f"box '{box_id}': compute '{key}' has gflops={gflops} and "
                f"bandwidth_gbps={bandwidth}; both must be > 0"
            )
        mem = fig.get("memory_limit_bytes")
        out[key] = ComputeRate(
            gflops, bandwidth, int(mem) if mem else None, fig.get("derived_from")
        )
    return out


def _fill_from_reference(
    backends: tuple[str, ...], compute: dict[str, ComputeRate]
) -> dict[str, ComputeRate]:
    """Give a listed backend with no figures of its own the ``cpu`` reference figures.

    llama.cpp, TensorRT and RKNN expose no matmul to benchmark; the numpy
    reference on the same box is a floor for them, better than leaving the
    box unused. Every precision is derived, from ``cpu/<precision>`` when
    measured, else from ``cpu/fp32``: ``bandwidth_gbps`` counts weight
    *bytes* streamed, which does not depend on how many bits each weight
    has, and fp32 numpy FLOP/s is a floor for the quantised kernels.
    """
    measured = {key.partition("/")[0] for key in compute}
    reference = {
        key.partition("/")[2]: rate
        for key, rate in compute.items()
        if key.partition("/")[0] == REFERENCE_BACKEND
    }
    base = "fp32" if "fp32" in reference else next(iter(reference), None)
    filled = dict(compute)
    for backend in backends:
        if base is None or backend in measured or backend == REFERENCE_BACKEND:
            continue
        for precision in PRECISIONS:
            source = precision if precision in reference else base
            rate = reference[source]
            filled[f"{backend}/{precision}"] = ComputeRate(
                rate.gflops,
                rate.bandwidth_gbps,
                rate.memory_limit_bytes,
                f"{REFERENCE_BACKEND}/{source}",
            )
    return dict(sorted(filled.items()))


def _optional_positive(box_id: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"box '{box_id}': {name} must be > 0, got {value!r}")
    return float(value)


def _optional_nonneg(box_id: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"box '{box_id}': {name} must be >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Link:
    """A measured link between two boxes (symmetric)."""

    a: str
    b: str
    gbps: float
    latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "gbps": self.gbps, "latency_ms": self.latency_ms}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Link:
        try:
            link = cls(
                str(data["a"]),
                str(data["b"]),
                float(data["gbps"]),
                float(data.get("latency_ms", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a link needs 'a', 'b' and numeric 'gbps': {data!r}") from exc
        if link.gbps <= 0 or link.latency_ms < 0:
            raise ConfigError(
                f"link {link.a}-{link.b}: gbps must be > 0 and latency_ms >= 0, "
                f"got {link.gbps} and {link.latency_ms}"
            )
        return link


def resolve_link(
    a: BoxProfile, b: BoxProfile, links: dict[frozenset[str], Link]
) -> tuple[float, float]:
    """(gbps, latency_ms) between two boxes.

    A measured link wins. Otherwise the boxes' own ``link_gbps`` figures meet
    at the slower one and the larger ``link_latency_ms`` counts (each box's
    figure is its own path to the switch; summing would count the switch
    twice). Unknown figures take the defaults above.
    """
    measured = links.get(frozenset((a.id, b.id)))
    if measured is not None:
        return measured.gbps, measured.latency_ms
    speeds = [g for g in (a.link_gbps, b.link_gbps) if g is not None]
    latencies = [x for x in (a.link_latency_ms, b.link_latency_ms) if x is not None]
    return (
        min(speeds) if speeds else DEFAULT_LINK_GBPS,
        max(latencies) if latencies else DEFAULT_LINK_LATENCY_MS,
    )


def as_boxes(boxes: Sequence[BoxProfile] | Sequence[dict[str, Any]]) -> list[BoxProfile]:
    """Accept profiles or their dicts (a fingerprint fresh off the mesh)."""
    return [b if isinstance(b, BoxProfile) else BoxProfile.from_dict(b) for b in boxes]


def as_links(links: Sequence[Link] | Sequence[dict[str, Any]] | None) -> list[Link]:
    return [x if isinstance(x, Link) else Link.from_dict(x) for x in links or []]


def index_links(links: list[Link] | None) -> dict[frozenset[str], Link]:
    """Links keyed by their unordered pair of box ids (the last one given wins)."""
    return {frozenset((link.a, link.b)): link for link in links or []}


def parse_boxes(data: Any) -> tuple[list[BoxProfile], list[Link]]:
    """Boxes and links from a JSON list of boxes, or ``{"boxes": [...], "links": [...]}``."""
    if isinstance(data, dict) and "boxes" in data:
        raw_boxes, raw_links = data["boxes"], data.get("links") or []
    elif isinstance(data, dict) and ("id" in data or "profile" in data):
        raw_boxes, raw_links = [data], []
    elif isinstance(data, list):
        raw_boxes, raw_links = data, []
    else:
        raise ConfigError(
            "a boxes file holds a list of boxes or an object with 'boxes' and 'links'"
        )
    if not isinstance(raw_boxes, list) or not isinstance(raw_links, list):
        raise ConfigError("'boxes' and 'links' must be JSON lists")
    boxes = [BoxProfile.from_dict(b) for b in raw_boxes]
    seen: set[str] = set()
    for box in boxes:
        if box.id in seen:
            raise ConfigError(f"box id '{box.id}' appears twice")
        seen.add(box.id)
    links = [Link.from_dict(x) for x in raw_links]
    for link in links:
        for end in (link.a, link.b):
            if end not in seen:
                raise ConfigError(
                    f"link {link.a}-{link.b} names box '{end}', which is not in the file",
                    hint=f"boxes: {', '.join(sorted(seen))}",
                )
    return boxes, links


def load_boxes(path: Path) -> tuple[list[BoxProfile], list[Link]]:
    """Read a boxes file (see ``parse_boxes``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no boxes file at '{path}'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'{path}' is not valid JSON: {exc}") from exc
    return parse_boxes(data)
