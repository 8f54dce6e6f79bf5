"""Open Inference Protocol (KServe v2) routes for graph models, beside /v1.

Routes (what ``tritonclient.http`` calls, plus two edgemesh extensions)::

    GET  /v2                              server metadata
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models                       edgemesh: graph models with stats (dashboards)
    GET  /v2/models/{m}[/versions/{v}]    model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready
    GET  /v2/models/{m}[/versions/{v}]/config
    GET  /v2/models/{m}/stats             edgemesh: queue depth, batches, accuracy
    POST /v2/models/{m}[/versions/{v}]/infer

Infer bodies are JSON tensors (``data`` as a flat or nested list) or the
binary-tensor extension: a JSON header of ``Inference-Header-Content-Length``
bytes, then each input with ``parameters.binary_data_size`` bytes, in order
(little-endian, row-major). Outputs come back binary when the request asks
(``outputs[].parameters.binary_data`` or ``parameters.binary_data_output``,
which tritonclient sets by default), JSON otherwise.

Errors are the protocol's ``{"error": "..."}`` with 400 (bad tensor/body),
404 (unknown model), 429 + Retry-After (queue full) or 503 (engine failure):
a bad request never reaches the engine, so nothing served is disturbed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from edgemesh import __version__
from edgemesh.errors import EdgemeshError, OverloadedError, RequestError, TensorError
from edgemesh.graph.tensors import numpy_dtype

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
QUEUE_HEADER = "Edgemesh-Queue-Depth"
EXTENSIONS = ["binary_tensor_data", "model_repository_metadata_subset", "statistics"]


class _ModelNotFound(RequestError):
    status = 404


def oip_error(exc: EdgemeshError) -> JSONResponse:
    """An OIP error body for ``exc`` (RequestErrors keep their status)."""
    if isinstance(exc, OverloadedError):
        return JSONResponse(
            {"error": str(exc)}, 429, headers={"Retry-After": str(max(1, round(exc.retry_after_s)))}
        )
    status = exc.status if isinstance(exc, RequestError) else 503
    if status >= 500:
        log.error("infer failed: %s", exc)
    return JSONResponse({"error": str(exc)}, status)


def install(app: FastAPI, graphs: Sequence[Any] = ()) -> None:
    """Add the /v2 routes serving ``graphs`` (``GraphService``-like objects:
    ``name``, ``metadata()``, ``config()``, ``stats()``, ``async infer(feeds)``,
    ``queue_depth``, ``info``; a ``ReplicaSet`` is one too)."""
    app.state.graphs = {g.name: g for g in graphs}

    def model(name: str, version: str | None = None) -> Any:
        if version not in (None, "1"):
            raise _ModelNotFound(f"model '{name}' has only version 1, not '{version}'")
        found = app.state.graphs.get(name)
        if found is None:
            raise _ModelNotFound(
                f"model '{name}' is not served here; graph models: "
                f"{', '.join(app.state.graphs) or 'none'}"
            )
        return found

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "edgemesh", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200)

    @app.get("/v2/models")
    async def models() -> dict[str, Any]:
        return {"models": [_stats(g) for g in app.state.graphs.values()]}

    async def metadata(m: str, v: str | None = None) -> Response:
        try:
            return JSONResponse(model(m, v).metadata())
        except EdgemeshError as exc:
            return oip_error(exc)

    async def model_ready(m: str, v: str | None = None) -> Response:
        ok = m in app.state.graphs and v in (None, "1")
        return Response(status_code=200 if ok else 404)

    async def config(m: str, v: str | None = None) -> Response:
        try:
            g = model(m, v)
        except EdgemeshError as exc:
            return oip_error(exc)
        return JSONResponse(g.config())

    async def stats(m: str) -> Response:
        try:
            return JSONResponse(_stats(model(m)))
        except EdgemeshError as exc:
            return oip_error(exc)

    async def infer(m: str, request: Request, v: str | None = None) -> Response:
        try:
            g = model(m, v)
            body = _decompress(await request.body(), request.headers.get("content-encoding"))
            header, feeds, binary_out = parse_infer(body, request.headers.get(HEADER_LENGTH))
            names = [o["name"] for o in g.metadata()["outputs"]]
            if unknown := [n for n in binary_out if n not in names]:
                raise TensorError(f"model '{m}' has no outputs {unknown}; it has {names}")
            outputs = await g.infer(feeds)
            response = encode_infer(g.name, header, outputs, binary_out)
            # What a gateway balancing over replicas reads (tritonclient ignores it).
            response.headers[QUEUE_HEADER] = str(g.queue_depth)
            return response
        except EdgemeshError as exc:
            return oip_error(exc)

    # In /openapi.json (edgemesh.gateway.openapi adds the infer body), so clients
    # and the fuzz test see them.
    for prefix in ("/v2/models/{m}", "/v2/models/{m}/versions/{v}"):
        app.add_api_route(prefix, metadata, methods=["GET"])
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/config", config, methods=["GET"])
        app.add_api_route(prefix + "/infer", infer, methods=["POST"])
    app.add_api_route("/v2/models/{m}/stats", stats, methods=["GET"])


def _stats(g: Any) -> dict[str, Any]:
    return {
        "name": g.name,
        "ready": True,
        "queue_depth": g.queue_depth,
        **g.stats(),
        "edgemesh": g.info,
    }


def _decompress(body: bytes, encoding: str | None) -> bytes:
    """tritonclient's ``request_compression_algorithm`` (gzip or deflate)."""
    import zlib

    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            return zlib.decompress(body)
    except zlib.error as exc:
        raise TensorError(f"the {encoding} request body cannot be decompressed: {exc}") from None
    raise TensorError(f"Content-Encoding '{encoding}' is not supported (gzip, deflate)")


def parse_infer(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, bool]]:
    """(JSON header, input arrays, output name -> binary?) of an infer body."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise TensorError(
                f"{HEADER_LENGTH} must be an integer, got '{header_length}'"
            ) from None
        if not 0 < n <= len(body):
            raise TensorError(
                f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes", param=HEADER_LENGTH
            )
        raw_header, binary = body[:n], memoryview(body)[n:]
    else:
        raw_header, binary = body, memoryview(b"")
    try:
        header = json.loads(raw_header)
    except ValueError as exc:
        raise TensorError(f"the infer request header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise TensorError("the infer request needs an 'inputs' list", param="inputs")
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in header["inputs"]:
        array, used = _input(tensor, binary, offset)
        feeds[str(tensor["name"])] = array
        offset += used
    if offset != len(binary):
        raise TensorError(
            f"the binary body holds {len(binary)} bytes after the JSON header but the inputs' "
            f"binary_data_size add up to {offset}",
            param="binary_data_size",
        )
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError("the request's parameters must be an object", param="parameters")
    default_binary = bool(params.get("binary_data_output", False))
    wanted: dict[str, bool] = {}
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise TensorError("'outputs' must be a list", param="outputs")
    for out in outputs:
        if not isinstance(out, dict) or "name" not in out:
            raise TensorError("each requested output needs a 'name'", param="outputs")
        p = out.get("parameters") or {}
        if not isinstance(p, dict):
            raise TensorError("an output's parameters must be an object", param="outputs")
        if "classification" in p:
            raise TensorError("the classification extension is not supported", param="outputs")
        wanted[str(out["name"])] = bool(p.get("binary_data", default_binary))
    header["_default_binary"] = default_binary
    return header, feeds, wanted


def _input(tensor: Any, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    if not isinstance(tensor, dict) or not {"name", "shape", "datatype"} <= tensor.keys():
        raise TensorError("each input needs 'name', 'shape' and 'datatype'", param="inputs")
    name = str(tensor["name"])
    try:
        shape = tuple(int(d) for d in tensor["shape"])
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 in the JSON
        raise TensorError(f"input '{name}': shape must be a list of integers", param=name) from None
    if any(d < 0 for d in shape):
        raise TensorError(f"input '{name}': shape {list(shape)} has a negative axis", param=name)
    dtype = numpy_dtype(str(tensor["datatype"])).newbyteorder("<")
    count = math.prod(shape)  # a Python int: no int64 wrap-around on absurd shapes
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError(f"input '{name}': parameters must be an object", param=name)
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TensorError(
                f"input '{name}': binary_data_size must be an integer, got {size!r}"[:200],
                param=name,
            )
        if size != count * dtype.itemsize:
            raise TensorError(
                f"input '{name}': binary_data_size is {size} bytes but shape {list(shape)} of "
                f"{tensor['datatype']} needs {count * dtype.itemsize}",
                param=name,
            )
        if offset + size > len(binary):
            raise TensorError(
                f"input '{name}': the binary body ends {offset + size - len(binary)} bytes short "
                f"({len(binary)} bytes after the JSON header)",
                param="binary_data_size",
            )
        array = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
        return array.astype(dtype.newbyteorder("="), copy=False), size
    if "data" not in tensor:
        raise TensorError(f"input '{name}' has neither 'data' nor binary_data_size", param=name)
    try:
        array = np.asarray(tensor["data"], dtype=dtype.newbyteorder("="))
    except (TypeError, ValueError, OverflowError) as exc:  # Overflow: 1000 as INT8
        raise TensorError(f"input '{name}': data is not {tensor['datatype']}: {exc}") from None
    if array.size != count:
        raise TensorError(
            f"input '{name}': {array.size} values given; shape {list(shape)} needs {count}",
            param=name,
        )
    return array.reshape(shape), 0


def encode_infer(
    model: str, header: dict[str, Any], outputs: dict[str, np.ndarray], wanted: dict[str, bool]
) -> Response:
    unknown = [n for n in wanted if n not in outputs]
    if unknown:
        raise TensorError(
            f"model '{model}' has no outputs {unknown}; it has {list(outputs)}", param="outputs"
        )
    names = list(wanted) or list(outputs)
    default_binary = header.get("_default_binary", False)
    described = []
    chunks: list[bytes] = []
    from edgemesh.graph.tensors import oip_dtype

    for name in names:
        array = np.ascontiguousarray(outputs[name])
        item: dict[str, Any] = {
            "name": name,
            "datatype": oip_dtype(array.dtype),
            "shape": list(array.shape),
        }
        if wanted.get(name, default_binary):
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item["data"] = array.reshape(-1).tolist()
        described.append(item)
    result: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": described}
    if "id" in header:
        result["id"] = header["id"]
    head = json.dumps(result, separators=(",", ":")).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )
