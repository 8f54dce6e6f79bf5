"""Typed errors: every failure a user can act on has a class here.

    EdgemeshError
    ├── ConfigError                 bad option, flag or config file
    │   └── SlimInputError          slimming input refused before any work (short
    │                               calibration, ratio, empty layer, tokenizer)
    ├── MissingExtraError           an optional dependency is not installed
    ├── FingerprintError            a box's system files could not be read
    ├── ModelError
    │   ├── ModelNotFoundError      no file/folder where the model should be
    │   ├── CorruptArtifactError    size or sha256 does not match the manifest
    │   ├── UnsupportedModelError   architecture/format edgemesh cannot run
    │   │   └── UnsupportedOpError  an operator (named, with its opset) a step cannot take
    │   ├── ConversionMismatchError the converted graph disagrees with the source framework
    │   └── CalibrationError        calibration samples that do not fit the model's inputs
    ├── BackendError
    │   ├── BackendUnavailableError backend not installed or hardware absent
    │   ├── ShardLoadError          the runtime refused to load a shard
    │   └── InferenceError          the runtime failed during forward
    ├── PlanError
    │   └── InfeasiblePlanError     the model cannot fit on the given boxes
    ├── MeshError
    │   ├── DiscoveryError          mDNS announce/browse failed
    │   ├── AuthError               wrong or missing mesh secret
    │   ├── BoxLostError            a box vanished mid-generation
    │   ├── MeshSettlingError       the mesh did not settle in time (names what still settles)
    │   └── RecordError             a deployment record that cannot be read
    │       └── RecordVersionError  a record of another format version (names both)
    └── RequestError                a client request that cannot be served
        ├── ContextOverflowError    prompt + max_tokens exceed the context
        ├── OverloadedError         the queue is full; retry later
        ├── TensorError             a request tensor of the wrong name/dtype/shape/size
        ├── ModelUnavailableError   no boxes left that can hold the model (503)
        ├── NotFoundError           no such box, model, package or job (404)
        └── ConflictError           the action clashes with the current state (409)

Third-party exceptions are translated at the boundary with
``raise ... from exc`` so the cause is never hidden.
"""

from __future__ import annotations


class EdgemeshError(Exception):
    """Base class; ``hint`` says what the user must do to fix it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.hint})" if self.hint else base


class ConfigError(EdgemeshError):
    pass


class SlimInputError(ConfigError):
    """``edgemesh slim`` input refused before any work is done: calibration text
    too short, a ratio outside its range, a prune that would empty a layer, a
    student whose tokenizer differs from the teacher's."""


class MissingExtraError(EdgemeshError):
    """An optional dependency is missing; the message names the pip extra."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"'{module}' is not installed",
            hint=f"pip install 'edgemesh[{extra}]'",
        )
        self.module = module
        self.extra = extra


class FingerprintError(EdgemeshError):
    pass


class ModelError(EdgemeshError):
    pass


class ModelNotFoundError(ModelError):
    pass


class CorruptArtifactError(ModelError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"artifact '{path}' is corrupt: {reason}",
            hint="re-run `edgemesh convert` or copy the file again",
        )
        self.path = path


class UnsupportedModelError(ModelError):
    pass


class BackendError(EdgemeshError):
    pass


class BackendUnavailableError(BackendError):
    pass


class ShardLoadError(BackendError):
    pass


class InferenceError(BackendError):
    pass


class PlanError(EdgemeshError):
    pass


class InfeasiblePlanError(PlanError):
    pass


class MeshError(EdgemeshError):
    pass


class DiscoveryError(MeshError):
    pass


class AuthError(MeshError):
    pass


class BoxLostError(MeshError):
    pass


class MeshSettlingError(MeshError):
    """The mesh was still settling (electing, joining Ray) when a wait ran out;
    ``settling`` lists what was still under way."""

    def __init__(self, message: str, *, settling: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.settling = list(settling)


class RecordError(MeshError):
    """A deployment record (``deployments.json``, the head's KV) that cannot be read."""


class RecordVersionError(RecordError):
    """A record written in another format version than this edgemesh reads;
    ``found`` is the version it carries, ``expected`` the one read here."""

    def __init__(
        self,
        message: str,
        *,
        found: object = None,
        expected: int | None = None,
        hint: str | None = "run the same edgemesh version on every box of the mesh",
    ) -> None:
        super().__init__(message, hint=hint)
        self.found = found
        self.expected = expected


class RequestError(EdgemeshError):
    """A request that cannot be served; ``status`` is the HTTP status."""

    status: int = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextOverflowError(RequestError):
    status = 400

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = "context_length_exceeded",
    ) -> None:
        # OpenAI's code by default, so clients (edgemesh.Client) can tell it apart;
        # the gateway passes None for an empty prompt (nothing overflowed).
        super().__init__(message, param=param, code=code)


class OverloadedError(RequestError):
    status = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


def require(module: str, extra: str):
    """Import an optional heavy dependency or raise MissingExtraError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra) from exc


class ModelUnavailableError(RequestError):
    """The model cannot be served right now (e.g. the remaining boxes of the
    mesh cannot hold it after a box was lost); HTTP 503."""

    status = 503

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, code="model_unavailable")
        self.hint = hint


class NotFoundError(RequestError):
    """A management request names a box, model, package or job that does not exist (404)."""

    status = 404


class ConflictError(RequestError):
    """A management action that clashes with what runs now: a model name
    already served, drain on a single box, an action already running (409)."""

    status = 409


class UnsupportedOpError(UnsupportedModelError):
    """An operator a conversion step or engine cannot take; names the op and opset."""

    def __init__(self, op: str, opset: int | None, where: str, *, hint: str | None = None) -> None:
        at = f" (opset {opset})" if opset is not None else ""
        super().__init__(f"operator '{op}'{at} is not supported by {where}", hint=hint)
        self.op = op
        self.opset = opset


class ConversionMismatchError(ModelError):
    """The ONNX graph's outputs disagree with the source framework's own outputs."""


class CalibrationError(ModelError):
    """Calibration/eval samples that cannot be fed to the model (shape, dtype, count)."""


class TensorError(RequestError):
    """A request tensor that does not match the model's input (HTTP 400)."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="invalid_tensor")
