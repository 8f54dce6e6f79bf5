"""Prometheus metrics of one gateway (``GET /metrics``).

Counters and histograms the gateway records as requests happen (requests
by route and status, time to first token, inter-token latency, tokens in
and out) live in a registry per app, so two apps in one process (tests)
never share numbers. What the engines and boxes know (queue depth, running
sequences, KV use, step times per stage, memory, CPU) is read at scrape
time by ``_LiveCollector``, so it is never stale and costs nothing between
scrapes; the box's own memory and CPU come from ``edgemesh.box_metrics``,
which ``edgemesh join`` also exports on a box without the gateway. Names
are listed in /tmp/team/CONTRACTS.md's H4 entry and docs/GATEWAY.md; the
dashboard charts the same numbers.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from edgemesh.box_metrics import BOX_METRICS_PORT, box_families

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


@functools.cache
def box_id() -> str:
    """This box's fingerprint id (the dashboard's), or the host name if it fails."""
    from edgemesh.gateway.dashboard import local_box

    ident = local_box().get("id")
    return str(ident) if ident and ident != "local" else socket.gethostname()


class GatewayMetrics:
    """The app's registry: recorded series plus the live collector."""

    def __init__(self, services: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgemesh_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "edgemesh_request_duration_seconds",
            "HTTP request time, to the last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "edgemesh_time_to_first_token_seconds",
            "Request arrival to its first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "edgemesh_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "edgemesh_prompt_tokens", "Prompt tokens received", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "edgemesh_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        r.register(_LiveCollector(services))

    def render(self) -> bytes:
        """The text exposition (blocking: a mesh's stage timings are fetched over Ray)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class TokenClock:
    """Observes TTFT and inter-token gaps of one sequence."""

    def __init__(self, metrics: GatewayMetrics | None, model: str, started: float) -> None:
        self._m = metrics
        self._model = model
        self._last: float | None = None
        self._started = started

    def tick(self, tokens: int = 1) -> None:
        if self._m is None or tokens <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._m.ttft.labels(self._model).observe(now - self._started)
        else:
            self._m.itl.labels(self._model).observe((now - self._last) / tokens)
        self._last = now


class _LiveCollector:
    """Engine, pipeline and box state, read at scrape time."""

    def __init__(self, services: Callable[[], dict[str, Any]]) -> None:
        self._services = services

    def describe(self) -> Iterable[Any]:
        return []  # collected live: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        queue = GaugeMetricFamily("edgemesh_queue_depth", "Requests waiting", labels=["model"])
        running = GaugeMetricFamily(
            "edgemesh_running_sequences", "Sequences being decoded", labels=["model"]
        )
        kv = GaugeMetricFamily(
            "edgemesh_kv_used_ratio",
            "KV cache positions held by live sequences / (max sequences x context)",
            labels=["model"],
        )
        steps = CounterMetricFamily("edgemesh_engine_steps", "Engine steps", labels=["model"])
        busy = CounterMetricFamily(
            "edgemesh_engine_busy_seconds", "Engine time in pipeline steps", labels=["model"]
        )
        forks = CounterMetricFamily(
            "edgemesh_prefill_forks",
            "Samples (n > 1) that copied another sample's prompt KV instead of prefilling",
            labels=["model"],
        )
        stage_calls = CounterMetricFamily(
            "edgemesh_stage_steps",
            "Forward calls per pipeline stage",
            labels=["model", "stage", "box"],
        )
        stage_busy = CounterMetricFamily(
            "edgemesh_stage_step_seconds",
            "Time in each stage's forward calls",
            labels=["model", "stage", "box"],
        )
        hop = CounterMetricFamily(
            "edgemesh_hop_seconds",
            "Time micro-batches spent between a stage and the next (sender's clock to receiver's)",
            labels=["model", "hop"],
        )
        hops = CounterMetricFamily(
            "edgemesh_hops", "Micro-batches sent between stages", labels=["model", "hop"]
        )
        for name, service in self._services().items():
            engine = service.engine
            load = engine.load
            queue.add_metric([name], load["waiting"])
            running.add_metric([name], load["active"])
            kv.add_metric([name], engine.kv_used_ratio() if hasattr(engine, "kv_used_ratio") else 0)
            steps.add_metric([name], engine.stats.steps)
            busy.add_metric([name], engine.stats.busy_s)
            forks.add_metric([name], getattr(engine.stats, "forks", 0))
            timings = getattr(engine.pipeline, "stage_timings", None)
            if timings is None:
                continue
            try:
                stages = timings()
            except Exception as exc:  # a stage being moved must not break the scrape
                log.info("stage timings of %s unavailable: %r", name, exc)
                continue
            for st in stages:
                labels = [name, str(st["stage"]), str(st.get("box", "local"))]
                stage_calls.add_metric(labels, st.get("calls", 0))
                stage_busy.add_metric(labels, st.get("busy_s", 0.0))
                if "hop_s" in st:
                    k = int(st["stage"])
                    edge = f"{k - 1}->{k}" if k else "gateway->0"
                    hop.add_metric([name, edge], st["hop_s"])
                    hops.add_metric([name, edge], st["hops"])
        yield from (queue, running, kv, steps, busy, forks, stage_calls, stage_busy, hop, hops)
        yield from box_families(box_id())


def sd_targets(boxes: list[dict[str, Any]], gateway: str) -> list[dict[str, Any]]:
    """Prometheus http_sd: the gateway itself plus every box's exporter."""
    out = [{"targets": [gateway], "labels": {"role": "gateway", "box": box_id()}}]
    for b in boxes:
        address = b.get("address")
        if not address or b.get("role") == "single":
            continue
        port = b.get("metrics_port", BOX_METRICS_PORT)
        out.append(
            {
                "targets": [f"{address}:{port}"],
                "labels": {"role": str(b.get("role", "box")), "box": str(b.get("id", address))},
            }
        )
    return out
