"""/v1/completions and /v1/chat/completions: prompts in, choices out.

A request becomes ``len(prompts) x n`` sequences in the engine (choice
``i * n + j`` is sample j of prompt i). Sample j of a seeded request uses
seed ``seed + j``, so the n samples differ and each is reproducible.
Streaming merges every choice's events into one server-sent event stream;
a client that disconnects cancels all of them, which frees their KV cache
on every shard.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from edgemesh.chat_templates import ToolFormat, knows_tools, tool_format
from edgemesh.engine import Generation
from edgemesh.errors import ContextOverflowError, EdgemeshError, RequestError
from edgemesh.gateway import errors, formats
from edgemesh.gateway.body import parse_json, read_body
from edgemesh.gateway.metrics import GatewayMetrics, TokenClock
from edgemesh.gateway.observe import request_id
from edgemesh.gateway.schemas import ChatRequest, CompletionRequest, _Request
from edgemesh.gateway.service import ModelService
from edgemesh.gateway.tools import CallStream, parse_calls, tool_grammar
from edgemesh.grammar import Grammar, json_schema_grammar
from edgemesh.sampling import SamplingParams

log = logging.getLogger(__name__)

_SEED_MOD = 1 << 63


@dataclass
class Job:
    """One request's sequences and what shapes its response."""

    service: ModelService
    prompts: list[list[int]]
    gens: list[Generation]
    chat: bool
    n: int
    logprobs: int | None = None
    echo_text: list[str] = field(default_factory=list)
    score_prompt: bool = False
    tools: ToolFormat | None = None
    started: float = field(default_factory=time.perf_counter)
    ident: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]

    def cancel(self) -> None:
        for g in self.gens:
            g.cancel()


def install(app: FastAPI, service_for: Callable[[str], ModelService]) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body = CompletionRequest.model_validate(parse_json(await read_body(request)))
        service = service_for(body.model)
        max_tokens = body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise RequestError("max_tokens 0 needs echo: true", param="max_tokens")
        prompts = [_prompt_ids(p, service) for p in body.prompts]
        job = await _submit(
            service,
            prompts,
            body,
            chat=False,
            max_tokens=max_tokens,
            default_max=SamplingParams.max_tokens,  # OpenAI: /v1/completions gives 16
            logprobs=body.logprobs,
            score_prompt=body.echo and body.logprobs is not None,
        )
        if body.echo:
            job.echo_text = [service.tokenizer.decode(p) for p in prompts]
        return await _respond(request, job, stream=bool(body.stream), usage=body.include_usage)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        body = ChatRequest.model_validate(parse_json(await read_body(request)))
        service = service_for(body.model)
        template = service.tokenizer.chat_template
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice: Any = body.tool_choice
        if hasattr(choice, "model_dump"):
            choice = choice.model_dump()
        if choice is None:
            choice = "auto" if tools else "none"
        fmt = tool_format(template)
        from edgemesh.gateway.tools import messages_for_template

        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            m.setdefault("content", "")
        knows = knows_tools(template)
        rendered = messages_for_template(messages, tools if choice != "none" else None, fmt, knows)
        ids = service.tokenizer.encode_chat(rendered, tools if knows and tools else None)
        grammar = await asyncio.to_thread(_chat_grammar, body, tools, choice, fmt, service)
        job = await _submit(
            service,
            [ids],
            body,
            chat=True,
            max_tokens=body.requested_max_tokens,
            default_max=service.default_max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            grammar=grammar,
        )
        if tools and choice != "none":
            job.tools = fmt
        return await _respond(request, job, stream=bool(body.stream), usage=body.include_usage)


def _chat_grammar(
    body: ChatRequest,
    tools: list[dict[str, Any]],
    choice: Any,
    fmt: ToolFormat,
    service: ModelService,
) -> Grammar | None:
    tok = service.tokenizer
    if tools and choice != "none":
        return tool_grammar(tools, choice, fmt, tok, parallel=body.parallel_tool_calls is not False)
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return json_schema_grammar({"type": "object"}, tokenizer=tok, param="response_format")
    assert rf.json_schema is not None
    schema = rf.json_schema.json_schema or {"type": "object"}
    return json_schema_grammar(schema, tokenizer=tok, param="response_format.json_schema.schema")


def _prompt_ids(prompt: str | list[int], service: ModelService) -> list[int]:
    if isinstance(prompt, str):
        return service.tokenizer.encode(prompt)
    vocab = service.tokenizer.vocab_size
    if any(t >= vocab for t in prompt):
        raise RequestError(f"token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)


async def _submit(
    service: ModelService,
    prompts: list[list[int]],
    body: _Request,
    *,
    chat: bool,
    max_tokens: int | None,
    default_max: int,
    logprobs: int | None,
    score_prompt: bool = False,
    grammar: Grammar | None = None,
) -> Job:
    n = body.n or 1
    log.info(
        "[request %s] %s: %d prompt(s) x n=%d, %d prompt tokens%s",
        request_id.get(),
        "chat" if chat else "completion",
        len(prompts),
        n,
        sum(len(p) for p in prompts),
        f", user {body.user!r}" if body.user else "",
    )
    gens: list[Generation] = []
    job = Job(service, prompts, gens, chat, n, logprobs=logprobs, score_prompt=score_prompt)
    job.ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    try:
        for ids in prompts:
            room = service.context_length - len(ids)
            if room <= 0 or not ids:
                raise ContextOverflowError(
                    f"the prompt has {len(ids)} tokens but this model's context is "
                    f"{service.context_length} tokens"
                    if ids
                    else "the prompt is empty",
                    param="messages" if chat else "prompt",
                    code="context_length_exceeded" if ids else None,
                )
            limit = max_tokens if max_tokens is not None else min(default_max, room)
            for j in range(n):
                seed = None if body.seed is None else (body.seed + j) % _SEED_MOD
                params = SamplingParams(
                    max_tokens=limit,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    top_k=body.top_k,
                    presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    seed=seed,
                    stop=body.stop_list,
                    ignore_eos=body.ignore_eos,
                    logit_bias=body.bias,
                    logprobs=logprobs,
                )
                # The grammar's budget: what the engine will let the reply run to.
                budget = min(limit, room)
                constraint = grammar.constraint(budget) if grammar is not None else None
                first = gens[-j] if j else None  # sample 0 of this prompt: share its prefill
                gens.append(
                    service.engine.submit(
                        ids, params, constraint=constraint, echo=score_prompt, share_prefill=first
                    )
                )
    except BaseException:
        job.cancel()
        raise
    return job


async def _respond(request: Request, job: Job, *, stream: bool, usage: bool) -> Response:
    metrics: GatewayMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.prompt_tokens.labels(job.service.name).inc(sum(len(p) for p in job.prompts))
    if stream:
        return StreamingResponse(
            _sse(job, usage, metrics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        outcomes = await asyncio.gather(
            *(_collect(job, g, job.prompt_of(i), metrics) for i, g in enumerate(job.gens))
        )
    finally:
        job.cancel()
    for out in outcomes:
        if out.error is not None:
            return errors.edgemesh_response(out.error)  # type: ignore[arg-type]
    return JSONResponse(_body(job, outcomes))


async def _collect(
    job: Job, gen: Generation, prompt: list[int], metrics: GatewayMetrics | None
) -> formats.Outcome:
    out = formats.Outcome()
    clock = TokenClock(metrics, job.service.name, job.started)
    async for event in gen.events():
        if event.prompt_logprobs is not None:
            out.prompt = formats.prompt_logprobs(prompt, event)
        out.text += event.text
        entry = formats.event_logprobs(event)
        if entry is not None:
            out.tokens.append(entry)
        if event.token_id is not None and event.finish_reason is None:
            clock.tick()
        if event.finish_reason is not None:
            out.reason = event.finish_reason
            out.error = event.error
    if metrics is not None:
        metrics.completion_tokens.labels(job.service.name).inc(gen.completion_tokens)
    return out


def _body(job: Job, outcomes: list[formats.Outcome]) -> dict[str, Any]:
    tok = job.service.tokenizer
    choices = []
    for index, out in enumerate(outcomes):
        reason = "length" if out.reason == "length" else "stop"
        if job.chat:
            message: dict[str, Any] = {"role": "assistant", "content": out.text}
            if job.tools is not None:
                content, calls = parse_calls(out.text, job.tools)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    reason = "tool_calls" if out.reason != "length" else reason
            choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": reason}
            choice["logprobs"] = (
                formats.chat_logprobs(tok, out.tokens) if job.logprobs is not None else None
            )
        else:
            text = out.text
            entries = out.tokens
            prefix = job.echo_text[index // job.n] if job.echo_text else ""
            if job.score_prompt:
                entries = out.prompt + entries
            choice = {"index": index, "text": prefix + text, "finish_reason": reason}
            choice["logprobs"] = (
                formats.completion_logprobs(tok, entries) if job.logprobs is not None else None
            )
        choices.append(choice)
    completion = sum(g.completion_tokens for g in job.gens)
    return {
        "id": job.ident,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": job.created,
        "model": job.service.name,
        "choices": choices,
        "usage": formats.usage(sum(len(p) for p in job.prompts), completion),
    }


async def _sse(job: Job, usage: bool, metrics: GatewayMetrics | None) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    tok = job.service.tokenizer

    async def pump(index: int, gen: Generation) -> None:
        try:
            async for event in gen.events():
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    def frame(choice: dict[str, Any]) -> bytes:
        return formats.sse(
            {
                "id": job.ident,
                "object": obj,
                "created": job.created,
                "model": job.service.name,
                "choices": [choice],
            }
        )

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(job.gens)]
    streams = [CallStream(job.tools) if job.tools else None for _ in job.gens]
    clocks = [TokenClock(metrics, job.service.name, job.started) for _ in job.gens]
    live = len(tasks)
    try:
        for index in range(len(job.gens)):
            if job.chat:
                first = {"role": "assistant", "content": ""}
                yield frame(
                    {"index": index, "delta": first, "finish_reason": None, "logprobs": None}
                )
            elif job.echo_text:
                echo = job.echo_text[index // job.n]
                lp = None
                yield frame({"index": index, "text": echo, "finish_reason": None, "logprobs": lp})
        while live:
            index, event = await queue.get()
            if event is None:
                live -= 1
                continue
            if event.error is not None:
                yield formats.sse(_stream_error(event.error))
                break
            if event.token_id is not None and event.finish_reason is None:
                clocks[index].tick()
            entry = formats.event_logprobs(event)
            reason = event.finish_reason
            if reason is not None:
                reason = "length" if reason == "length" else "stop"
                if (call := streams[index]) is not None and call.index >= 0:
                    reason = "tool_calls" if reason == "stop" else reason
            if job.chat:
                deltas: list[dict[str, Any]] = []
                stream = streams[index]
                if event.text:
                    deltas = list(stream.feed(event.text)) if stream else [{"content": event.text}]
                if stream is not None and reason is not None:
                    deltas += list(stream.flush())
                    if stream.index >= 0 and reason != "length":
                        reason = "tool_calls"
                lps = (
                    formats.chat_logprobs(tok, [entry])
                    if entry and job.logprobs is not None
                    else None
                )
                for k, delta in enumerate(deltas or ([{}] if reason or lps else [])):
                    last = k == max(len(deltas), 1) - 1
                    yield frame(
                        {
                            "index": index,
                            "delta": delta,
                            "finish_reason": reason if last else None,
                            "logprobs": lps if k == 0 else None,
                        }
                    )
            else:
                entries = [entry] if entry else []
                if event.prompt_logprobs is not None and job.score_prompt:
                    pl = formats.prompt_logprobs(job.prompt_of(index), event)
                    entries = pl + entries
                if event.text or reason or entries:
                    lps = (
                        formats.completion_logprobs(tok, entries)
                        if job.logprobs is not None and entries
                        else None
                    )
                    yield frame(
                        {
                            "index": index,
                            "text": event.text,
                            "finish_reason": reason,
                            "logprobs": lps,
                        }
                    )
        if usage:
            completion = sum(g.completion_tokens for g in job.gens)
            yield formats.sse(
                {
                    "id": job.ident,
                    "object": obj,
                    "created": job.created,
                    "model": job.service.name,
                    "choices": [],
                    "usage": formats.usage(sum(len(p) for p in job.prompts), completion),
                }
            )
        yield formats.DONE
    finally:
        # Runs on client disconnect too (the task is cancelled): frees the KV cache.
        job.cancel()
        for t in tasks:
            t.cancel()
        if metrics is not None:
            completion = sum(g.completion_tokens for g in job.gens)
            metrics.completion_tokens.labels(job.service.name).inc(completion)


def _stream_error(exc: EdgemeshError | Exception) -> dict[str, Any]:
    status = getattr(exc, "status", 503) if isinstance(exc, RequestError) else 503
    return errors.error_body(
        str(exc), status, code=getattr(exc, "code", None) or type(exc).__name__
    )
