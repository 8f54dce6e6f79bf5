"""FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health.

Handlers parse the body themselves (not FastAPI's body injection) so every
bad input, invalid JSON included, gets an OpenAI-style 400 instead of 422.
Streaming uses server-sent events; a client that disconnects cancels its
sequence, which frees the KV cache on every shard.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from edgemesh import __version__
from edgemesh.engine import Event, Generation
from edgemesh.errors import ContextOverflowError, RequestError
from edgemesh.gateway import dashboard, errors
from edgemesh.gateway.schemas import ChatRequest, CompletionRequest, _Request
from edgemesh.gateway.service import ModelService
from edgemesh.sampling import SamplingParams

_OPEN_PATHS = {"/health", "/", "/dashboard"}


def create_app(
    services: Sequence[ModelService],
    *,
    api_keys: Sequence[str] = (),
    boxes: dashboard.BoxesProvider | None = None,
) -> FastAPI:
    """Build the gateway for ``services``; ``api_keys`` empty = no auth.

    ``boxes`` lists the mesh's boxes for the dashboard (default: this box)."""
    app = FastAPI(title="edgemesh", version=__version__, docs_url=None, redoc_url=None)
    app.state.services = {s.name: s for s in services}
    app.state.started = time.time()
    errors.install(app)
    dashboard.install(app, boxes)
    if api_keys:
        app.add_middleware(_ApiKeys, keys=tuple(api_keys))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": list(app.state.services),
            "uptime_s": round(time.time() - app.state.started, 1),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": s.name,
                    "object": "model",
                    "created": s.created,
                    "owned_by": "edgemesh",
                    "context_length": s.context_length,
                    **({"edgemesh": s.info} if s.info else {}),
                }
                for s in app.state.services.values()
            ],
        }

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {
            name: {"load": s.engine.load, **s.engine.stats.to_dict(), "info": s.info}
            for name, s in app.state.services.items()
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = CompletionRequest.model_validate(await _json_body(request))
        service = _service(app, body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]
            _check_ids(ids, service)
        else:
            text = prompt if isinstance(prompt, str) else prompt[0]
            ids = service.tokenizer.encode(str(text))
        gen = _submit(service, ids, body, default_max=16)
        return await _respond(request, service, gen, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = ChatRequest.model_validate(await _json_body(request))
        service = _service(app, body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            m.setdefault("content", "")
        ids = service.tokenizer.encode_chat(messages)
        gen = _submit(
            service,
            ids,
            body,
            default_max=service.default_max_tokens,
            max_tokens=body.requested_max_tokens,
        )
        return await _respond(request, service, gen, body, chat=True)

    return app


class _ApiKeys(BaseHTTPMiddleware):
    def __init__(self, app: Any, keys: tuple[str, ...]) -> None:
        super().__init__(app)
        self._keys = tuple(k.encode() for k in keys)

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path in _OPEN_PATHS:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self._keys):
            return errors.error_response(
                "invalid or missing API key (Authorization: Bearer)", 401, code="invalid_api_key"
            )
        return await call_next(request)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    body = json.loads(raw or b"null")
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


def _service(app: FastAPI, name: str) -> ModelService:
    services: dict[str, ModelService] = app.state.services
    if name not in services:
        raise _NotFound(f"the model '{name}' does not exist; available: {', '.join(services)}")
    return services[name]


class _NotFound(RequestError):
    status = 404

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_not_found")


def _check_ids(ids: list[int], service: ModelService) -> None:
    vocab = service.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")


def _submit(
    service: ModelService,
    ids: list[int],
    body: _Request,
    *,
    default_max: int,
    max_tokens: int | None = None,
) -> Generation:
    requested = max_tokens if max_tokens is not None else body.max_tokens
    room = service.context_length - len(ids)
    if room <= 0:
        raise ContextOverflowError(
            f"the prompt has {len(ids)} tokens but this model's context is "
            f"{service.context_length} tokens",
            param="messages" if hasattr(body, "messages") else "prompt",
            code="context_length_exceeded",
        )
    limit = requested if requested is not None else min(default_max, room)
    params = SamplingParams(
        max_tokens=limit,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=body.stop_list,
        ignore_eos=body.ignore_eos,
    )
    return service.engine.submit(ids, params)


async def _respond(
    request: Request, service: ModelService, gen: Generation, body: _Request, *, chat: bool
) -> Response:
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        return StreamingResponse(
            _sse(gen, service.name, ident, created, chat=chat, usage=body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    text: list[str] = []
    reason = "stop"
    try:
        async for event in gen.events():
            text.append(event.text)
            if event.finish_reason is not None:
                reason = event.finish_reason
                if event.error is not None:
                    return errors.edgemesh_response(event.error)
    finally:
        gen.cancel()
    content = "".join(text)
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice["text"] = content
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": service.name,
            "choices": [choice],
            "usage": _usage(gen),
        }
    )


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


async def _sse(
    gen: Generation, model: str, ident: str, created: int, *, chat: bool, usage: bool
) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(event: Event | None, *, first: bool = False) -> bytes:
        reason = event.finish_reason if event else None
        text = event.text if event else ""
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""}
                if first
                else ({"content": text} if text else {})
            )
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "finish_reason": reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        data = {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}
        return _event(data)

    try:
        if chat:
            yield chunk(None, first=True)
        async for event in gen.events():
            if event.error is not None:
                yield _event(
                    errors.error_body(str(event.error), 503, code=type(event.error).__name__)
                )
                break
            if event.text or event.finish_reason:
                yield chunk(event)
        if usage:
            yield _event(
                {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(gen),
                }
            )
        yield b"data: [DONE]\n\n"
    finally:
        # Runs on client disconnect too (the task is cancelled): frees the KV cache.
        gen.cancel()


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
