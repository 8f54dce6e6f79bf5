"""Whole-model replicas of one graph on several boxes, behind one gateway.

Graph models are small: each box that serves one holds the whole graph
(data parallel, never sharded). A ``ReplicaSet`` is what the head's /v2
routes serve for such a model. Per request it picks the replica with the
smallest queue depth (a local replica: its batcher's depth; a remote one:
the requests this gateway has in flight there plus the depth that box
reported on its last answer, header ``Edgemesh-Queue-Depth``) and, when a
replica's box is lost (connection refused/reset, timeout, 5xx), retries the
request on the next replica and keeps the lost one out for ``down_s``.
A 4xx answer is the client's error and is returned as is (never retried).
No replica left raises ``ModelUnavailableError`` (503).

Failure modes: a box that answers slowly but correctly is never marked
down (only its queue depth steers traffic away); a request that the lost
box had already finished but whose answer was lost runs twice (graph
inference has no side effects, so this is safe).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemesh.errors import ModelUnavailableError, RequestError, TensorError
from edgemesh.graph.tensors import numpy_dtype, oip_dtype

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
QUEUE_HEADER = "Edgemesh-Queue-Depth"
Arrays = dict[str, np.ndarray]


class ReplicaLost(Exception):
    """The replica's box did not answer usefully; try another."""


@dataclass
class RemoteReplica:
    """A graph served by another box's gateway (``edgemesh serve --model DIR``)."""

    url: str
    """``http://host:port`` of that box's gateway."""
    model: str
    timeout_s: float = 30.0
    in_flight: int = 0
    reported_depth: int = 0
    down_until: float = 0.0
    served: int = 0
    _client: Any = field(default=None, repr=False)

    @property
    def queue_depth(self) -> int:
        return self.in_flight + self.reported_depth

    async def infer(self, feeds: Arrays, outputs: list[str]) -> Arrays:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        header, body = _encode_request(feeds)
        self.in_flight += 1
        try:
            r = await self._client.post(
                f"{self.url}/v2/models/{self.model}/infer",
                content=body,
                headers={HEADER_LENGTH: str(header)},
            )
        except httpx.HTTPError as exc:  # refused, reset, timed out: the box is lost
            raise ReplicaLost(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            self.in_flight -= 1
        if r.status_code >= 500:
            raise ReplicaLost(f"{self.url} answered {r.status_code}: {r.text[:200]}")
        if r.status_code != 200:
            status = r.status_code
            message = _error_text(r)
            err = RequestError(f"replica {self.url}: {message}")
            err.status = status  # the replica's verdict on the client's request
            raise err
        self.reported_depth = int(r.headers.get(QUEUE_HEADER, "0") or 0)
        self.served += 1
        return _decode_response(r.content, r.headers.get(HEADER_LENGTH))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


@dataclass
class LocalReplica:
    """A graph served by this process (a ``GraphService``)."""

    service: Any
    down_until: float = 0.0
    served: int = 0

    @property
    def url(self) -> str:
        return "local"

    @property
    def queue_depth(self) -> int:
        return self.service.queue_depth

    async def infer(self, feeds: Arrays, outputs: list[str]) -> Arrays:
        result = await self.service.infer(feeds)
        self.served += 1
        return result


class ReplicaSet:
    """One graph model served by several replicas; the /v2 routes' service interface."""

    def __init__(
        self, name: str, manifest: Any, replicas: list[Any], *, down_s: float = 10.0
    ) -> None:
        if not replicas:
            raise ModelUnavailableError(f"model '{name}' has no replicas")
        self.name = name
        self.manifest = manifest
        self.replicas = replicas
        self.down_s = down_s
        self.retries = 0
        self._inputs = {s.name: s for s in manifest.inputs}

    @property
    def queue_depth(self) -> int:
        return sum(r.queue_depth for r in self.replicas)

    @property
    def info(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "replicas": [
                {
                    "url": r.url,
                    "queue_depth": r.queue_depth,
                    "served": r.served,
                    "up": r.down_until <= now,
                }
                for r in self.replicas
            ],
            "retries": self.retries,
            "source": self.manifest.source.framework,
        }

    def metadata(self) -> dict[str, Any]:
        spec = lambda s: {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}  # noqa: E731
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "edgemesh_replicas",
            "inputs": [spec(s) for s in self.manifest.inputs],
            "outputs": [spec(s) for s in self.manifest.outputs],
        }

    def config(self) -> dict[str, Any]:
        meta = self.metadata()
        return {
            "name": self.name,
            "platform": meta["platform"],
            "input": meta["inputs"],
            "output": meta["outputs"],
            "parameters": {"edgemesh": self.info},
        }

    def stats(self) -> dict[str, Any]:
        return {"replicas": len(self.replicas), "retries": self.retries}

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing or len(feeds) != len(self._inputs):
            raise TensorError(f"model '{self.name}' takes inputs {list(self._inputs)}")
        for name, array in feeds.items():
            self._inputs[name].check(array)
        outputs = [s.name for s in self.manifest.outputs]
        tried: list[str] = []
        for replica in self._order():
            try:
                return await replica.infer(feeds, outputs)
            except ReplicaLost as exc:
                log.warning("replica lost, retrying elsewhere: %s", exc)
                replica.down_until = time.monotonic() + self.down_s
                self.retries += 1
                tried.append(str(exc))
        raise ModelUnavailableError(
            f"no replica of '{self.name}' answered: {'; '.join(tried) or 'all are down'}",
            hint="check the boxes serving it (edgemesh status)",
        )

    def _order(self) -> list[Any]:
        """Up replicas by queue depth (ties: the one that served least), then the down
        ones (a box may be back before its ``down_s`` ends)."""
        now = time.monotonic()
        up = [r for r in self.replicas if r.down_until <= now]
        down = [r for r in self.replicas if r.down_until > now]
        return sorted(up, key=lambda r: (r.queue_depth, r.served)) + down

    def close(self) -> None:
        for r in self.replicas:
            if isinstance(r, LocalReplica):
                r.service.close()


def _encode_request(feeds: dict[str, np.ndarray]) -> tuple[int, bytes]:
    inputs, chunks = [], []
    for name, array in feeds.items():
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": oip_dtype(array.dtype),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        chunks.append(raw)
    header = json.dumps(
        {"inputs": inputs, "parameters": {"binary_data_output": True}}, separators=(",", ":")
    ).encode()
    return len(header), b"".join([header, *chunks])


def _decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    n = int(header_length) if header_length is not None else len(body)
    header = json.loads(body[:n])
    out: dict[str, np.ndarray] = {}
    offset = n
    for t in header["outputs"]:
        dtype = numpy_dtype(t["datatype"]).newbyteorder("<")
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[t["name"]] = np.asarray(t["data"], dtype=dtype).reshape(t["shape"])
        else:
            out[t["name"]] = np.frombuffer(body[offset : offset + size], dtype).reshape(t["shape"])
            offset += size
    return out


def _error_text(r: Any) -> str:
    try:
        return str(r.json().get("error", r.text))
    except ValueError:
        return r.text[:200]
