"""The cost model: how long a stage takes per token, and how much memory it needs.

Every figure the planner, the baselines and the exhaustive test compare comes
from here, so they are judged by the same rules:

* **Time per token** of a stage = Σ over its layers of the roofline
  ``max(FLOPs / gflops, bytes read / bandwidth)`` (decode is memory-bound on
  edge boxes, compute-bound on big GPUs; the max covers both), plus the
  embedding row lookup on the first stage and the LM head on the last, plus
  sending the hidden state over its outgoing cut
  (``hidden_size * 2`` bytes, fp16 on the wire, / link speed + latency).
  Attention FLOPs and KV-cache reads are taken at half the context (the
  mean position over a full-length sequence). No batching credit: one token
  of one sequence, which errs on the slow side.
  A box that timed this very model (``calibration.py``, matched by
  ``Manifest.digest()``) is priced from its timings instead: a fixed
  per-stage cost, plus each layer's measured time scaled by its roofline,
  plus the measured embedding and head.
* **Memory** of a stage = weights at its precision (+ embedding / head) +
  KV cache for ``context * sequences`` tokens + a fixed runtime overhead,
  and must be ≤ the memory limit × (1 - headroom). The manifest gives KV
  bytes for an fp32 cache; a stage at fp16 keeps an fp16 cache (× 0.5),
  every other precision an fp32 one (weight-only int8/int4 kernels keep
  fp32 activations on the CPU runtimes).
* **Precisions** allowed: those whose measured relative perplexity increase
  (``manifest.accuracy``) is ≤ ``max_accuracy_loss``. Unmeasured (None or
  missing) counts as allowed for fp32 and fp16 only: they are the reference
  and a lossless-in-practice cast; int8/int4 must be measured, unless the
  budget is unbounded (``max_accuracy_loss=inf``, ``--max-accuracy-loss
  inf``): then the user has accepted any loss, measured or not. ``convert``
  leaves int8/int4 unmeasured when its quality step could not run (a
  tokenizer that cannot represent the bundled text, ``--no-eval``);
  ``unmeasured_note`` says so in the CLI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgemesh.backends.base import PRECISIONS
from edgemesh.errors import ConfigError
from edgemesh.sharding.package.manifest import LayerCost, Manifest
from edgemesh.sharding.planner.boxes import BoxProfile, ComputeRate, Link, index_links, resolve_link
from edgemesh.sharding.planner.calibration import Calibration, StageTiming

OBJECTIVES = ("throughput", "latency")
RUNTIME_OVERHEAD_BYTES = 150_000_000
DEFAULT_CONTEXT_CAP = 4096
WIRE_BYTES_PER_VALUE = 2
KV_SCALE = {"fp32": 1.0, "fp16": 0.5, "int8": 1.0, "int4": 1.0}
UNMEASURED_ALLOWED = ("fp32", "fp16")
INF = float("inf")


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of a plan. ``context=None`` means the model's, capped at 4096."""

    objective: str = "throughput"
    context: int | None = None
    sequences: int = 4
    max_accuracy_loss: float = 0.10
    headroom: float = 0.10
    """Fraction of each memory limit kept free (allocator slack, the OS, spikes)."""
    runtime_overhead_bytes: int = RUNTIME_OVERHEAD_BYTES
    replan_tolerance: float = 0.05
    """A re-plan may be this much slower than the best plan if it moves fewer layers."""
    prefer_accuracy: bool = True
    """Throughput only: a stage with time to spare takes the most accurate
    precision that keeps it within the bottleneck."""
    whole_model_only: tuple[str, ...] = ()
    """Backends that run only ``[0, num_layers)`` (``Capabilities.partial_ranges``)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"unknown objective '{self.objective}', expected one of {', '.join(OBJECTIVES)}"
            )
        if self.context is not None and self.context < 1:
            raise ConfigError(f"context must be >= 1 token, got {self.context}")
        if self.sequences < 1:
            raise ConfigError(f"sequences must be >= 1, got {self.sequences}")
        if self.max_accuracy_loss < 0:
            raise ConfigError(f"max_accuracy_loss must be >= 0, got {self.max_accuracy_loss}")
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.runtime_overhead_bytes < 0 or self.replan_tolerance < 0:
            raise ConfigError("runtime_overhead_bytes and replan_tolerance must be >= 0")

    def context_for(self, manifest: Manifest) -> int:
        if self.context is not None:
            return self.context
        return min(manifest.context_length, DEFAULT_CONTEXT_CAP)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["whole_model_only"] = list(self.whole_model_only)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanOptions:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "whole_model_only" in known:
            known["whole_model_only"] = tuple(known["whole_model_only"])
        return cls(**known)


def precision_refusal(manifest: Manifest, precision: str, max_loss: float) -> str | None:
    """Why ``precision`` may not be used for this model, or None if it may."""
    if any(precision not in layer.weight_bytes for layer in manifest.layers):
        return f"{precision}: the model has no {precision} weights"
    loss = manifest.accuracy.get(precision)
    if loss is None:
        if precision in UNMEASURED_ALLOWED or max_loss == INF:
            return None
        return (
            f"{precision}: accuracy not measured (only fp32/fp16 may be unmeasured; "
            "--max-accuracy-loss inf allows it)"
        )
    if loss > max_loss:
        return f"{precision}: accuracy loss {loss:.3f} > max_accuracy_loss {max_loss:.3f}"
    return None


def unmeasured_precisions(manifest: Manifest) -> list[str]:
    """The package's precisions the planner refuses for want of a measurement."""
    return [
        p
        for p in PRECISIONS
        if p not in UNMEASURED_ALLOWED
        and all(p in layer.weight_bytes for layer in manifest.layers)
        and manifest.accuracy.get(p) is None
    ]


def unmeasured_note(manifest: Manifest, max_loss: float | None = None) -> str | None:
    """One line for the CLI when some of the package's precisions have no
    measured accuracy: which, why (from ``convert``), and what the planner
    then allows. None when everything is measured (or the budget is unbounded)."""
    missing = unmeasured_precisions(manifest)
    if not missing or max_loss == INF:
        return None
    why = (manifest.extra.get("perplexity") or {}).get("reason") or "no measurement recorded"
    budget = PlanOptions.max_accuracy_loss if max_loss is None else max_loss
    allowed = [
        p
        for p in PRECISIONS
        if p not in missing and precision_refusal(manifest, p, budget) is None
    ]
    return (
        f"accuracy not measured for {', '.join(missing)} ({why}): the planner uses only "
        f"{'/'.join(allowed) or 'no precision'} for '{manifest.name}'; "
        "--max-accuracy-loss inf allows the unmeasured ones"
    )


def weight_at(cost: LayerCost, precision: str) -> int:
    """Bytes of a block at ``precision``; embedding/head fall back to the next
    more accurate precision the manifest lists (runtimes often keep them wider)."""
    start = PRECISIONS.index(precision)
    for p in reversed(PRECISIONS[: start + 1]):
        if p in cost.weight_bytes:
            return int(cost.weight_bytes[p])
    if cost.weight_bytes:
        return int(max(cost.weight_bytes.values()))
    return 0


@dataclass
class Option:
    """One (backend, precision) a box may run, with its stage cost tables.

    ``time[j, k]`` (ms per token, link excluded) and ``memory[j, k]`` (bytes)
    are for the stage ``[j, k)``; ``time`` is inf where ``k <= j`` or the
    stage does not fit (``feasible`` False).
    """

    backend: str
    precision: str
    rate: ComputeRate
    limit_bytes: int
    usable_bytes: float
    time: np.ndarray  # [L+1, L+1] float64 ms
    memory: np.ndarray  # [L+1, L+1] float64 bytes
    feasible: np.ndarray  # [L+1, L+1] bool
    source: str = "roofline"
    """``"calibrated"`` when ``time`` comes from the box's timings of this model."""

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"


@dataclass
class BoxCosts:
    box: BoxProfile
    options: list[Option]
    refused: list[str]
    """Why a compute entry of the box cannot be used for this model."""


class CostModel:
    """Stage costs of one model on a set of boxes, boxes sorted by id.

    Sorting makes the plan independent of the order the boxes were given in
    (determinism), and gives every tie a fixed winner.
    """

    def __init__(
        self,
        manifest: Manifest,
        boxes: list[BoxProfile],
        links: list[Link] | None = None,
        options: PlanOptions | None = None,
    ) -> None:
        self.manifest = manifest
        self.options = options or PlanOptions()
        self.boxes = sorted(boxes, key=lambda b: b.id)
        if len({b.id for b in self.boxes}) != len(self.boxes):
            raise ConfigError("two boxes share an id")
        self.num_layers = manifest.num_layers
        if self.num_layers != len(manifest.layers) or self.num_layers < 1:
            raise ConfigError(
                f"manifest '{manifest.name}' says {manifest.num_layers} layers "
                f"but lists costs for {len(manifest.layers)}"
            )
        self.context = self.options.context_for(manifest)
        self.sequences = self.options.sequences
        self.wire_bytes = manifest.hidden_size * WIRE_BYTES_PER_VALUE
        self.digest = manifest.digest()
        self.refused_precisions = {
            p: r
            for p in PRECISIONS
            if (r := precision_refusal(manifest, p, self.options.max_accuracy_loss))
        }
        self.costs = [self._box_costs(box) for box in self.boxes]
        table = index_links(links)
        n = len(self.boxes)
        self.link_ms = np.zeros((n, n))
        self.link_figures: dict[tuple[int, int], tuple[float, float]] = {}
        for b in range(n):
            for c in range(n):
                if b != c:
                    gbps, latency = resolve_link(self.boxes[b], self.boxes[c], table)
                    self.link_figures[(b, c)] = (gbps, latency)
                    self.link_ms[b, c] = self.wire_bytes * 8 / (gbps * 1e9) * 1e3 + latency

    def by_memory(self) -> list[int]:
        """Box indices, most memory first, then by id: the order the baselines
        use, and the one searched beyond ``EXACT_MAX_BOXES`` (so the plan is
        never worse than the baselines there either)."""
        return sorted(range(len(self.boxes)), key=lambda b: (-self.boxes[b].memory_limit_bytes, b))

    def index(self, box_id: str) -> int:
        for i, box in enumerate(self.boxes):
            if box.id == box_id:
                return i
        raise KeyError(box_id)

    # -- per-layer figures ---------------------------------------------------

    def kv_bytes(self, precision: str) -> np.ndarray:
        """KV-cache bytes each layer holds for ``context * sequences`` tokens."""
        per_token = np.array([c.kv_bytes_per_token for c in self.manifest.layers], dtype=float)
        return per_token * KV_SCALE[precision] * self.context * self.sequences

    def layer_ms(
        self, rate: ComputeRate, precision: str, position: float | None = None
    ) -> np.ndarray:
        """Roofline ms per token of each layer at one (backend, precision), with
        ``position`` tokens in the cache (default: half the context)."""
        mid = self.context / 2 if position is None else position
        flops = np.array(
            [
                c.flops_per_token + c.attn_flops_per_token_per_ctx * mid
                for c in self.manifest.layers
            ],
            dtype=float,
        )
        read = np.array(
            [
                c.weight_bytes[precision] + c.kv_bytes_per_token * KV_SCALE[precision] * mid
                for c in self.manifest.layers
            ],
            dtype=float,
        )
        return np.maximum(flops / (rate.gflops * 1e9), read / (rate.bandwidth_gbps * 1e9)) * 1e3

    def calibrated_layer_ms(
        self, rate: ComputeRate, precision: str, cal: Calibration, timing: StageTiming
    ) -> np.ndarray:
        """Each layer's measured ms per token: the timed layers' mean, scaled by
        the layer's roofline at half the context over theirs at the timed position."""
        here = self.layer_ms(rate, precision)
        timed = self.layer_ms(rate, precision, cal.position)
        start, stop = cal.layers
        if not 0 <= start < stop <= self.num_layers:
            start, stop = 0, self.num_layers
        reference = float(timed[start:stop].mean())
        return timing.layer_ms * here / reference

    def embed_ms(self, rate: ComputeRate, precision: str) -> float:
        emb = self.manifest.embedding
        row = weight_at(emb, precision) / max(1, self.manifest.vocab_size)  # one row is read
        return (
            max(emb.flops_per_token / (rate.gflops * 1e9), row / (rate.bandwidth_gbps * 1e9)) * 1e3
        )

    def head_ms(self, rate: ComputeRate, precision: str) -> float:
        head = self.manifest.head
        return (
            max(
                head.flops_per_token / (rate.gflops * 1e9),
                weight_at(head, precision) / (rate.bandwidth_gbps * 1e9),
            )
            * 1e3
        )

    def memory_breakdown(self, b: int, o: int, start: int, stop: int) -> dict[str, int]:
        """Bytes of the stage ``[start, stop)`` on box ``b`` with option ``o``, by kind."""
        p = self.costs[b].options[o].precision
        layers = self.manifest.layers[start:stop]
        weights = sum(int(c.weight_bytes[p]) for c in layers)
        if start == 0:
            weights += weight_at(self.manifest.embedding, p)
        if stop == self.num_layers:
            weights += weight_at(self.manifest.head, p)
        kv = int(float(self.kv_bytes(p)[start:stop].sum()))  # floor: never above the check
        overhead = self.options.runtime_overhead_bytes
        return {
            "weights": weights,
            "kv": kv,
            "overhead": overhead,
            "total": weights + kv + overhead,
        }

    # -- tables ----------------------------------------------------------------

    def _box_costs(self, box: BoxProfile) -> BoxCosts:
        options: list[Option] = []
        refused: list[str] = []
        for backend, precision, rate in box.runnable():
            reason = self.refused_precisions.get(precision)
            if reason is not None:
                refused.append(f"{backend}/{reason}")
                continue
            options.append(self._option(box, backend, precision, rate))
        return BoxCosts(box, options, refused)

    def _option(self, box: BoxProfile, backend: str, precision: str, rate: ComputeRate) -> Option:
        n = self.num_layers
        m = self.manifest
        j = np.arange(n + 1)[:, None]
        k = np.arange(n + 1)[None, :]
        valid = k > j
        if backend in self.options.whole_model_only:
            valid = valid & (j == 0) & (k == n)

        cal = box.calibration_for(self.digest)
        timing = cal.timings.get(f"{backend}/{precision}") if cal is not None else None
        if cal is not None and timing is not None:
            source = "calibrated"
            per_layer = self.calibrated_layer_ms(rate, precision, cal, timing)
            stage, embed, head = timing.overhead_ms, timing.embed_ms, timing.head_ms
        else:
            source = "roofline"
            per_layer = self.layer_ms(rate, precision)
            stage, embed = 0.0, self.embed_ms(rate, precision)
            head = self.head_ms(rate, precision)
        t_prefix = np.concatenate([[0.0], np.cumsum(per_layer)])
        time = t_prefix[k] - t_prefix[j] + stage + (j == 0) * embed + (k == n) * head
        w = np.array([c.weight_bytes[precision] for c in m.layers], dtype=float)
        w_prefix = np.concatenate([[0.0], np.cumsum(w)])
        kv_prefix = np.concatenate([[0.0], np.cumsum(self.kv_bytes(precision))])
        memory = (
            w_prefix[k]
            - w_prefix[j]
            + (j == 0) * weight_at(m.embedding, precision)
            + (k == n) * weight_at(m.head, precision)
            + kv_prefix[k]
            - kv_prefix[j]
            + self.options.runtime_overhead_bytes
        )
        limit = rate.memory_limit_bytes or box.memory_limit_bytes
        usable = limit * (1 - self.options.headroom)
        feasible = valid & (memory <= usable)
        time = np.where(feasible, time, INF)
        return Option(backend, precision, rate, limit, usable, time, memory, feasible, source)
