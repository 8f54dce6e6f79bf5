"""The gateway's OpenAPI schema with the request bodies the handlers read.

Handlers parse bodies themselves (so bad input is an OpenAI-style 4xx, not
FastAPI's 422), which leaves FastAPI's generated schema without bodies.
This adds them from the pydantic models in ``schemas``, so a client
generator or a fuzzer (schemathesis, in the tests) sees every field.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from edgemesh.gateway import schemas

BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": schemas.CompletionRequest,
    "/v1/chat/completions": schemas.ChatRequest,
    "/v1/embeddings": schemas.EmbeddingRequest,
    "/tokenize": schemas.TokenizeRequest,
    "/detokenize": schemas.DetokenizeRequest,
    "/api/plan": schemas.PlanBody,
    "/api/models": schemas.DeployBody,
    "/api/models/{name}/replan": schemas.ReplanBody,
    "/v2/models/{m}/infer": schemas.InferBody,
    "/v2/models/{m}/versions/{v}/infer": schemas.InferBody,
}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        refs, defs = models_json_schema(
            [(m, "validation") for m in BODIES.values()],
            ref_template="#/components/schemas/{model}",
        )
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        names = sorted(getattr(app.state, "services", {}))
        for model in BODIES.values():
            props = components.get(model.__name__, {}).get("properties", {})
            if "model" in props and names:
                # The models this gateway serves: what a client (or a fuzzer) may name.
                props["model"] = {**props["model"], "enum": names}
        components["Error"] = _ERROR
        graphs = sorted(getattr(app.state, "graphs", None) or {})
        for path, item in doc.get("paths", {}).items():
            for op in item.values():
                for param in op.get("parameters", []) if isinstance(op, dict) else []:
                    if path.startswith("/v2/models/{m}") and param.get("name") == "m" and graphs:
                        # The graph models served here, as for the LLMs' `model`.
                        param["schema"] = {**param.get("schema", {}), "enum": graphs}
        for path, model in BODIES.items():
            op = doc.get("paths", {}).get(path, {}).get("post")
            if op is None:
                continue
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(model, "validation")]}},
            }
            op.setdefault("responses", {})["400"] = {
                "description": "The request is invalid (OpenAI error body)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
