"""Open Inference Protocol (KServe v2) infer bodies for graph models, numpy in/out.

Requests use the binary-tensor extension (what ``tritonclient`` sends): a
JSON header of ``Inference-Header-Content-Length`` bytes, then each input's
raw little-endian, row-major bytes, in order; outputs are asked for binary
too. Answers in either form (binary or JSON ``data``) are decoded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgemesh.errors import TensorError
from edgemesh.graph.tensors import numpy_dtype, oip_dtype

HEADER_LENGTH = "Inference-Header-Content-Length"


def encode_request(
    inputs: Mapping[str, Any], outputs: Sequence[str] | None = None
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer request for ``inputs`` (name -> array)."""
    if not inputs:
        raise TensorError("an infer request needs at least one input", param="inputs")
    described = []
    chunks = []
    for name, value in inputs.items():
        array = np.ascontiguousarray(value)
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        described.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": oip_dtype(array.dtype),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        chunks.append(raw)
    header: dict[str, Any] = {"inputs": described, "parameters": {"binary_data_output": True}}
    if outputs:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    return b"".join([head, *chunks]), headers


def decode_response(content: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Output name -> array of an infer answer (binary or JSON tensors)."""
    length = headers.get(HEADER_LENGTH.lower()) or headers.get(HEADER_LENGTH)
    n = int(length) if length else len(content)
    header = json.loads(content[:n])
    binary = memoryview(content)[n:]
    offset = 0
    out: dict[str, np.ndarray] = {}
    for tensor in header.get("outputs", []):
        dtype = numpy_dtype(str(tensor["datatype"]))
        shape = [int(d) for d in tensor["shape"]]
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = binary[offset : offset + int(size)]
            offset += int(size)
            array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
        else:
            array = np.asarray(tensor.get("data", []), dtype=dtype)
        out[str(tensor["name"])] = array.reshape(shape)
    return out
