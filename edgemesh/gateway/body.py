"""Reading a request body into JSON so that no input can reach a 5xx.

Python's ``json`` accepts things a gateway must refuse with a 400: bytes
that are not UTF-8 (UnicodeDecodeError), integers past 4,300 digits
(ValueError), ``NaN``/``Infinity``, nesting deep enough to hit the recursion
limit (RecursionError), and strings with lone UTF-16 surrogates (``"\\ud800"``),
which parse fine and then fail when a tokenizer encodes them. Each becomes
a ``RequestError`` naming what is wrong (and, for a bad string, where).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from edgemesh.errors import RequestError

MAX_BODY_BYTES = 8 << 20
"""Far above a full context of text (a 32k-token prompt is ~130 KB)."""
MAX_DEPTH = 32


class BodyTooLarge(RequestError):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refusing more than ``limit`` bytes even when chunked."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object from ``raw`` or a ``RequestError`` (code ``invalid_json``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"the request body is not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})",
            code="invalid_json",
        ) from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        body = json.loads(text or "null", parse_constant=_constant)
    except RecursionError as exc:
        raise RequestError("the request body is nested too deeply", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, digit limits, NaN/Infinity
        raise RequestError(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    check_values(body)
    return body


def check_values(value: Any, path: str = "", depth: int = 0) -> None:
    """Refuse nesting past ``MAX_DEPTH`` and strings that are not valid Unicode."""
    if depth > MAX_DEPTH:
        raise RequestError(
            f"the request body nests deeper than {MAX_DEPTH} levels",
            param=path or None,
            code="invalid_json",
        )
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path)
            check_values(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_values(item, f"{path}.{i}" if path else str(i), depth + 1)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{path or 'body'}: the string holds a lone UTF-16 surrogate "
            f"(U+{ord(text[exc.start]):04X}), which is not text",
            param=path or None,
            code="invalid_value",
        ) from exc
