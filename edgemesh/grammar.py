"""Constrained decoding: output grammars compiled by llguidance, one matcher per sequence.

Why llguidance (measured on the default model's 262,144-token vocabulary,
``edgemesh bench gateway``; docs/GATEWAY.md has the figures): its masks
take tens of microseconds per token, it needs no other package (xgrammar
pulls in triton and takes its masks as torch tensors), and it compiles
both JSON schemas and Lark grammars with embedded schemas (``%json``), so
tool calls in ``auto`` mode (free text *or* calls) are one grammar.
outlines-core compiles regular expressions only and its index build grows
with the schema.

The engine calls ``Constraint.mask()`` before each step (on the head: the
bits travel in the ``Pick`` to wherever the logits are, the last stage on
a mesh) and ``advance(token)`` after. A compiled grammar is checked before
the request is queued, so a bad schema is a 400, never a failed stream.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from typing import Any

import numpy as np

from edgemesh.errors import MissingExtraError, RequestError
from edgemesh.tokenizer import Tokenizer

log = logging.getLogger(__name__)

COMPACT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
"""JSON layout the grammars force: no free whitespace, so a bounded schema
bounds the output's length (a model cannot pad with newlines until
max_tokens runs out)."""

_tokenizers: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise MissingExtraError("llguidance", "gateway") from exc
    return llguidance


def grammar_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of ``tokenizer`` (built once per tokenizer: ~1 s at 262k tokens)."""
    with _lock:
        cached = _tokenizers.get(tokenizer)
        if cached is not None:
            return cached
        llg = _llg()
        tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        eos = sorted(tokenizer.eos_ids)

        class _Wrapped:
            eos_token_id = eos[0] if eos else 0
            bos_token_id = tokenizer.bos_id

            def __init__(self) -> None:
                self.tokens = tokens
                self.special_token_ids = [i for i, t in enumerate(tokens) if not t]

            def __call__(self, text: str | bytes) -> list[int]:
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="replace")
                return tokenizer.encode(text, add_bos=False)

        built = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped()), eos_token=eos or None)
        _tokenizers[tokenizer] = built
        return built


class Grammar:
    """A compiled output grammar (llguidance's serialized form), checked once."""

    def __init__(self, source: str, *, param: str, tokenizer: Tokenizer) -> None:
        llg = _llg()
        self.param = param
        self._tok = grammar_tokenizer(tokenizer)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(source, self._tok)
        if is_error:
            raise RequestError(
                f"{param} cannot be compiled into an output grammar: {messages[0][:500]}",
                param=param,
                code="invalid_grammar",
            )
        self.source = source

    def constraint(self, max_tokens: int | None = None) -> Constraint:
        """A fresh matcher for one sequence; ``max_tokens`` is its budget (see
        ``Constraint``: it ends a repeatable reply before the budget cuts it)."""
        return Constraint(self, max_tokens=max_tokens)


def json_schema_grammar(schema: dict[str, Any], *, tokenizer: Tokenizer, param: str) -> Grammar:
    """Any JSON value the schema accepts, laid out compactly."""
    llg = _llg()
    try:
        source = llg.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"{param}: not a JSON schema: {exc}", param=param) from exc
    return Grammar(source, param=param, tokenizer=tokenizer)


def lark_grammar(lark: str, *, tokenizer: Tokenizer, param: str) -> Grammar:
    return Grammar(_llg().LLMatcher.grammar_from_lark(lark), param=param, tokenizer=tokenizer)


def embedded_schema(schema: dict[str, Any]) -> str:
    """A schema written into a Lark grammar as ``%json {...}`` (compact layout)."""
    return "%json " + json.dumps({**schema, "x-guidance": COMPACT})


class Constraint:
    """One sequence's matcher. Used from the engine's scheduler thread only.

    With a budget (``max_tokens``) it closes a reply that could go on: a
    grammar that may end and may also continue (tool calls: ``call+``) is a
    sequence of *units*, each ending where the matcher turns accepting again.
    At such an end, if the tokens left cannot hold another unit twice as long
    as the longest so far plus the end-of-sequence token, only EOS is allowed:
    the reply stops complete instead of being cut mid-unit by ``max_tokens``.
    A grammar accepting at every step (free text) has no unit ends past its
    first token, so it is never closed early. A single unit (one JSON value)
    is not helped by this: its budget must cover its longest form (each token
    is at least one byte, so a bounded schema's longest reply in bytes is enough).
    """

    def __init__(self, grammar: Grammar, *, max_tokens: int | None = None) -> None:
        llg = _llg()
        self._matcher = llg.LLMatcher(grammar._tok, grammar.source)
        words = (grammar._tok.vocab_size + 31) // 32
        self._mask = np.zeros((1, words), dtype=np.int32)
        self._eos = sorted(set(grammar._tok.eos_tokens))
        self.steps = 0
        self.max_tokens = max_tokens
        self._accepting = bool(self._matcher.is_accepting())
        self._unit_start = 0
        self.longest_unit = 0
        """Tokens of the longest unit so far (start, or a unit end, to the next end)."""
        self.closed = False
        """The budget ended the reply at a unit end: only EOS is allowed now."""

    def mask(self) -> np.ndarray:
        """Packed uint32 bitmask of the tokens allowed next (a fresh array: it
        travels with the pick while the next one is computed)."""
        from llguidance.numpy import fill_next_token_bitmask

        if self._matcher.is_error() or self.closed:
            return self._only_eos()
        fill_next_token_bitmask(self._matcher, self._mask)
        return self._mask[0].view(np.uint32).copy()

    def advance(self, token: int) -> bool:
        """Accept ``token``; True when the grammar is complete or broken (stop)."""
        self.steps += 1
        if not self._matcher.consume_token(int(token)):
            log.warning("the output grammar refused token %d: %s", token, self._matcher.get_error())
            return True
        accepting = bool(self._matcher.is_accepting())
        if accepting and not self._accepting:  # a unit ends here
            self.longest_unit = max(self.longest_unit, self.steps - self._unit_start)
            self._unit_start = self.steps
            if self.max_tokens is not None:
                left = self.max_tokens - self.steps
                self.closed = left < 2 * self.longest_unit + 1
        self._accepting = accepting
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def _only_eos(self) -> np.ndarray:
        out = np.zeros(self._mask.shape[1], dtype=np.uint32)
        for t in self._eos:
            out[t // 32] |= np.uint32(1 << (t % 32))
        return out
