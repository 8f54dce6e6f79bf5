"""Chat with a running edgemesh gateway through the official `openai` client.

    edgemesh serve                      # in one terminal
    python examples/chat_client.py      # in another

Set EDGEMESH_URL to point at another gateway (default http://127.0.0.1:8000/v1).
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI


def main(prompt: str = "Write one sentence about the sea.") -> str:
    client = OpenAI(
        base_url=os.environ.get("EDGEMESH_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("EDGEMESH_API_KEY", "none"),
    )
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=48,
        temperature=0.7,
        stream=True,
    )
    text = []
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            text.append(delta)
            print(delta, end="", flush=True)
    print()
    return "".join(text)


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or "Write one sentence about the sea.")
