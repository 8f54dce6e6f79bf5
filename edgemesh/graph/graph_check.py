"""Reading an ONNX graph safely: corrupt files and unknown operators get typed errors.

``load_checked`` raises ``CorruptArtifactError`` for a file protobuf cannot
parse (truncated, not ONNX) or the checker rejects, and
``UnsupportedOpError`` (op name + opset) for a node the ONNX standard at the
model's opset does not define. ``translate_runtime_error`` maps a runtime's
"no kernel for op X(opset)" failure to the same ``UnsupportedOpError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgemesh.errors import CorruptArtifactError, ModelNotFoundError, UnsupportedOpError

_STANDARD_DOMAINS = ("", "ai.onnx")
# Domains onnxruntime implements itself (contrib ops, QDQ, ML ops).
_RUNTIME_DOMAINS = ("com.microsoft", "ai.onnx.ml", "com.ms.internal.nhwc")


def opset_of(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in _STANDARD_DOMAINS:
            return int(imp.version)
    return 1


def load_checked(path: Path) -> Any:
    """The ModelProto at ``path``, checked; typed errors for what is wrong with it."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no ONNX file at '{path}'")
    if path.stat().st_size == 0:
        raise CorruptArtifactError(str(path), "the file is empty")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise CorruptArtifactError(
            str(path), f"not a readable ONNX protobuf (truncated or another format): {exc}"
        ) from exc
    if not model.graph.node:
        raise CorruptArtifactError(str(path), "the graph has no nodes (truncated or empty model)")
    check_ops(model, str(path))
    try:
        # The path form also checks graphs over 2 GB and their external data.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise CorruptArtifactError(str(path), f"onnx.checker: {str(exc)[:400]}") from exc
    return model


def check_ops(model: Any, where: str) -> None:
    """Every node's operator exists at the model's opset (custom domains: only
    those onnxruntime implements)."""
    import onnx.defs

    opsets = {imp.domain: int(imp.version) for imp in model.opset_import}
    standard = opset_of(model)
    for node in model.graph.node:
        domain = node.domain or ""
        if domain in _STANDARD_DOMAINS:
            try:
                onnx.defs.get_schema(node.op_type, standard, "")
            except onnx.defs.SchemaError:
                raise UnsupportedOpError(
                    node.op_type,
                    standard,
                    f"the ONNX standard (node '{node.name}' of {where})",
                    hint="re-export with an opset that defines it, or replace the operator",
                ) from None
        elif domain not in _RUNTIME_DOMAINS:
            raise UnsupportedOpError(
                f"{domain}::{node.op_type}",
                opsets.get(domain),
                f"edgemesh's engines (custom domain, node '{node.name}' of {where})",
                hint="export without custom operators",
            )


_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\)")
_NOT_REGISTERED = re.compile(r"(\w+) is not a registered function/op")


def translate_runtime_error(exc: Exception, runtime: str, opset: int | None) -> Exception | None:
    """An ``UnsupportedOpError`` if ``exc`` is a runtime's missing-kernel error, else None."""
    text = str(exc)
    if m := _NO_KERNEL.search(text):
        return UnsupportedOpError(m.group(1), int(m.group(2)), runtime)
    if m := _NOT_REGISTERED.search(text):
        return UnsupportedOpError(m.group(1), opset, runtime)
    return None
