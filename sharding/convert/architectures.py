"""Per-family facts the exporter needs, read from a Hugging Face config.

Every supported family is a pre-norm decoder with rotary attention and a
gated MLP; they differ in a few switches, which ``ArchSpec`` names:

* ``llama`` (Llama 2/3, TinyLlama, SmolLM): residual after attention, then
  ``post_attention_layernorm`` is the MLP's pre-norm.
* ``qwen2``: as Llama, with q/k/v biases (and optional sliding layers).
* ``qwen3``: as Llama, with RMSNorm on each query/key head (qk-norm).
* ``gemma3_text`` (``Gemma3ForCausalLM``): "sandwich" norms around attention
  and MLP, qk-norm, embedding scaled by ``sqrt(hidden)``, attention scaled
  by ``query_pre_attn_scalar**-0.5``, sliding-window and global layers with
  different rotary bases.

Anything else is refused with ``UnsupportedModelError`` naming the
architecture, before any weight is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgemesh.errors import UnsupportedModelError

FAMILIES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
}
"""HF ``model_type`` -> residual/norm layout of its decoder layer."""

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}

# Rotary variants whose inverse frequencies are fixed at load time. Dynamic
# NTK and LongRoPE change with the sequence length, which a static graph
# cannot follow.
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class ArchSpec:
    """The shape and switches of one decoder-only model."""

    model_type: str
    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    layer_types: list[str]
    """``full_attention`` or ``sliding_attention`` per layer."""
    sliding_window: int | None
    rope_types: dict[str, str]
    """Layer type -> rotary variant (``default``, ``llama3``...)."""
    qk_norm: bool
    embed_scale: float
    tie_word_embeddings: bool
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        """Distinct layer types, in first-use order."""
        return list(dict.fromkeys(self.layer_types))

    def window(self, kind: str) -> int | None:
        return self.sliding_window if kind == SLIDING else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _rope_types(config: Any, kinds: list[str]) -> dict[str, str]:
    params = _get(config, "rope_parameters") or {}
    out: dict[str, str] = {}
    for kind in kinds:
        # Gemma 3 keys its rotary parameters by layer type; the others have one set.
        entry = params.get(kind, params) if isinstance(params, dict) else {}
        out[kind] = str((entry or {}).get("rope_type", "default"))
    return out


def spec_from_config(config: Any) -> ArchSpec:
    """Read an ``ArchSpec`` from a transformers config (object or dict).

    Raises UnsupportedModelError naming the architecture when the family,
    a rotary variant or a feature is not one edgemesh can export.
    """
    model_type = str(_get(config, "model_type", "") or "")
    archs = list(_get(config, "architectures") or [])
    arch = archs[0] if archs else None
    if model_type not in FAMILIES:
        shown = arch or model_type or "unknown"
        hint = ""
        if model_type == "gemma3":
            hint = " (multimodal Gemma 3 checkpoints are not supported; use a text-only one)"
        raise UnsupportedModelError(
            f"architecture '{shown}' (model_type '{model_type}') is not supported{hint}",
            hint="edgemesh converts " + ", ".join(sorted(ARCHITECTURES)),
        )
    if arch is not None and arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture '{arch}' is not supported (only causal-LM heads are)",
            hint="edgemesh converts " + ", ".join(sorted(ARCHITECTURES)),
        )
    arch = arch or next(a for a, t in ARCHITECTURES.items() if t == model_type)
    num_layers = int(_get(config, "num_hidden_layers"))
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads") or heads)
    head_dim = int(_get(config, "head_dim") or hidden // heads)
    layer_types = list(_get(config, "layer_types") or [FULL] * num_layers)
    if len(layer_types) != num_layers or set(layer_types) - {FULL, SLIDING}:
        raise UnsupportedModelError(
            f"architecture '{arch}' has layer types {sorted(set(layer_types))}; "
            f"edgemesh supports {FULL} and {SLIDING}"
        )
    sliding = _get(config, "sliding_window") if SLIDING in layer_types else None
    kinds = list(dict.fromkeys(layer_types))
    rope_types = _rope_types(config, kinds)
    for kind, rope in rope_types.items():
        if rope not in _STATIC_ROPE:
            raise UnsupportedModelError(
                f"architecture '{arch}' uses rotary scaling '{rope}' ({kind}), which depends on "
                "the sequence length",
                hint=f"supported rotary variants: {', '.join(sorted(_STATIC_ROPE))}",
            )
    partial = (_get(config, "rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise UnsupportedModelError(f"architecture '{arch}' uses partial rotary embeddings")
    if _get(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"architecture '{arch}' is configured as bidirectional")
    family = FAMILIES[model_type]
    gemma = family == "gemma3"
    return ArchSpec(
        model_type=model_type,
        architecture=arch,
        family=family,
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=int(_get(config, "intermediate_size")),
        vocab_size=int(_get(config, "vocab_size")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        context_length=int(_get(config, "max_position_embeddings") or 4096),
        layer_types=layer_types,
        sliding_window=int(sliding) if sliding else None,
        rope_types=rope_types,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        embed_scale=float(hidden**0.5) if gemma else 1.0,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        attn_logit_softcapping=_get(config, "attn_logit_softcapping") if gemma else None,
        final_logit_softcapping=_get(config, "final_logit_softcapping") if gemma else None,
        bos_token_id=_get(config, "bos_token_id"),
        eos_token_ids=_ids(_get(config, "eos_token_id")),
    )
