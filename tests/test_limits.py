"""ServingLimits: one default per serving knob, its wire form, and the path from
the ``edgemesh serve`` flags through the engine to the backend.

The served model is the tiny llama package (tests/fixtures) on onnxruntime
at fp32; the CLI test runs the real ``edgemesh serve`` in a child process.
"""

from __future__ import annotations

import ast
import inspect
import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgemesh.backends.base import BackendOptions, SeqInput
from edgemesh.engine import EngineConfig
from edgemesh.errors import ConfigError, InferenceError
from edgemesh.limits import DEFAULT_LIMITS, LIMITS_VERSION, ServingLimits
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource
from tests.conftest import free_port
from tests.fixtures.backend_models import CONFORMANCE_ARCH
from tests.fixtures.tiny_models import shared_tiny_package

ROOT = Path(__file__).resolve().parents[1]
# Not the defaults, and each different from the others, so a value that
# lands in the wrong knob shows.
ODD = ServingLimits(
    context_length=96,
    max_sequences=3,
    max_queue=5,
    prefill_chunk=40,
    prefill_budget=24,
    threads=1,
    default_max_tokens=17,
)


@pytest.fixture(scope="module")
def package() -> Path:
    return shared_tiny_package(CONFORMANCE_ARCH)


def test_each_knob_takes_its_default_from_the_limits() -> None:
    from edgemesh.cli import serve
    from edgemesh.router.stage import StageSpec

    assert EngineConfig is ServingLimits
    assert LocalOptions().limits == DEFAULT_LIMITS
    backend = BackendOptions()
    assert (backend.threads, backend.max_sequences) == (
        DEFAULT_LIMITS.threads,
        DEFAULT_LIMITS.max_sequences,
    )
    stage = StageSpec(index=0, box="b", start=0, stop=2, num_layers=2)
    assert (stage.threads, stage.max_sequences) == (
        DEFAULT_LIMITS.threads,
        DEFAULT_LIMITS.max_sequences,
    )
    flags = inspect.signature(serve.command).parameters
    assert flags["context"].default == DEFAULT_LIMITS.context_length
    assert flags["max_sequences"].default == DEFAULT_LIMITS.max_sequences
    assert flags["max_queue"].default == DEFAULT_LIMITS.max_queue


# Knobs of an LLM's serving that may have a default only in edgemesh/limits.py.
_LIMIT_NAMES = {"max_sequences", "prefill_chunk", "prefill_budget", "default_max_tokens"}


def _is_number(node: ast.AST | None) -> bool:
    """A number written in place (None, "no cap", is not a default of its own)."""
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    )


def _literal_defaults(tree: ast.AST) -> list[tuple[str, int]]:
    """(name, line) of every dataclass field or parameter among ``_LIMIT_NAMES``
    whose default is a number written in place."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id in _LIMIT_NAMES and _is_number(node.value):
                found.append((node.target.id, node.lineno))
        elif isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            with_default = positional[len(positional) - len(node.defaults) :]
            pairs = list(zip(with_default, node.defaults, strict=True))
            keywords = zip(node.kwonlyargs, node.kw_defaults, strict=True)
            pairs += [(a, d) for a, d in keywords if d is not None]
            for arg, default in pairs:
                if arg.arg in _LIMIT_NAMES and _is_number(default):
                    found.append((arg.arg, default.lineno))
    return found


def test_no_other_module_writes_a_default_of_its_own() -> None:
    stray = []
    for folder in ("edgemesh", "backends", "sharding", "mesh"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            if file == ROOT / "edgemesh" / "limits.py":
                continue
            for name, line in _literal_defaults(ast.parse(file.read_text(), str(file))):
                stray.append(f"{file.relative_to(ROOT)}:{line} {name}")
    assert not stray, "defaults outside ServingLimits: " + ", ".join(stray)


def test_the_wire_form_round_trips_and_refuses_what_it_does_not_know() -> None:
    data = json.loads(json.dumps(ODD.to_dict()))
    assert data["version"] == LIMITS_VERSION
    assert ServingLimits.from_dict(data) == ODD
    # a record written before a field existed: that field takes its default
    older = {k: v for k, v in data.items() if k != "prefill_budget"}
    assert ServingLimits.from_dict(older).prefill_budget == DEFAULT_LIMITS.prefill_budget
    with pytest.raises(ConfigError, match="unknown serving limits"):
        ServingLimits.from_dict({**data, "max_batch": 4})
    with pytest.raises(ConfigError, match="version"):
        ServingLimits.from_dict({**data, "version": LIMITS_VERSION + 1})
    with pytest.raises(ConfigError, match="JSON object"):
        ServingLimits.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"max_sequences": 0},
        {"context_length": -1},
        {"threads": 0},
        {"max_queue": -1},
        {"prefill_chunk": 2.5},
        {"max_sequences": True},
    ],
)
def test_bad_values_are_refused_with_a_config_error(change: dict) -> None:
    with pytest.raises(ConfigError) as caught:
        DEFAULT_LIMITS.replace(**change)
    assert caught.value.hint


def test_capped_never_raises_a_limit() -> None:
    capped = ODD.capped(context_length=64, max_sequences=10)
    assert (capped.context_length, capped.max_sequences) == (64, ODD.max_sequences)
    assert ODD.capped() is ODD


def test_limits_reach_the_engine_and_the_backend(package: Path) -> None:
    service = load_service(
        ModelSource("tiny", package, "package"),
        LocalOptions(ODD, backend="onnxruntime", precision="fp32"),
    )
    try:
        assert service.engine.config == ODD
        assert service.default_max_tokens == ODD.default_max_tokens
        assert service.info["limits"] == ODD.to_dict()
        (backend,) = service.engine.pipeline.backends
        assert backend.options.threads == ODD.threads
        assert backend.context_length == ODD.context_length
        assert backend.max_sequences == ODD.max_sequences
        # the slot count is really enforced: one sequence more is refused
        for seq in range(ODD.max_sequences):
            backend.forward([SeqInput(100 + seq, 0, tokens=np.array([1, 2]))])
        with pytest.raises(InferenceError, match="slots are busy"):
            backend.forward([SeqInput(200, 0, tokens=np.array([1, 2]))])
        for seq in range(ODD.max_sequences):
            backend.release(100 + seq)
    finally:
        service.close()


def test_serve_flags_reach_the_served_model(package: Path, tmp_path: Path) -> None:
    """``edgemesh serve --context --max-sequences --max-queue --threads``, run for
    real: the model card shows the limits the engine runs under."""
    from edgemesh.reexec import edgemesh_argv

    port = free_port()
    argv = edgemesh_argv(
        "serve",
        "--model",
        str(package),
        "--port",
        str(port),
        "--backend",
        "onnxruntime",
        "--precision",
        "fp32",
        "--context",
        str(ODD.context_length),
        "--max-sequences",
        str(ODD.max_sequences),
        "--max-queue",
        str(ODD.max_queue),
        "--threads",
        str(ODD.threads),
        "--log-level",
        "warning",
    )
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        card = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                card = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert card is not None, f"serve did not answer: {log.read_text()[-2000:]}"
        (model,) = card["data"]
        assert model["context_length"] == ODD.context_length
        served = ServingLimits.from_dict(model["edgemesh"]["limits"])
        assert served == DEFAULT_LIMITS.replace(
            context_length=ODD.context_length,
            max_sequences=ODD.max_sequences,
            max_queue=ODD.max_queue,
            threads=ODD.threads,
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
