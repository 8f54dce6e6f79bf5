"""The backend contract: load a shard, run forward, release a sequence, close.

A *shard* is a half-open range of transformer layers ``[start, stop)`` of
one model. The first shard (``start == 0``) owns the token embedding and
takes token ids; later shards take hidden states. The last shard
(``stop == num_layers``) owns the final norm and the LM head and returns
logits. A whole-model backend (e.g. llama.cpp on a GGUF) is a shard with
``[0, num_layers)``.

Backends never tokenize or sample; that lives in the engine/router. Each
backend keeps the KV cache of the sequences it has seen, keyed by the
caller's ``seq_id``, until ``release(seq_id)``.

All methods block; callers keep them off the event loop (worker thread or
Ray actor).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgemesh.errors import ConfigError
from edgemesh.limits import DEFAULT_LIMITS, ServingLimits

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class LayerRange:
    """Half-open range of layer indices ``[start, stop)``."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ConfigError(f"invalid layer range [{self.start}, {self.stop})")

    def __len__(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.stop})"


@dataclass(frozen=True)
class ShardSpec:
    """What to load: a model (package dir or .gguf file) and a layer range."""

    model: Path
    layers: LayerRange
    num_layers: int
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.layers.stop > self.num_layers:
            raise ConfigError(
                f"layer range {self.layers} exceeds the model's {self.num_layers} layers"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{self.precision}', expected one of {PRECISIONS}")

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.stop == self.num_layers

    @property
    def is_whole(self) -> bool:
        return self.is_first and self.is_last


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver exposes at least one GPU (no import, no CUDA call): the
    probe every backend with a CUDA device shares."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


@dataclass(frozen=True)
class Capabilities:
    """Static facts about a backend, so the core never branches on its name."""

    partial_ranges: bool
    """Can run any ``[start, stop)``; False means whole model only."""
    precisions: tuple[str, ...]
    artifact_format: str
    """``"onnx"`` (a converted edgemesh package) or ``"gguf"``."""
    max_batch: int = 64
    needs_compiled_artifact: bool = False
    """Builds a per-range engine/blob from the ONNX before it can run."""
    devices: tuple[str, ...] = ("cpu",)


@dataclass(frozen=True)
class BoxFacts:
    """What a backend reads to judge whether it suits a box (``Backend.suits``):
    the fingerprint's static facts, so judging probes and imports nothing."""

    arch: str
    """``uname -m``: ``x86_64``, ``aarch64``..."""
    cpu_vendor: str | None = None
    """``/proc/cpuinfo`` vendor: ``GenuineIntel``, ``AuthenticAMD``; None on ARM."""
    features: tuple[str, ...] = ()
    """CPU flags (``avx2``, ``avx512_vnni``, ``asimddp``...)."""
    accelerators: tuple[str, ...] = ()
    """Accelerator kinds found (``nvidia-gpu``, ``jetson-gpu``, ``rockchip-npu``...)."""
    memory_limit_bytes: int = 0


@dataclass(frozen=True)
class BackendOptions:
    """Runtime knobs from the fingerprint and config (never from env vars).

    The serving limits' share (threads, context, sequence slots) comes from
    ``ServingLimits`` (``for_limits``); the defaults here are its defaults."""

    threads: int | None = DEFAULT_LIMITS.threads
    device: str = "cpu"
    cache_dir: Path | None = None
    context_length: int | None = None
    """None: the model's own context."""
    max_sequences: int = DEFAULT_LIMITS.max_sequences

    @classmethod
    def for_limits(
        cls, limits: ServingLimits, *, device: str = "cpu", cache_dir: Path | None = None
    ) -> BackendOptions:
        """The options a backend opens with to serve under ``limits``."""
        return cls(
            threads=limits.threads,
            device=device,
            cache_dir=cache_dir,
            context_length=limits.context_length,
            max_sequences=limits.max_sequences,
        )


@dataclass
class SeqInput:
    """One sequence's slice of a forward call.

    Exactly one of ``tokens`` (first shard) or ``hidden`` (later shards) is
    set. ``start_pos`` is the position of the first new token, i.e. the
    number of tokens already in this sequence's KV cache.
    """

    seq_id: int
    start_pos: int
    tokens: np.ndarray | None = None  # int64 [S]
    hidden: np.ndarray | None = None  # float32/float16 [S, H]
    logits: str = "last"  # "last" -> [1, V]; "all" -> [S, V] (last shard only)
    # "pooled": a stateless pass from start_pos 0 (embeddings): no KV cache kept,
    # no slot taken; the last shard returns the final-norm hidden states
    # mean-pooled over the S tokens [1, H], the others hidden states [S, H].

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.hidden is None):
            raise ConfigError("SeqInput needs exactly one of tokens or hidden")
        if self.start_pos < 0:
            raise ConfigError(f"start_pos must be >= 0, got {self.start_pos}")

    @property
    def length(self) -> int:
        data = self.tokens if self.tokens is not None else self.hidden
        assert data is not None
        return int(data.shape[0])


class Backend(ABC):
    """Base class of every backend. Subclasses set the class variables.

    Construction loads the shard and raises ``ModelNotFoundError``,
    ``CorruptArtifactError``, ``ShardLoadError`` or
    ``BackendUnavailableError``; ``forward`` raises ``InferenceError``.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    extra: ClassVar[str]
    """The pip extra that installs the runtime."""
    module: ClassVar[str]
    """The runtime's import name, probed by ``available()``."""
    preferred_precision: ClassVar[str | None] = None
    """The weight precision this backend's hardware runs best (fp16 on tensor
    cores, int8 on an NPU). When this backend ranks first on a box, it is the
    box's default precision; None lets the CPU rule decide
    (``edgemesh.fingerprint.policy``)."""
    matmul_probe: ClassVar[str | None] = None
    """The micro-benchmark that prices this backend when a box is measured
    (a key of ``edgemesh.fingerprint.kernels.RUNNERS``: ``onnxruntime``,
    ``openvino``); None: priced from the box's numpy reference (``cpu``)."""

    def __init__(self, shard: ShardSpec, options: BackendOptions | None = None) -> None:
        self.shard = shard
        self.options = options or BackendOptions()

    @classmethod
    def suits(cls, box: BoxFacts) -> int | None:
        """How well this backend suits ``box``: a rank, higher is better, or None
        when the hardware does not call for it (then the fingerprint never
        lists it). Reads only ``box``; imports nothing. In-tree ranks:
        tensorrt 50, rknn 40, openvino 30, llamacpp 20, onnxruntime 10."""
        return None

    @classmethod
    def installed(cls) -> bool:
        """Whether the runtime module is importable here (``find_spec`` only)."""
        try:
            return importlib.util.find_spec(cls.module) is not None
        except (ImportError, ValueError):
            # A broken half-installed package raises here; it will not import either.
            return False

    @classmethod
    def available(cls) -> str | None:
        """None when usable here, else why not. Cheap: imports nothing."""
        if importlib.util.find_spec(cls.module) is None:
            return f"'{cls.module}' is not installed (pip install 'edgemesh[{cls.extra}]')"
        return None

    @classmethod
    def device_unavailable(cls, device: str) -> str | None:
        """None when ``device`` (one of ``capabilities.devices``, optionally
        ``kind:index``) can be used here, else why not; asked only once
        ``available()`` is None.

        ``available()`` already covers the backend's first device (the CPU,
        or the GPU/NPU of a hardware-only backend). A backend with further
        devices overrides this with a probe of its own (which may import its
        runtime); without one the device counts as absent.
        """
        kind = device.partition(":")[0]
        if kind in ("cpu", cls.capabilities.devices[0]):
            return None
        return f"{cls.name} has no probe for device '{device}'"

    @abstractmethod
    def forward(self, batch: Sequence[SeqInput]) -> list[np.ndarray]:
        """Run the shard on a batch of sequences.

        Returns one array per input, in order: hidden states ``[S, H]``
        (float32) from non-last shards, logits ``[1, V]`` or ``[S, V]``
        (float32) from the last shard.
        """

    @abstractmethod
    def release(self, seq_id: int) -> None:
        """Drop a sequence's KV cache. Unknown ids are ignored."""

    def fork(self, src_seq_id: int, dst_seq_id: int) -> bool:
        """Give ``dst_seq_id`` a copy of ``src_seq_id``'s KV cache (n samples of one
        prompt share its prefill). False when this backend cannot (the default)
        or has no room; the caller then prefills ``dst`` itself."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Free everything. Idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
