"""Paddle's side of ``edgemesh import`` for a Paddle inference model, run as a script.

Run by the interpreter ``EDGEMESH_PADDLE_PYTHON`` names (``paddle_env``), a
separate environment holding paddlepaddle, paddle2onnx and numpy: edgemesh is
not installed there, so this file imports nothing but those (and runs with
``python -I``, so this folder's modules never shadow them).

``argv``: PROGRAM PARAMS OUT_ONNX OPSET.

The protocol is JSON lines on stdout (Paddle and paddle2onnx print their own
progress on stdout, which is moved to stderr first):

* after the conversion, one line: ``{"ok": true, "paddle": VERSION, "inputs":
  [...], "outputs": [...]}`` or ``{"ok": false, "kind": KIND, "error": TEXT}``
  with KIND ``missing`` (an import failed), ``unsupported`` (paddle2onnx
  refused) or ``corrupt`` (Paddle Inference cannot load the model);
* then, per line read on stdin (the path of an ``.npz`` holding the inputs
  ``x0``, ``x1``, ... in graph order), one line ``{"ok": true, "out": PATH}``
  naming an ``.npz`` of Paddle Inference's outputs ``y0``, ``y1``, ..., or
  ``{"ok": false, "kind": "inference", "error": TEXT}``.

EOF on stdin ends it.
"""

import json
import os
import sys


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def say(**msg: object) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    program, params, out, opset = sys.argv[1:5]
    try:
        import numpy as np
        import paddle
        import paddle2onnx
    except ImportError as exc:
        say(ok=False, kind="missing", error=f"{type(exc).__name__}: {exc}")
        return 1
    try:
        paddle2onnx.export(
            program, params, save_file=out, opset_version=int(opset), enable_onnx_checker=True
        )
    except Exception as exc:  # paddle2onnx raises bare Exceptions naming the op
        say(ok=False, kind="unsupported", error=str(exc).strip()[:500])
        return 1
    if not os.path.isfile(out):
        say(
            ok=False, kind="unsupported", error="paddle2onnx wrote no ONNX file (its log names why)"
        )
        return 1
    config = paddle.inference.Config(program, params)
    config.disable_gpu()
    config.switch_ir_optim(False)  # the reference is the program as written, not a fused one
    try:
        predictor = paddle.inference.create_predictor(config)
    except Exception as exc:
        say(ok=False, kind="corrupt", error=f"Paddle Inference cannot load it: {exc}")
        return 1
    in_names = predictor.get_input_names()
    out_names = predictor.get_output_names()
    say(ok=True, paddle=paddle.__version__, inputs=in_names, outputs=out_names)
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            with np.load(path) as data:
                xs = [data[f"x{i}"] for i in range(len(in_names))]
            for name, x in zip(in_names, xs, strict=True):
                handle = predictor.get_input_handle(name)
                handle.reshape(list(x.shape))
                handle.copy_from_cpu(np.ascontiguousarray(x))
            predictor.run()
            ys = [predictor.get_output_handle(n).copy_to_cpu() for n in out_names]
            dest = path[: -len(".npz")] + "-out.npz"
            np.savez(dest, **{f"y{i}": y for i, y in enumerate(ys)})
            say(ok=True, out=dest)
        except Exception as exc:  # reported to the importer, which raises a typed error
            say(ok=False, kind="inference", error=f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
