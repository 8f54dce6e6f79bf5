"""Server-sent events of the streamed OpenAI routes, one line at a time.

The gateway sends ``data: {json}`` lines, blank separators and a final
``data: [DONE]``; an error after the stream began arrives as ``data:
{"error": {...}}`` (the HTTP status was already 200), raised here as the
mapped ``edgemesh.errors`` class.
"""

from __future__ import annotations

import json

from edgemesh.sdk.errors import GatewayError, stream_error
from edgemesh.sdk.types import Chunk

DONE = "[DONE]"


def parse_line(line: str) -> Chunk | str | None:
    """A ``Chunk``, ``DONE`` at the end, or None for lines that carry no event."""
    if not line.startswith("data:"):
        return None  # blank separator, comment (": ping") or another field
    payload = line[5:].strip()
    if payload == DONE:
        return DONE
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise GatewayError(f"the stream sent a line that is not JSON: {payload[:200]}") from exc
    if isinstance(data, dict) and "error" in data:
        raise stream_error(data)
    return Chunk.from_dict(data)
