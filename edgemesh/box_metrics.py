"""A box's own Prometheus metrics: memory and CPU, labelled with its id.

Two callers sit in different layers: the mesh agent (``edgemesh join``)
exports them on ``:9464/metrics`` for a box without the gateway, and the
gateway's ``/metrics`` appends the same families for its own box. Both
pass the box id in (the agent knows its fingerprint id; the gateway reads
the dashboard's), so this module depends on neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

BOX_METRICS_PORT = 9464
"""Where ``serve_box_metrics`` listens on a box unless told otherwise."""


def box_families(box: str) -> Iterator[Any]:
    """This box's memory and CPU, labelled with ``box``."""
    import psutil
    from prometheus_client.core import GaugeMetricFamily

    mem = psutil.virtual_memory()
    used = GaugeMetricFamily("edgemesh_box_memory_used_bytes", "Memory in use", labels=["box"])
    used.add_metric([box], float(mem.total - mem.available))
    total = GaugeMetricFamily("edgemesh_box_memory_total_bytes", "Memory", labels=["box"])
    total.add_metric([box], float(mem.total))
    cpu = GaugeMetricFamily(
        "edgemesh_box_cpu_percent", "CPU use since the previous scrape", labels=["box"]
    )
    cpu.add_metric([box], psutil.cpu_percent(interval=None))
    yield from (used, total, cpu)


class _BoxCollector:
    def __init__(self, box: str) -> None:
        self._box = box

    def describe(self) -> Iterable[Any]:
        return []  # collected live: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        yield from box_families(self._box)


def serve_box_metrics(host: str, port: int = BOX_METRICS_PORT, *, box: str) -> Any:
    """Export this box's own metrics on ``http://host:port/metrics`` (a box
    without the gateway: ``edgemesh join``). Returns the server (``shutdown()``);
    raises OSError when the port is taken."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(_BoxCollector(box))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
