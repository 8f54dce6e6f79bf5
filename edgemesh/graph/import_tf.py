"""TensorFlow -> ONNX with tf2onnx: a SavedModel folder or a .keras/.h5 file.

* SavedModel: its ``serving_default`` signature is converted
  (``tf2onnx.convert.from_function``); the reference calls the same
  signature. Inputs keep the signature's names.
* Keras: the model is wrapped in a ``tf.function`` over its input specs
  (``--input-shape`` fills unknown dimensions other than the batch axis),
  converted the same way; the reference is ``model(x, training=False)``.

The batch axis stays dynamic when the source leaves it unknown.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.errors import ConfigError, CorruptArtifactError, UnsupportedModelError, require
from edgemesh.graph.imported import Imported, ImportOptions
from edgemesh.graph.manifest import SourceInfo

EXTRA = "import-tf"


def run(path: Path, work: Path, options: ImportOptions) -> Imported:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up banner is not an error
    tf = require("tensorflow", EXTRA)
    require("tf2onnx", EXTRA)
    if path.is_dir():
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # TF raises many kinds for a damaged folder
            raise CorruptArtifactError(str(path), f"tf.saved_model.load failed: {exc}") from exc
        if "serving_default" not in loaded.signatures:
            raise UnsupportedModelError(
                f"SavedModel '{path}' has no serving_default signature "
                f"(it has {list(loaded.signatures)})"
            )
        fn = loaded.signatures["serving_default"]
        names = sorted(fn.structured_input_signature[1])
        specs = [
            tf.TensorSpec(t.shape, t.dtype, name=n)
            for n, t in ((n, fn.structured_input_signature[1][n]) for n in names)
        ]
        out_names = sorted(fn.structured_outputs)

        def reference(inputs: list[np.ndarray]) -> list[np.ndarray]:
            out = fn(**{n: tf.constant(x) for n, x in zip(names, inputs, strict=True)})
            return [out[k].numpy() for k in out_names]

        @tf.function(input_signature=specs)
        def convert_fn(*args: Any) -> Any:
            out = fn(**dict(zip(names, args, strict=True)))
            return [out[k] for k in out_names]

        form, keep = "saved-model", loaded
    else:
        keras = require("keras", EXTRA)
        try:
            model = keras.models.load_model(str(path), compile=False)
        except Exception as exc:
            raise CorruptArtifactError(str(path), f"keras load_model failed: {exc}") from exc
        specs = _keras_specs(tf, model, options)
        names = [s.name for s in specs]

        @tf.function(input_signature=specs)
        def convert_fn(*args: Any) -> Any:
            out = model(list(args) if len(args) > 1 else args[0], training=False)
            return out if isinstance(out, (list, tuple)) else [out]

        def reference(inputs: list[np.ndarray]) -> list[np.ndarray]:
            out = model(inputs if len(inputs) > 1 else inputs[0], training=False)
            outs = out if isinstance(out, (list, tuple)) else [out]
            return [np.asarray(o) for o in outs]

        form, keep = "keras", model
    out = work / "source.onnx"
    _convert(tf, convert_fn, specs, out, options.opset)
    return Imported(
        onnx_path=out,
        source=SourceInfo("tensorflow", tf.__version__, str(path), form),
        reference=reference,
        notes=[f"inputs {names}"],
        keep_alive=keep,
    )


def _keras_specs(tf: Any, model: Any, options: ImportOptions) -> list[Any]:
    specs = []
    for i, t in enumerate(model.inputs):
        shape = list(t.shape)
        if any(d is None for d in shape[1:]):
            if i >= len(options.input_shapes):
                raise ConfigError(
                    f"Keras input '{t.name}' has unknown dimensions {shape}",
                    hint="pass --input-shape for it, e.g. 1,224,224,3",
                )
            shape = [None, *options.input_shapes[i][1:]]
        if not options.dynamic_batch and shape[0] is None:
            shape[0] = options.input_shapes[i][0] if i < len(options.input_shapes) else 1
        name = t.name.split(":")[0] or f"input_{i}"
        specs.append(tf.TensorSpec(shape, t.dtype, name=name))
    return specs


def _convert(tf: Any, fn: Any, specs: list[Any], out: Path, opset: int) -> None:
    import tf2onnx

    try:
        tf2onnx.convert.from_function(fn, input_signature=specs, opset=opset, output_path=str(out))
    except Exception as exc:  # tf2onnx raises ValueError/KeyError/RuntimeError per op handler
        raise UnsupportedModelError(
            f"tf2onnx could not convert the model: {str(exc).strip()[:500]}",
            hint="an operator tf2onnx has no handler for is named above; try another --opset",
        ) from exc
