"""What the client returns: small dataclasses over the gateway's JSON.

Each keeps the whole answer in ``raw`` for fields not lifted out (logprobs,
plan details, engine stats); ``from_dict`` reads what the gateway sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Usage | None:
        if not d:
            return None
        return cls(
            int(d.get("prompt_tokens", 0)),
            int(d.get("completion_tokens", 0)),
            int(d.get("total_tokens", 0)),
        )


@dataclass(frozen=True)
class Model:
    """One entry of ``GET /v1/models``."""

    id: str
    owned_by: str | None = None
    created: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Model:
        return cls(str(d["id"]), d.get("owned_by"), d.get("created"), d)


@dataclass(frozen=True)
class Completion:
    """A finished (non-streamed) completion or chat completion: its first choice."""

    id: str
    model: str
    text: str
    """The choice's text (completions) or message content (chat)."""
    finish_reason: str | None
    usage: Usage | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        choice = (d.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text = message.get("content") if "message" in choice else choice.get("text")
        return cls(
            id=str(d.get("id", "")),
            model=str(d.get("model", "")),
            text=text or "",
            finish_reason=choice.get("finish_reason"),
            usage=Usage.from_dict(d.get("usage")),
            tool_calls=list(message.get("tool_calls") or []),
            raw=d,
        )


@dataclass(frozen=True)
class Chunk:
    """One streamed event: the new text of the first choice (chat delta or
    completion text), its finish reason on the last one, usage when asked."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chunk:
        choice = (d.get("choices") or [{}])[0]
        delta = choice.get("delta")
        text = (delta or {}).get("content") if delta is not None else choice.get("text")
        return cls(text or "", choice.get("finish_reason"), Usage.from_dict(d.get("usage")), d)


@dataclass(frozen=True)
class Job:
    """A management action run by the gateway (docs/API.md, ``JOB``)."""

    id: str
    kind: str
    target: str
    state: str
    """running, done or failed."""
    message: str = ""
    result: Any = None
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    """The ``edgemesh.errors`` class name of a failed job, when the gateway says."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(
            id=str(d["id"]),
            kind=str(d.get("kind", "")),
            target=str(d.get("target", "")),
            state=str(d.get("state", "")),
            message=str(d.get("message") or ""),
            result=d.get("result"),
            started=d.get("started"),
            finished=d.get("finished"),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class Status:
    """``GET /api/overview`` and ``GET /api/boxes`` in one: the site at a glance."""

    mode: str
    """single (one `edgemesh serve` box) or mesh."""
    version: str
    mesh: str | None
    head: str | None
    gateway_box: str | None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    """docs/API.md ``BOX`` objects (id, role, health, live CPU/memory, stages...)."""
    lost: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dicts(cls, overview: dict[str, Any], boxes: dict[str, Any]) -> Status:
        return cls(
            mode=str(overview.get("mode", "")),
            version=str(overview.get("version", "")),
            mesh=overview.get("mesh"),
            head=overview.get("head"),
            gateway_box=overview.get("gateway_box"),
            boxes=list(boxes.get("boxes") or []),
            lost=list(boxes.get("lost") or []),
            raw={"overview": overview, "boxes": boxes},
        )
