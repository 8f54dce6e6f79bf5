"""Tensor specs and the Open Inference Protocol's datatype names.

A ``TensorSpec`` is one graph input or output: name, OIP datatype and shape,
where ``-1`` marks a dynamic axis (``dynamic_axes`` keeps the label the
exporter gave it, e.g. ``{"0": "batch"}``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgemesh.errors import TensorError

# OIP datatype -> numpy dtype (BYTES is not a graph tensor type here).
OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NUMPY.items()}

# ONNX TensorProto element type -> OIP datatype.
ONNX_TO_OIP: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}


def numpy_dtype(oip: str) -> np.dtype:
    try:
        return OIP_TO_NUMPY[oip]
    except KeyError:
        raise TensorError(
            f"datatype '{oip}' is not supported; use one of {', '.join(OIP_TO_NUMPY)}",
            param="datatype",
        ) from None


def oip_dtype(dtype: Any) -> str:
    d = np.dtype(dtype)
    if d not in NUMPY_TO_OIP:
        raise TensorError(f"numpy dtype {d} has no Open Inference Protocol datatype")
    return NUMPY_TO_OIP[d]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    """OIP name: FP32, INT64, UINT8..."""
    shape: tuple[int, ...]
    """-1 = dynamic axis."""
    dynamic_axes: dict[str, str] = field(default_factory=dict)
    """axis index (as a string, JSON keys) -> the exporter's label."""

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.datatype)

    @property
    def batched(self) -> bool:
        """Axis 0 is dynamic: requests can be stacked into one batch."""
        return bool(self.shape) and self.shape[0] == -1

    def concrete(self, batch: int = 1, fill: int = 1) -> tuple[int, ...]:
        """A concrete shape: the batch axis set to ``batch``, other dynamic axes to ``fill``."""
        return tuple(
            (batch if i == 0 else fill) if d == -1 else d for i, d in enumerate(self.shape)
        )

    def check(self, array: np.ndarray) -> None:
        """Raise ``TensorError`` unless ``array`` fits this spec (dtype, rank, fixed axes)."""
        if array.dtype != self.dtype:
            raise TensorError(
                f"input '{self.name}' has datatype {oip_dtype(array.dtype)}; the model takes "
                f"{self.datatype}",
                param=self.name,
            )
        if len(array.shape) != len(self.shape) or any(
            d != -1 and d != a for d, a in zip(self.shape, array.shape, strict=True)
        ):
            raise TensorError(
                f"input '{self.name}' has shape {list(array.shape)}; the model takes "
                f"{list(self.shape)} (-1 = any)",
                param=self.name,
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=data["name"],
            datatype=data["datatype"],
            shape=tuple(int(x) for x in data["shape"]),
            dynamic_axes={str(k): str(v) for k, v in (data.get("dynamic_axes") or {}).items()},
        )


def specs_from_onnx(values: Any) -> list[TensorSpec]:
    """TensorSpecs of an ONNX graph's ``input``/``output`` ValueInfos."""
    specs = []
    for v in values:
        tt = v.type.tensor_type
        shape: list[int] = []
        dynamic: dict[str, str] = {}
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(-1)
                dynamic[str(i)] = d.dim_param or f"dim{i}"
        datatype = ONNX_TO_OIP.get(tt.elem_type)
        if datatype is None:
            from edgemesh.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"graph tensor '{v.name}' has ONNX element type {tt.elem_type}, which the Open "
                "Inference Protocol path does not carry"
            )
        specs.append(TensorSpec(v.name, datatype, tuple(shape), dynamic))
    return specs
