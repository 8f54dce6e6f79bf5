"""OpenAI response pieces: logprobs in the completions and chat shapes, usage, SSE framing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgemesh.engine import Event
from edgemesh.tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


@dataclass
class Outcome:
    """One choice once its generation has finished."""

    text: str = ""
    reason: str = "stop"
    tokens: list[TokenLogprob] = field(default_factory=list)
    prompt: list[TokenLogprob] = field(default_factory=list)
    error: Exception | None = None


def event_logprobs(event: Event) -> TokenLogprob | None:
    if event.token_id is None or (event.logprob is None and not event.top):
        return None
    return TokenLogprob(event.token_id, event.logprob, event.top)


def prompt_logprobs(ids: list[int], event: Event) -> list[TokenLogprob]:
    scores = event.prompt_logprobs or ()
    return [TokenLogprob(t, s[0], s[1]) for t, s in zip(ids, scores, strict=False)]


def _piece(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def completion_logprobs(
    tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    """The legacy ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    at = offset
    for e in entries:
        piece = _piece(tokenizer, e.token)
        tokens.append(piece)
        lps.append(e.logprob)
        tops.append(None if e.logprob is None else {_piece(tokenizer, t): lp for t, lp in e.top})
        offsets.append(at)
        at += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``content`` with token, logprob, bytes, top_logprobs."""

    def one(token: int, lp: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    return {
        "content": [
            {**one(e.token, e.logprob or 0.0), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
