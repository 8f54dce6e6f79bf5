"""``edgemesh.Client`` (sync) and ``edgemesh.AsyncClient`` (asyncio), over httpx.

Both expose the same methods (``_Api``) and run the same operations
(``edgemesh.sdk.ops``); only sending differs. A client holds one connection
pool: use it as a context manager or call ``close()``.

Errors: every gateway error comes back as the ``edgemesh.errors`` class the
server raised (``edgemesh.sdk.errors``); no answer at all raises
``GatewayUnreachableError`` with the httpx error as its cause.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from edgemesh.errors import require
from edgemesh.sdk import ops
from edgemesh.sdk.config import ClientConfig
from edgemesh.sdk.errors import GatewayUnreachableError, error_from_response
from edgemesh.sdk.ops import Call, Reply, Sleep
from edgemesh.sdk.sse import DONE, parse_line
from edgemesh.sdk.types import Chunk

Messages = str | Sequence[Mapping[str, Any]]


def _messages(messages: Messages) -> list[dict[str, Any]]:
    """A bare string is one user message."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _stream_params(params: dict[str, Any]) -> dict[str, Any]:
    # The last chunk carries the usage unless the caller says otherwise.
    return {"stream_options": {"include_usage": True}, **params}


class _Api:
    """The methods of both clients. On ``AsyncClient`` each returns an awaitable
    (the ``*_stream`` methods an async iterator) of what is documented here."""

    config: ClientConfig

    def _drive(self, op: ops.Op[Any]) -> Any:
        raise NotImplementedError

    def _stream(self, call: Call) -> Any:
        raise NotImplementedError

    # -- OpenAI routes (/v1) ---------------------------------------------------

    def models(self) -> Any:
        """``list[Model]``: the LLMs the gateway serves."""
        return self._drive(ops.models())

    def complete(self, model: str, prompt: str | list[int], **params: Any) -> Any:
        """``Completion`` of ``prompt``; ``params`` are the OpenAI fields
        (``max_tokens``, ``temperature``, ``stop``, ``seed``, ...)."""
        return self._drive(ops.single(ops.completion_call(model, prompt, False, **params)))

    def complete_stream(self, model: str, prompt: str | list[int], **params: Any) -> Any:
        """``Iterator[Chunk]`` of a streamed completion."""
        return self._stream(ops.completion_call(model, prompt, True, **_stream_params(params)))

    def chat(self, model: str, messages: Messages, **params: Any) -> Any:
        """``Completion`` of a chat (``text`` is the assistant's message);
        ``messages`` is a list of ``{"role", "content"}`` or one user string."""
        return self._drive(ops.single(ops.chat_call(model, _messages(messages), False, **params)))

    def chat_stream(self, model: str, messages: Messages, **params: Any) -> Any:
        """``Iterator[Chunk]`` of a streamed chat."""
        call = ops.chat_call(model, _messages(messages), True, **_stream_params(params))
        return self._stream(call)

    # -- Open Inference Protocol (/v2) for graph models ------------------------

    def infer(
        self, model: str, inputs: Mapping[str, Any], *, outputs: Sequence[str] | None = None
    ) -> Any:
        """``dict[str, numpy.ndarray]``: the graph model's outputs for ``inputs``
        (name -> array; dtypes as the model declares, e.g. float32)."""
        return self._drive(ops.infer(model, inputs, outputs))

    def graph_model(self, model: str) -> Any:
        """``dict``: a graph model's OIP metadata (inputs, outputs, platform)."""
        return self._drive(ops.graph_metadata(model))

    # -- management (/api, docs/API.md) -----------------------------------------

    def status(self) -> Any:
        """``Status``: mode, mesh, head and every box with its health and load."""
        return self._drive(ops.status())

    def plan(self, package: str, *, box: str | None = None, name: str | None = None) -> Any:
        """``dict``: the planner's plan for ``package`` (a path on ``box``) over the
        boxes now (``Plan.to_dict()``: stages, precision, predicted tok/s)."""
        return self._drive(ops.plan(package, box, name))

    def deploy(
        self,
        package: str,
        *,
        name: str | None = None,
        box: str | None = None,
        plan: dict[str, Any] | None = None,
        wait: bool = True,
        timeout_s: float = 900.0,
    ) -> Any:
        """``Job``: serve ``package`` (with ``plan``, e.g. one from ``plan()``).
        With ``wait`` (default) returns the finished job, raising the job's error
        if it failed and ``JobTimeoutError`` after ``timeout_s``."""
        return self._drive(
            ops.deploy(
                package,
                name=name,
                box=box,
                plan=plan,
                wait=wait,
                timeout_s=timeout_s,
                poll_s=self.config.poll_s,
            )
        )

    def undeploy(self, name: str, *, wait: bool = True, timeout_s: float = 300.0) -> Any:
        """``Job``: stop serving model ``name`` (waited for, as ``deploy``)."""
        return self._drive(
            ops.undeploy(name, wait=wait, timeout_s=timeout_s, poll_s=self.config.poll_s)
        )

    def job(self, job_id: str) -> Any:
        """``Job``: a management job's current state."""
        return self._drive(ops.job(job_id))

    def __repr__(self) -> str:
        key = "None" if self.config.api_key is None else "'***'"
        return f"{type(self).__name__}({self.config.base_url!r}, api_key={key})"


def _unreachable(config: ClientConfig, exc: Exception) -> GatewayUnreachableError:
    return GatewayUnreachableError(
        f"no answer from the gateway at {config.base_url}: {type(exc).__name__}: {exc}",
        hint="check the URL and that `edgemesh serve` (or the mesh's deploy) is running",
    )


class Client(_Api):
    """A blocking client of an edgemesh gateway.

    ``base_url``: the gateway's root (default ``$EDGEMESH_URL`` or
    ``http://127.0.0.1:8000``); ``api_key`` (default ``$EDGEMESH_API_KEY``)
    is sent as ``Authorization: Bearer``. ``transport`` is an httpx
    transport (``httpx.MockTransport`` in tests, or a custom one).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        poll_s: float = 0.5,
        transport: Any = None,
    ) -> None:
        httpx = require("httpx", "sdk")
        self.config = ClientConfig.resolve(
            base_url, api_key=api_key, timeout_s=timeout_s, poll_s=poll_s
        )
        self._httpx = httpx
        self._http = httpx.Client(
            base_url=self.config.base_url,
            headers=self.config.headers(),
            timeout=self.config.timeout_s,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call) -> Reply:
        try:
            r = self._http.request(
                call.method,
                call.path,
                json=call.json,
                content=call.content,
                headers=call.headers or None,
                params=call.params,
            )
        except self._httpx.TransportError as exc:
            raise _unreachable(self.config, exc) from exc
        if r.status_code >= 400:
            raise error_from_response(r.status_code, r.content, r.headers)
        return Reply(r.status_code, r.headers, r.content)

    def _drive(self, op: ops.Op[Any]) -> Any:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = op.send(None)
                else:
                    step = op.send(self._send(step))
        except StopIteration as done:
            return done.value

    def _stream(self, call: Call) -> Iterator[Chunk]:
        return _SyncStream(self, call)


class _SyncStream:
    """The chunks of one streamed answer; the request is sent at once, so a
    refused request raises where the method was called. ``close()`` (or leaving
    a ``with`` block) drops the connection, which cancels the generation."""

    def __init__(self, client: Client, call: Call) -> None:
        self._client = client
        req = client._http.build_request(
            call.method, call.path, json=call.json, headers=call.headers or None
        )
        try:
            self._response = client._http.send(req, stream=True)
        except client._httpx.TransportError as exc:
            raise _unreachable(client.config, exc) from exc
        if self._response.status_code >= 400:
            content = self._response.read()
            self._response.close()
            raise error_from_response(self._response.status_code, content, self._response.headers)
        self._lines = self._response.iter_lines()

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        try:
            for line in self._lines:
                event = parse_line(line)
                if event == DONE:
                    break
                if isinstance(event, Chunk):
                    return event
        except self._client._httpx.TransportError as exc:
            self.close()
            raise _unreachable(self._client.config, exc) from exc
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Api):
    """The asyncio client: the same methods as ``Client``, awaited
    (``*_stream`` methods return async iterators: ``async for chunk in ...``)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        poll_s: float = 0.5,
        transport: Any = None,
    ) -> None:
        httpx = require("httpx", "sdk")
        self.config = ClientConfig.resolve(
            base_url, api_key=api_key, timeout_s=timeout_s, poll_s=poll_s
        )
        self._httpx = httpx
        self._http = httpx.AsyncClient(
            base_url=self.config.base_url,
            headers=self.config.headers(),
            timeout=self.config.timeout_s,
            transport=transport,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: Call) -> Reply:
        try:
            r = await self._http.request(
                call.method,
                call.path,
                json=call.json,
                content=call.content,
                headers=call.headers or None,
                params=call.params,
            )
        except self._httpx.TransportError as exc:
            raise _unreachable(self.config, exc) from exc
        if r.status_code >= 400:
            raise error_from_response(r.status_code, r.content, r.headers)
        return Reply(r.status_code, r.headers, r.content)

    async def _drive(self, op: ops.Op[Any]) -> Any:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = op.send(None)
                else:
                    step = op.send(await self._send(step))
        except StopIteration as done:
            return done.value

    async def _stream(self, call: Call) -> AsyncIterator[Chunk]:
        # An async generator: the request is sent at the first iteration.
        req = self._http.build_request(
            call.method, call.path, json=call.json, headers=call.headers or None
        )
        try:
            response = await self._http.send(req, stream=True)
        except self._httpx.TransportError as exc:
            raise _unreachable(self.config, exc) from exc
        try:
            if response.status_code >= 400:
                content = await response.aread()
                raise error_from_response(response.status_code, content, response.headers)
            try:
                async for line in response.aiter_lines():
                    event = parse_line(line)
                    if event == DONE:
                        return
                    if isinstance(event, Chunk):
                        yield event
            except self._httpx.TransportError as exc:
                raise _unreachable(self.config, exc) from exc
        finally:
            await response.aclose()
