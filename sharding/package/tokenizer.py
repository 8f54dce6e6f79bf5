"""The package's tokenizer: Hugging Face ``tokenizers`` behind edgemesh's contract.

Implements ``edgemesh.tokenizer.Tokenizer`` (encode, token bytes, streaming
decode, chat templates through jinja2) from the ``tokenizer.json`` that
``edgemesh convert`` writes into every package, so generating needs neither
transformers nor the original checkpoint.

Token -> bytes follows the tokenizer's decoder: byte-level BPE (GPT-2 style:
Llama 3, Qwen, SmolLM) maps each character back to one byte; SentencePiece
style (Gemma, Llama 2, TinyLlama) turns ``▁`` into a space and ``<0xNN>``
byte-fallback pieces into that byte. Special tokens render as nothing.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgemesh.errors import CorruptArtifactError, require
from edgemesh.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte table (inverse of bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(spec.get("decoder")) or has(spec.get("pre_tokenizer"))


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` plus the BOS/EOS/template facts from the manifest."""

    def __init__(
        self,
        path: Path,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        chat_template: str | None = None,
        add_bos: bool = True,
    ) -> None:
        tokenizers = require("tokenizers", "convert")
        path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
            # Only the decoder and pre-tokenizer are read back as JSON: parsing the
            # whole file into Python objects (Gemma's 262k vocabulary and merges)
            # held ~100 MB more for good and peaked ~350 MB above the tokenizer.
            spec = {
                key: json.loads(part.__getstate__())
                for key, part in (("decoder", self._tok.decoder),
                                  ("pre_tokenizer", self._tok.pre_tokenizer))
                if part is not None
            }  # fmt: skip
            added = self._tok.get_added_tokens_decoder()
        except (OSError, ValueError, Exception) as exc:  # tokenizers raises plain Exception
            raise CorruptArtifactError(path.name, f"tokenizer unreadable: {exc}") from exc
        self._byte_level = _is_byte_level(spec)
        self._special = {int(i) for i, token in added.items() if token.special}
        self.bos_id = bos_token_id
        self.eos_ids = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos and bos_token_id is not None
        self.bos_text = (
            self._tok.id_to_token(bos_token_id) or "" if bos_token_id is not None else ""
        )
        first_eos = eos_token_ids[0] if eos_token_ids else None
        self.eos_text = self._tok.id_to_token(first_eos) or "" if first_eos is not None else ""
        self._cache: dict[int, bytes] = {}

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        # The post-processor's BOS is ignored: add_bos decides, so a chat
        # template that already writes <bos> never gets a second one.
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._bytes(token_id)
            self._cache[token_id] = cached
        return cached

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return b""
        piece: str | None = self._tok.id_to_token(int(token_id))
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_decoder()
            try:
                return bytes(table[c] for c in piece)
            except KeyError:  # an added, non-special token stored as plain text
                return piece.encode("utf-8")
        match = _BYTE_PIECE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")
