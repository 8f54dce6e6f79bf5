"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from edgemesh.errors import EdgemeshError, OverloadedError, RequestError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "server_error",
}


def error_body(
    message: str, status: int, *, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    message: str,
    status: int,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, status, param=param, code=code), status, headers=headers
    )


# Pydantic puts the tried union member in the location ("prompt.str"); clients
# want only the field path.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|literal\[.*\]|[a-z-]+\[.*\])$", re.I)


def validation_response(exc: ValidationError | RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    parts = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(p for p in parts if not _TYPE_TAG.match(p)) or None
    return error_response(
        f"{param or 'body'}: {first.get('msg')}", 400, param=param, code="invalid_value"
    )


def edgemesh_response(exc: EdgemeshError) -> JSONResponse:
    if isinstance(exc, OverloadedError):
        return error_response(
            str(exc),
            429,
            code=exc.code,
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        )
    if isinstance(exc, RequestError):
        return error_response(str(exc), exc.status, param=exc.param, code=exc.code)
    log.error("request failed: %s", exc)
    return error_response(str(exc), 503, code=type(exc).__name__)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

    @app.exception_handler(ValidationError)
    async def _pydantic(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_response(exc)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(
            f"the request body is not valid JSON: {exc}", 400, code="invalid_json"
        )

    @app.exception_handler(EdgemeshError)
    async def _edgemesh(_: Request, exc: EdgemeshError) -> JSONResponse:
        return edgemesh_response(exc)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: still OpenAI-shaped, with the request id to find it.
        from edgemesh.gateway.observe import request_id

        log.exception("unhandled error in %s [request %s]", request.url.path, request_id.get())
        return error_response(
            f"internal error ({type(exc).__name__}); request id {request_id.get()}", 500
        )
