"""The monitoring history behind the dashboard's charts.

Every ``interval_s`` a thread reads the app's Prometheus registry (the one
``/metrics`` exports, ``app.state.metrics_registry``) and turns the change
since the previous reading into one point per model: tokens/s, TTFT and
inter-token latency percentiles (from the histogram buckets' increase, as
Prometheus' ``histogram_quantile`` computes them), queue and running
sequences, mean time per pipeline stage and per hop (the increase of the
seconds counters over the increase of the call counters). So the charts and a
Prometheus scrape show the same numbers.

A gateway without the registry (the metrics extra not installed) falls
back to the engine's own counters, which give tokens/s, queue and running
sequences but no latency percentiles; ``source`` says which one a point
came from.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import defaultdict, deque
from typing import Any

log = logging.getLogger(__name__)

TOKENS = "edgemesh_completion_tokens_total"
TTFT = "edgemesh_time_to_first_token_seconds"
ITL = "edgemesh_inter_token_latency_seconds"
QUEUE = "edgemesh_queue_depth"
RUNNING = "edgemesh_running_sequences"
STAGE_S = "edgemesh_stage_step_seconds_total"
STAGE_N = "edgemesh_stage_steps_total"
HOP_S = "edgemesh_hop_seconds_total"
HOP_N = "edgemesh_hops_total"
READ = (TOKENS, f"{TTFT}_bucket", f"{ITL}_bucket", QUEUE, RUNNING, STAGE_S, STAGE_N, HOP_S, HOP_N)
"""The metric names the charts read (deploy/grafana's test checks them too)."""
QUANTILES = (0.5, 0.95, 0.99)

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]
"""sample name (``x_bucket``, ``x_sum``...) -> labels -> value"""


def read_registry(registry: Any) -> Samples:
    out: Samples = defaultdict(dict)
    for family in registry.collect():
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = float(s.value)
    return out


def _get(labels: Labels, key: str) -> str | None:
    return next((v for k, v in labels if k == key), None)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``q`` of a histogram given as (upper bound, cumulative count) pairs,
    interpolated linearly inside the bucket (Prometheus' rule)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # in the +Inf bucket: the highest finite bound
            width = count - prev_count
            frac = (rank - prev_count) / width if width > 0 else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def _delta_quantiles(
    now: Samples, before: Samples, name: str, model: str
) -> dict[str, float | None]:
    cur = now.get(f"{name}_bucket", {})
    old = before.get(f"{name}_bucket", {})
    by_le: dict[float, float] = defaultdict(float)
    for labels, value in cur.items():
        if _get(labels, "model") != model:
            continue
        le = _get(labels, "le")
        if le is None:
            continue
        by_le[float(le)] += value - old.get(labels, 0.0)
    pairs = sorted(by_le.items())
    return {
        f"p{round(q * 100)}": _ms(histogram_quantile(q, pairs)) if pairs else None
        for q in QUANTILES
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def _delta_ratio(
    now: Samples, before: Samples, num: str, den: str, model: str, key: str
) -> dict[str, float]:
    """Increase of counter ``num`` over increase of counter ``den`` in the
    interval (time per call), ms, per value of label ``key``."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    for name, out in ((num, sums), (den, counts)):
        old = before.get(name, {})
        for labels, value in now.get(name, {}).items():
            if _get(labels, "model") == model:
                out[_get(labels, key) or "?"] += value - old.get(labels, 0.0)
    return {k: round(1000.0 * sums[k] / c, 2) for k, c in sorted(counts.items()) if c > 0}


def _total(samples: Samples, name: str, model: str) -> float:
    return sum(v for labels, v in samples.get(name, {}).items() if _get(labels, "model") == model)


def _registry(app: Any) -> Any:
    """The registry ``/metrics`` renders (``edgemesh.gateway.metrics``), if any."""
    registry = getattr(app.state, "metrics_registry", None)
    if registry is None:
        registry = getattr(getattr(app.state, "metrics", None), "registry", None)
    return registry


class History:
    """Points per model for the last ``window_s``; ``start`` runs the sampler."""

    def __init__(self, app: Any, interval_s: float = 2.0, window_s: float = 900.0) -> None:
        self._app = weakref.ref(app)
        self.interval_s = interval_s
        self.window_s = window_s
        self._points: dict[str, deque[dict[str, Any]]] = {}
        self._prev: tuple[float, Samples] | None = None
        self._prev_engine: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="edgemesh-history", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._halt.set()

    def _loop(self) -> None:
        while not self._halt.wait(self.interval_s):
            if self._app() is None:
                return  # the app is gone (a test's app): stop sampling
            try:
                self.sample()
            except Exception:  # one bad reading must not end the charts
                log.exception("monitoring sample failed")

    def sample(self, now: float | None = None) -> None:
        app = self._app()
        if app is None:
            return
        now = now or time.time()
        services = dict(getattr(app.state, "services", {}))
        registry = _registry(app)
        points = (
            self._from_registry(registry, services, now)
            if registry is not None
            else self._from_engines(services, now)
        )
        cap = max(1, int(self.window_s / self.interval_s))
        with self._lock:
            for model, point in points.items():
                self._points.setdefault(model, deque(maxlen=cap)).append(point)
            for gone in set(self._points) - set(services):
                del self._points[gone]

    def _from_registry(self, registry: Any, services: dict, now: float) -> dict[str, dict]:
        samples = read_registry(registry)
        prev = self._prev
        self._prev = (now, samples)
        if prev is None:
            return {}
        t0, before = prev
        dt = max(1e-3, now - t0)
        out = {}
        for model in services:
            tokens = _total(samples, TOKENS, model) - _total(before, TOKENS, model)
            out[model] = {
                "t": now,
                "source": "metrics",
                "tokens_per_s": round(max(0.0, tokens) / dt, 2),
                "ttft_ms": _delta_quantiles(samples, before, TTFT, model),
                "itl_ms": _delta_quantiles(samples, before, ITL, model),
                "queue": _total(samples, QUEUE, model),
                "active": _total(samples, RUNNING, model),
                "stage_ms": _delta_ratio(samples, before, STAGE_S, STAGE_N, model, "stage"),
                "hop_ms": _delta_ratio(samples, before, HOP_S, HOP_N, model, "hop"),
            }
        return out

    def _from_engines(self, services: dict, now: float) -> dict[str, dict]:
        out = {}
        for model, service in services.items():
            engine = getattr(service, "engine", None)
            if engine is None:
                continue
            tokens = int(engine.stats.tokens)
            prev = self._prev_engine.get(model)
            self._prev_engine[model] = (now, tokens)
            if prev is None:
                continue
            load = engine.load
            out[model] = {
                "t": now,
                "source": "engine",
                "tokens_per_s": round(max(0, tokens - prev[1]) / max(1e-3, now - prev[0]), 2),
                "ttft_ms": dict.fromkeys(("p50", "p95", "p99")),
                "itl_ms": dict.fromkeys(("p50", "p95", "p99")),
                "queue": load["waiting"],
                "active": load["active"],
                "stage_ms": {},
                "hop_ms": {},
            }
        return out

    def window(self, window_s: float | None = None) -> dict[str, Any]:
        span = min(self.window_s, window_s or self.window_s)
        since = time.time() - span
        with self._lock:
            models = {m: [p for p in pts if p["t"] >= since] for m, pts in self._points.items()}
        return {
            "interval_s": self.interval_s,
            "window_s": span,
            "metrics": list(READ),
            "models": models,
        }
