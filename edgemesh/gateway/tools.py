"""Tool calls: the prompt side (tools into the chat template), the grammar
that forces calls (``tool_choice``), and parsing the output into OpenAI
``tool_calls``, whole or as stream deltas.

The call syntax comes from the model's chat template where it has one
(``edgemesh.chat_templates.tool_format``); a template that knows nothing of
tools gets them described in a system message and answers in the Hermes
syntax (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from edgemesh.chat_templates import ToolFormat
from edgemesh.errors import RequestError
from edgemesh.grammar import Grammar, embedded_schema, lark_grammar
from edgemesh.tokenizer import Tokenizer

_EMPTY_PARAMS: dict[str, Any] = {"type": "object", "properties": {}}


def call_schema(tool: dict[str, Any], fmt: ToolFormat) -> dict[str, Any]:
    """The JSON one call of ``tool`` must be: its name, then its arguments."""
    fn = tool["function"]
    return {
        "type": "object",
        "properties": {
            "name": {"const": fn["name"]},
            fmt.arguments_key: fn.get("parameters") or _EMPTY_PARAMS,
        },
        "required": ["name", fmt.arguments_key],
        "additionalProperties": False,
    }


def _lark_string(text: str) -> str:
    return json.dumps(text)


def tool_grammar(
    tools: list[dict[str, Any]],
    choice: Any,
    fmt: ToolFormat,
    tokenizer: Tokenizer,
    *,
    parallel: bool = True,
) -> Grammar | None:
    """The output grammar for ``tool_choice``; None for ``none`` (free text).
    ``parallel`` False (OpenAI's ``parallel_tool_calls: false``): one call at most."""
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise RequestError(
                f"tool_choice names '{name}', which is not in tools", param="tool_choice"
            )
        tools, repeat = chosen, ""  # a named function: exactly one call
    else:
        repeat = "+" if parallel else ""
    schema = {"anyOf": [call_schema(t, fmt) for t in tools]}
    call = f"call: {_lark_string(fmt.start)} {embedded_schema(schema)} {_lark_string(fmt.end)}"
    if choice == "auto":
        # Free text may not begin (after blanks) with the call marker, so a reply
        # that starts one is a call the grammar completes.
        first = re.escape(fmt.start[0] if fmt.start else "{")
        text = f"TEXT: /\\s*[^{first}\\s][\\s\\S]*/"
        body = f"start: calls | TEXT\ncalls: call{repeat}\n{text}\n{call}\n"
    else:
        sep = ' "\\n" ' if not fmt.end else " "
        body = f"start: call ({sep}call)*\n{call}\n" if repeat else f"start: call\n{call}\n"
    return lark_grammar(body, tokenizer=tokenizer, param="tools")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_calls(text: str, fmt: ToolFormat) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished reply; text that is no valid call stays content."""
    calls: list[dict[str, Any]] = []
    rest: list[str] = []
    pos = 0
    decoder = json.JSONDecoder()
    while pos < len(text):
        at = text.find(fmt.start, pos) if fmt.start else _next_brace(text, pos)
        if at < 0:
            rest.append(text[pos:])
            break
        rest.append(text[pos:at])
        body = at + len(fmt.start)
        while body < len(text) and text[body] in " \n":
            body += 1
        try:
            value, end = decoder.raw_decode(text, body)
        except json.JSONDecodeError:
            rest.append(text[at:])
            break
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            rest.append(text[at:end])
            pos = end
            continue
        args = value.get(fmt.arguments_key, {})
        calls.append(_call(value["name"], json.dumps(args, ensure_ascii=False)))
        pos = end
        marker = fmt.end.strip()
        if marker and text.startswith(marker, _skip_ws(text, pos)):
            pos = _skip_ws(text, pos) + len(marker)
    content = "".join(rest).strip()
    return (content or None), calls


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \n":
        pos += 1
    return pos


def _next_brace(text: str, pos: int) -> int:
    return text.find("{", pos)


def _call(name: str, arguments: str, ident: str | None = None) -> dict[str, Any]:
    return {
        "id": ident or new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


_HEADER = re.compile(r'\s*\{"name": "((?:[^"\\]|\\.)*)", "(\w+)": ')


@dataclass
class CallStream:
    """Turns a streamed reply into OpenAI ``delta`` dicts as text arrives.

    Leans on the grammar's fixed layout (``{"name": "...", "<args>": ...}``,
    compact separators): the header is matched with one regular expression and
    the arguments' end is found by counting brackets outside strings, so
    argument text streams as it is generated."""

    fmt: ToolFormat
    buffer: str = ""
    index: int = -1
    state: str = "start"  # start | text | head | args | tail
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    ids: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)

    def feed(self, text: str) -> Iterator[dict[str, Any]]:
        self.buffer += text
        while self.buffer:
            before = (self.state, len(self.buffer))
            yield from self._step()
            if (self.state, len(self.buffer)) == before:
                return  # needs more text

    def flush(self) -> Iterator[dict[str, Any]]:
        """At the end: text held back as a possible call marker was content after all."""
        if self.buffer.strip() and self.state in ("start", "between", "text"):
            self.content.append(self.buffer)
            yield {"content": self.buffer}
        self.buffer = ""

    def _step(self) -> Iterator[dict[str, Any]]:
        if self.state in ("start", "between"):
            start = self.fmt.start or "{"
            stripped = self.buffer.lstrip(" \n")
            if not stripped:
                self.buffer = ""
                return
            if stripped.startswith(start):
                self.buffer = stripped[len(self.fmt.start) :]
                self.state = "head"
            elif not start.startswith(stripped):
                self.state = "text"
            return  # else: may still become the marker
        if self.state == "text":
            self.content.append(self.buffer)
            yield {"content": self.buffer}
            self.buffer = ""
        elif self.state == "head":
            m = _HEADER.match(self.buffer)
            if m is None:
                return
            self.index += 1
            ident = new_call_id()
            self.ids.append(ident)
            name = json.loads(f'"{m.group(1)}"')
            self.buffer = self.buffer[m.end() :]
            self.state, self.depth, self.in_string, self.escaped = "args", 0, False, False
            function = {"name": name, "arguments": ""}
            yield {
                "tool_calls": [
                    {"index": self.index, "id": ident, "type": "function", "function": function}
                ]
            }
        elif self.state == "args":
            end, done = self._scan()
            piece, self.buffer = self.buffer[:end], self.buffer[end:]
            if piece:
                yield {"tool_calls": [{"index": self.index, "function": {"arguments": piece}}]}
            if done:
                self.state = "tail"
        elif self.state == "tail":
            closing = "}" + self.fmt.end
            if len(self.buffer) < len(closing) and closing.startswith(self.buffer):
                return
            self.buffer = self.buffer[len(closing) :] if self.buffer.startswith(closing) else ""
            self.state = "between"

    def _scan(self) -> tuple[int, bool]:
        """How much of the buffer belongs to the arguments object, and whether it ends there."""
        for i, ch in enumerate(self.buffer):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, True
        return len(self.buffer), False


def describe_tools(tools: list[dict[str, Any]], fmt: ToolFormat) -> str:
    """The system text that offers ``tools`` to a model whose template has no tool syntax."""
    lines = [
        "You may call these functions. To call one, reply with",
        f'{fmt.start}{{"name": <function name>, "{fmt.arguments_key}": <arguments object>}}'
        f"{fmt.end}",
        "Functions (JSON schema of each function's arguments):",
    ]
    for tool in tools:
        fn = tool["function"]
        lines.append(
            json.dumps(
                {
                    "name": fn["name"],
                    "description": fn.get("description", ""),
                    "parameters": fn.get("parameters") or _EMPTY_PARAMS,
                }
            )
        )
    return "\n".join(lines)


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's content as one string (a list of text parts joined)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(p.get("text", "")) for p in content)


def messages_for_template(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    fmt: ToolFormat,
    template_knows_tools: bool,
) -> list[dict[str, Any]]:
    """Messages as the template can render them: past calls and tool results
    written out in ``fmt`` when the template has no tool syntax of its own."""
    if template_knows_tools:
        return messages
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            text = "".join(
                f"{fmt.start}"
                + json.dumps(
                    {
                        "name": c["function"]["name"],
                        fmt.arguments_key: _loads_or_text(c["function"].get("arguments", "{}")),
                    }
                )
                + fmt.end
                for c in m["tool_calls"]
            )
            out.append({"role": "assistant", "content": _text(m.get("content")) + text})
        elif m.get("role") == "tool":
            out.append(
                {
                    "role": "user",
                    "content": f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>",
                }
            )
        else:
            out.append(m)
    if tools:
        system = describe_tools(tools, fmt)
        if out and out[0].get("role") in ("system", "developer"):
            first = _text(out[0].get("content"))
            out[0] = {"role": "system", "content": first + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return arguments
