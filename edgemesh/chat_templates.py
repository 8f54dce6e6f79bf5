"""Chat templates for models whose files carry none.

Base-model GGUFs (the default Gemma 3 270M among them) ship without
``tokenizer.chat_template``. Rather than refuse chat requests, edgemesh
falls back to the family's documented turn format, as llama.cpp's server
does; a template from the model or from ``--chat-template`` always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

_GEMMA = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{% set content = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_CHATML = (
    "{% for m in messages %}"
    "{% set content = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% set content = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + content | trim "
    "+ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

FALLBACKS: dict[str, str] = {
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "gemma3_text": _GEMMA,
    "qwen2": _CHATML,
    "qwen3": _CHATML,
    "llama": _LLAMA3,
}


def fallback_for(architecture: str) -> str:
    """The family's turn format; ChatML for families we do not know."""
    return FALLBACKS.get(architecture.lower(), _CHATML)


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes one tool call: ``start`` + JSON + ``end``."""

    start: str
    end: str
    arguments_key: str = "arguments"


HERMES = ToolFormat("<tool_call>\n", "\n</tool_call>")
"""Qwen 2.5/3, Hermes and most templates with tools; also edgemesh's fallback."""
LLAMA3_JSON = ToolFormat("", "", "parameters")
"""Llama 3.1+'s JSON tool calls (``{"name": ..., "parameters": ...}``)."""


def knows_tools(template: str | None) -> bool:
    """Whether the template renders a ``tools`` list itself."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def tool_format(template: str | None) -> ToolFormat:
    """The call syntax the model's template teaches; Hermes where it teaches none."""
    if template and knows_tools(template):
        if "<tool_call>" in template:
            return HERMES
        if "<|python_tag|>" in template or '"parameters"' in template:
            return LLAMA3_JSON
    return HERMES
