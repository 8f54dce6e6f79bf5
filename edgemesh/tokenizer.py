"""The tokenizer contract the engine uses, plus chat templates and streaming decode.

Tokenizers turn text into ids and ids into *bytes*; the engine joins bytes
into text with ``StreamDecoder`` so a multi-byte character split across
tokens is never emitted half-way.
"""

from __future__ import annotations

import codecs
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from edgemesh.errors import RequestError


class Tokenizer(ABC):
    bos_id: int | None
    eos_ids: frozenset[int]
    chat_template: str | None
    bos_text: str
    eos_text: str
    add_bos: bool

    @abstractmethod
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token text (e.g. ``<bos>``) is parsed."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (special tokens render as empty)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        """Render OpenAI-style messages (and ``tools``, for templates that take
        them) with the model's chat template."""
        if not self.chat_template:
            raise RequestError(
                "this model has no chat template; use /v1/completions", code="no_chat_template"
            )
        from jinja2 import TemplateError

        template = _compile(self.chat_template)
        try:
            return self._render(template, messages, tools)
        except (TemplateError, TypeError, KeyError, AttributeError) as exc:
            # A template that trips over a message's shape is the request's fault.
            raise RequestError(
                f"the chat template cannot render these messages: {exc}", param="messages"
            ) from exc

    def _render(self, template: Any, messages: Sequence[dict[str, Any]], tools: Any) -> str:
        return template.render(
            messages=list(messages),
            add_generation_prompt=True,
            bos_token=self.bos_text,
            eos_token=self.eos_text,
            **({"tools": list(tools)} if tools else {}),
        )

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        text = self.render_chat(messages, tools)
        # Templates usually write the BOS text themselves; never add a second one.
        starts_with_bos = bool(self.bos_text) and text.startswith(self.bos_text)
        return self.encode(text, add_bos=self.add_bos and not starts_with_bos)


class StreamDecoder:
    """Incremental detokenizer: feed token ids, get complete UTF-8 text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _raise(message: str) -> None:
    raise RequestError(f"chat template rejected the messages: {message}")


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)
