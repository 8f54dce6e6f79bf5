"""Chat templates for models whose files carry none.

Base-model GGUFs (the default Gemma 3 270M among them) ship without
``tokenizer.chat_template``. Rather than refuse chat requests, edgemesh
falls back to the family's documented turn format, as llama.cpp's server
does; a template from the model or from ``--chat-template`` always wins.
"""

from __future__ import annotations

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
