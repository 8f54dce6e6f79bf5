"""/v1/embeddings and the tokenizer routes (``/tokenize``, ``/detokenize``,
``/tokenizer_info``, as vLLM names them: lm-evaluation-harness's
``local-completions`` tokenizes through them when the server has them).

Embeddings are the model's last hidden layer, mean-pooled over the input's
tokens and L2-normalised (``edgemesh.gateway.embeddings``).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

from edgemesh.errors import RequestError
from edgemesh.gateway.body import parse_json, read_body
from edgemesh.gateway.schemas import DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from edgemesh.gateway.service import ModelService


def install(app: FastAPI, service_for: Callable[[str], ModelService]) -> None:
    def only(name: str | None) -> ModelService:
        if name:
            return service_for(name)
        services: dict[str, ModelService] = app.state.services
        if len(services) != 1:
            raise RequestError("name the model: this gateway serves several", param="model")
        return next(iter(services.values()))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = EmbeddingRequest.model_validate(parse_json(await read_body(request)))
        service = service_for(body.model)
        embedder = service.embedder()
        vocab = service.tokenizer.vocab_size
        ids: list[list[int]] = []
        for item in body.inputs:
            if isinstance(item, str):
                ids.append(service.tokenizer.encode(item))
            elif any(t >= vocab for t in item):
                raise RequestError(f"token ids must be in [0, {vocab})", param="input")
            else:
                ids.append(list(item))
        for seq in ids:
            if not seq:
                raise RequestError("an input is empty", param="input")
            if len(seq) > embedder.context_length:
                raise RequestError(
                    f"an input has {len(seq)} tokens; embeddings take at most "
                    f"{embedder.context_length}",
                    param="input",
                    code="context_length_exceeded",
                )
        if body.dimensions is not None and body.dimensions > embedder.dimensions:
            raise RequestError(
                f"this model's embeddings have {embedder.dimensions} dimensions", param="dimensions"
            )
        vectors = await asyncio.to_thread(embedder.embed, ids)
        data = []
        for i, vec in enumerate(vectors):
            if body.dimensions is not None:
                # Matryoshka-style truncation, re-normalised, as OpenAI's `dimensions` does.
                vec = vec[: body.dimensions]
                vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
            value: Any = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else [float(x) for x in vec]
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(s) for s in ids)
        return {
            "object": "list",
            "data": data,
            "model": service.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = TokenizeRequest.model_validate(parse_json(await read_body(request)))
        service = only(body.model)
        tokens = service.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens or None)
        if not body.add_special_tokens and tokens[:1] == [service.tokenizer.bos_id]:
            tokens = tokens[1:]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": service.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = DetokenizeRequest.model_validate(parse_json(await read_body(request)))
        service = only(body.model)
        vocab = service.tokenizer.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise RequestError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": service.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        service = only(None)
        tok = service.tokenizer
        return {
            "eos_token": tok.eos_text or None,
            "bos_token": tok.bos_text or None,
            "pad_token": None,
            "chat_template": tok.chat_template,
            "model_max_length": service.context_length,
            "vocab_size": tok.vocab_size,
        }
