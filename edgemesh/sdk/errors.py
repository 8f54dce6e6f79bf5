"""The gateway's error bodies turned back into ``edgemesh.errors`` classes.

The gateway answers an ``EdgemeshError`` with an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` (``/v1``, ``/api``) or
the Open Inference Protocol's ``{"error": "message"}`` (``/v2``). The client
raises the same class the server raised, found in this order:

1. ``code`` is the name of an ``edgemesh.errors`` class (what the gateway
   sends for every error that is not a ``RequestError``, with status 503);
2. ``code`` is one a request error always carries (``CODES``);
3. the HTTP status (``STATUS``): 404 ``NotFoundError``, 409
   ``ConflictError``, 429 ``OverloadedError`` (``retry_after_s`` from
   ``Retry-After``), 401/403 ``AuthError``, 503 ``ModelUnavailableError``,
   other 4xx ``RequestError``; on ``/v2``, whose body has no code,
   ``OIP_STATUS`` (400 ``TensorError``, 503 ``InferenceError``);
4. anything else: ``GatewayError``.

Errors of the SDK itself (all ``EdgemeshError`` subclasses, so one
``except EdgemeshError`` catches everything)::

    EdgemeshError
    ├── GatewayError              an answer that is no edgemesh error (5xx HTML, a proxy)
    ├── GatewayUnreachableError   no connection, or the read timed out (httpx error as cause)
    ├── JobFailedError            a management job ended "failed" (``.job`` holds it)
    └── JobTimeoutError           a waited-for job still ran at the deadline (``.job``)

Every raised error carries ``status`` (HTTP status or None) and ``body``.
"""

from __future__ import annotations

import json
from typing import Any

from edgemesh import errors as em
from edgemesh.errors import EdgemeshError


class GatewayError(EdgemeshError):
    """The gateway answered with something that is not an edgemesh error body."""


class GatewayUnreachableError(EdgemeshError):
    """The request never got an answer: connection refused, DNS, or a timeout."""


class JobFailedError(EdgemeshError):
    """A management job (deploy, undeploy, ...) ended in the "failed" state."""

    def __init__(self, message: str, *, job: Any = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.job = job


class JobTimeoutError(EdgemeshError):
    """A waited-for job was still running at the deadline (``.job``: its last state)."""

    def __init__(self, message: str, *, job: Any = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.job = job


CODES: dict[str, type[EdgemeshError]] = {
    "overloaded": em.OverloadedError,
    "model_unavailable": em.ModelUnavailableError,
    "invalid_tensor": em.TensorError,
    "context_length_exceeded": em.ContextOverflowError,
    "invalid_api_key": em.AuthError,
}
"""Codes that name one class wherever they appear."""

STATUS: dict[int, type[EdgemeshError]] = {
    401: em.AuthError,
    403: em.AuthError,
    404: em.NotFoundError,
    409: em.ConflictError,
    429: em.OverloadedError,
    503: em.ModelUnavailableError,
}


OIP_STATUS: dict[int, type[EdgemeshError]] = {
    400: em.TensorError,
    401: em.AuthError,
    404: em.NotFoundError,
    429: em.OverloadedError,
    503: em.InferenceError,
}
"""The Open Inference Protocol's body is only ``{"error": message}``: its
status is all there is (/v2 answers 400 for a bad tensor or body, 503 when
the engine failed)."""


def error_classes() -> dict[str, type[EdgemeshError]]:
    """Every ``EdgemeshError`` class of ``edgemesh.errors``, by name."""
    out: dict[str, type[EdgemeshError]] = {}
    for name in dir(em):
        obj = getattr(em, name)
        if isinstance(obj, type) and issubclass(obj, EdgemeshError):
            out[obj.__name__] = obj
    return out


def _make(cls: type[EdgemeshError], message: str, **attrs: Any) -> EdgemeshError:
    """An instance of ``cls`` holding the server's message, whatever its
    constructor's signature (``MissingExtraError(module, extra)`` and the like):
    the message already says what the server's hint said."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    defaults = {"hint": None, "param": None, "code": None}
    for key, value in {**defaults, **attrs}.items():
        setattr(exc, key, value)
    return exc


def error_from_response(status: int, content: bytes, headers: Any = None) -> EdgemeshError:
    """The exception for an HTTP error answer (``status`` >= 400)."""
    try:
        body = json.loads(content or b"null")
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    table = STATUS
    if isinstance(err, str):  # the Open Inference Protocol's body
        err, table = {"message": err}, OIP_STATUS
    if not isinstance(err, dict):
        text = content[:300].decode("utf-8", "replace") if content else ""
        exc = _make(GatewayError, f"the gateway answered HTTP {status}: {text}".strip())
        exc.status, exc.body = status, body  # type: ignore[attr-defined]
        return exc
    message = str(err.get("message") or f"HTTP {status}")
    code = err.get("code")
    cls = (
        error_classes().get(str(code))
        or CODES.get(str(code))
        or table.get(status)
        or (em.RequestError if 400 <= status < 500 else GatewayError)
    )
    attrs: dict[str, Any] = {"param": err.get("param"), "code": code}
    if issubclass(cls, em.OverloadedError):
        attrs["retry_after_s"] = _retry_after(headers)
    if issubclass(cls, em.MeshSettlingError):
        attrs["settling"] = []
    exc = _make(cls, message, **attrs)
    exc.status, exc.body = status, body  # type: ignore[attr-defined]
    return exc


def _retry_after(headers: Any) -> float:
    try:
        return float((headers or {}).get("retry-after", 1.0))
    except (TypeError, ValueError):
        return 1.0


# The body's ``type`` for each status (edgemesh.gateway.errors), read back for
# errors sent inside a stream, whose HTTP status was already 200.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "conflict_error": 409,
    "rate_limit_error": 429,
    "service_unavailable": 503,
    "server_error": 500,
}


def stream_error(data: dict[str, Any]) -> EdgemeshError:
    """The exception for an error sent mid-stream (``data: {"error": {...}}``)."""
    err = data.get("error")
    kind = err.get("type") if isinstance(err, dict) else None
    return error_from_response(_TYPE_STATUS.get(str(kind), 500), json.dumps(data).encode())
