"""A box's own metrics exporter (what `edgemesh join` runs) and the http_sd list."""

from __future__ import annotations

import httpx

from edgemesh.box_metrics import serve_box_metrics
from edgemesh.gateway.metrics import sd_targets
from tests.conftest import free_port


def test_a_box_exports_its_memory_and_cpu() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    server = serve_box_metrics("127.0.0.1", port, box="box-7")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    used, total = (
        samples["edgemesh_box_memory_used_bytes"],
        samples["edgemesh_box_memory_total_bytes"],
    )
    assert used.labels == {"box": "box-7"} and 0 < used.value < total.value
    assert 0 <= samples["edgemesh_box_cpu_percent"].value <= 100 * 1024


def test_http_sd_lists_the_gateway_and_every_mesh_box() -> None:
    boxes = [
        {"id": "head-1", "role": "head", "address": "10.84.0.2"},
        {"id": "w-2", "role": "worker", "address": "10.84.0.3", "metrics_port": 9500},
        {"id": "gone", "role": "worker"},  # no address: not scrapable
    ]
    targets = sd_targets(boxes, "10.84.0.2:8000")
    assert targets[0]["targets"] == ["10.84.0.2:8000"] and targets[0]["labels"]["role"] == "gateway"
    assert [t["targets"] for t in targets[1:]] == [["10.84.0.2:9464"], ["10.84.0.3:9500"]]
    assert [t["labels"]["box"] for t in targets[1:]] == ["head-1", "w-2"]
