"""Any ONNX file (how MXNet, Caffe and other exporters' users arrive).

The file is read and checked (``graph_check.load_checked``) and copied as
the package's fp32 graph; the reference is onnxruntime running the file as
given, so the other precisions are measured against it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgemesh.graph.imported import Imported, ImportOptions
from edgemesh.graph.manifest import SourceInfo


def run(path: Path, work: Path, options: ImportOptions) -> Imported:
    import onnx

    from edgemesh.graph.graph_check import load_checked

    model = load_checked(path)
    out = work / "source.onnx"
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        onnx.save_model(model, str(out))  # external data was loaded from beside the source
    else:
        shutil.copyfile(path, out)
    producer = f"{model.producer_name} {model.producer_version}".strip() or None
    return Imported(
        onnx_path=out,
        source=SourceInfo("onnx", producer, str(path), "onnx"),
        reference=None,
    )
