"""PaddlePaddle in its own Python: conversion and reference in a child process.

paddle2onnx 2.1 requires ``onnx<=1.17``, older than the onnx the rest of
edgemesh runs on, so Paddle lives in a separate virtual environment (CI's
``.ci/run`` builds one). ``EDGEMESH_PADDLE_PYTHON`` names its interpreter;
this module is the one place that reads it. When it is set, ``edgemesh
import`` of a Paddle model starts ``paddle_child.py`` there: the child runs
paddle2onnx, then answers reference requests (inputs in, Paddle Inference's
outputs back, as ``.npz`` files in a scratch folder) until the import ends.
This process reads the ONNX file with its own onnx/onnxruntime and measures
every precision against the child's outputs, as for an in-process import.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.errors import (
    ConfigError,
    CorruptArtifactError,
    InferenceError,
    MissingExtraError,
    UnsupportedModelError,
)
from edgemesh.graph.imported import Imported, ImportOptions
from edgemesh.graph.manifest import SourceInfo

log = logging.getLogger(__name__)

ENV = "EDGEMESH_PADDLE_PYTHON"
CHILD = Path(__file__).with_name("paddle_child.py")
STOP_TIMEOUT_S = 10.0


def paddle_python() -> Path | None:
    """The interpreter of the Paddle environment, or None when ``$EDGEMESH_PADDLE_PYTHON``
    is unset (Paddle, if anywhere, is in this process's environment)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ConfigError(
            f"{ENV}={value} is not an executable Python",
            hint="point it at bin/python of a venv holding paddlepaddle and paddle2onnx "
            "(docs/MODELS.md), or unset it",
        )
    return path


class PaddleChild:
    """The running child: ``reference`` is the import's reference function."""

    def __init__(self, proc: subprocess.Popen[str], scratch: Path) -> None:
        self.proc = proc
        self.scratch = scratch
        self.calls = 0
        self._finalizer = weakref.finalize(self, _stop, proc, scratch)

    def reference(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Inputs in graph order -> Paddle Inference's outputs (blocks on the child)."""
        self.calls += 1
        path = self.scratch / f"in-{self.calls}.npz"
        np.savez(path, **{f"x{i}": np.ascontiguousarray(x) for i, x in enumerate(inputs)})
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise InferenceError(f"the Paddle child process ended: {self.log_tail()}") from None
        reply = _reply(self.proc, self.scratch)
        if not reply.get("ok"):
            raise InferenceError(f"Paddle Inference failed on the samples: {reply.get('error')}")
        with np.load(reply["out"]) as data:
            outputs = [data[f"y{i}"] for i in range(len(data.files))]
        path.unlink(missing_ok=True)
        Path(reply["out"]).unlink(missing_ok=True)
        return outputs

    def log_tail(self) -> str:
        return _log_tail(self.scratch)

    def close(self) -> None:
        self._finalizer()


def run_in_child(
    python: Path, program: Path, params: Path, work: Path, options: ImportOptions
) -> Imported:
    """Convert ``program``/``params`` into ``work/source.onnx`` with the Paddle of
    ``python``; the returned reference runs Paddle Inference there."""
    # Scratch outside ``work``: every file in ``work`` becomes part of the package.
    scratch = Path(tempfile.mkdtemp(prefix="edgemesh-paddle-"))
    out = work / "source.onnx"
    argv = [str(python), "-I", str(CHILD), str(program), str(params), str(out), str(options.opset)]
    with open(scratch / "paddle.log", "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=scratch,
            text=True,
        )
    child = PaddleChild(proc, scratch)
    hello = _reply(proc, scratch)
    if not hello.get("ok"):
        child.close()
        kind, error = hello.get("kind"), str(hello.get("error"))
        if kind == "missing":
            raise MissingExtraError("paddle", "import-paddle") from RuntimeError(
                f"{python}: {error}"
            )
        if kind == "corrupt":
            raise CorruptArtifactError(str(program), error)
        raise UnsupportedModelError(
            f"paddle2onnx could not convert '{program.name}': {error}",
            hint="an operator paddle2onnx has no mapping for is named above; try another --opset",
        )
    log.info("paddle %s in %s converted %s", hello.get("paddle"), python, program.name)
    return Imported(
        onnx_path=out,
        source=SourceInfo("paddle", hello.get("paddle"), str(program), program.suffix.lstrip(".")),
        reference=child.reference,
        notes=[f"converted by paddle {hello.get('paddle')} in {python} ({ENV})"],
        keep_alive=child,
    )


def _reply(proc: subprocess.Popen[str], scratch: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        code = proc.wait(timeout=STOP_TIMEOUT_S)
        raise UnsupportedModelError(
            f"the Paddle child process ended (exit code {code}) without an answer: "
            f"{_log_tail(scratch)}"
        )
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise InferenceError(f"the Paddle child process said {line[:200]!r}") from exc
    return reply if isinstance(reply, dict) else {"ok": False, "error": repr(reply)}


def _log_tail(scratch: Path, n: int = 1500) -> str:
    try:
        return (scratch / "paddle.log").read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[str], scratch: Path) -> None:
    """End the child (EOF on its stdin, then a kill if it lingers) and remove its scratch."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=STOP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(scratch, ignore_errors=True)
