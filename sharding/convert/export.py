"""torch -> ONNX, one small graph per piece of the model.

A model is exported as independent *pieces* that ``package.compose`` later
joins into the graph of any layer range:

* ``prologue``: rotary cos/sin and attention masks from ``position_ids``
  (shared by every layer of a range; precision-free, no weights);
* ``layer_NNN``: one decoder layer with its KV cache in and out;
* ``head``: final norm, LM head (and Gemma's logit soft-capping) for the
  positions asked for.

(The embedding is a plain ``Gather`` written directly in ``quantize``.)

Each piece wraps the Hugging Face modules themselves (norms, projections,
MLP) so the arithmetic is the reference's; only the attention/cache plumbing
is ours, because the KV cache must be a plain tensor input/output of the
graph. Internal names are prefixed with the piece name at export, so
composing is concatenation plus renaming of the boundary tensors.

Piece I/O (B batch, S new tokens, P cached tokens, T = P + S, D head dim):

* layer: ``hidden [B,S,H], cos [B,S,D], sin [B,S,D], mask [B,1,S,T],
  past_key [B,KV,P,D], past_value [B,KV,P,D]`` ->
  ``hidden_out [B,S,H], present_key [B,KV,T,D], present_value [B,KV,T,D]``
* prologue: ``position_ids [B,S] (int64), past_key [B,KV,P,D]`` ->
  ``cos.<kind>, sin.<kind>, mask.<kind>`` per layer type in the model
* head: ``hidden [B,S,H], logit_index [K] (int64)`` -> ``logits [B,K,V]``,
  ``hidden_norm [B,S,H]`` (the final norm of every row: what embeddings pool)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from edgemesh.errors import UnsupportedModelError, require
from edgemesh.sharding.convert.architectures import ArchSpec

log = logging.getLogger(__name__)

OPSET = 17
LAYER_INPUTS = ["hidden", "cos", "sin", "mask", "past_key", "past_value"]
LAYER_OUTPUTS = ["hidden_out", "present_key", "present_value"]


def _modules(torch: Any) -> dict[str, type]:
    """The nn.Module wrappers, defined lazily so torch is imported only here."""
    # torch arrives as an argument (imported lazily), so its Module is Any here.
    module: Any = torch.nn.Module

    class LayerPiece(module):  # type: ignore[misc]
        """One decoder layer with an explicit KV cache (tensor in, tensor out)."""

        def __init__(self, layer: Any, spec: ArchSpec) -> None:
            super().__init__()
            self.layer = layer
            self.spec = spec
            self.groups = spec.num_heads // spec.num_kv_heads
            self.scaling = float(layer.self_attn.scaling)

        def attention(
            self, x: Any, cos: Any, sin: Any, mask: Any, past_key: Any, past_value: Any
        ) -> tuple[Any, Any, Any]:
            attn, spec = self.layer.self_attn, self.spec
            d, kvh, g = spec.head_dim, spec.num_kv_heads, self.groups
            shape = (*x.shape[:-1], -1, d)
            # q/k/v: [B,S,heads,D] -> qk-norm over D (before or after the
            # transpose is the same arithmetic) -> [B,heads,S,D]
            q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            if spec.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos + _rotate_half(torch, q) * sin
            k = k * cos + _rotate_half(torch, k) * sin
            key = torch.cat([past_key, k], dim=2)  # [B,KV,T,D]
            value = torch.cat([past_value, v], dim=2)
            # Grouped-query attention without repeating K/V: fold the query
            # heads of one KV group into the row axis, q: [B,KV,g*S,D].
            b, s = q.shape[0], q.shape[2]
            qg = q.reshape(b, kvh, g * s, d)
            scores = torch.matmul(qg, key.transpose(2, 3)) * self.scaling  # [B,KV,g*S,T]
            if spec.attn_logit_softcapping:
                cap = spec.attn_logit_softcapping
                scores = torch.tanh(scores / cap) * cap
            scores = scores.view(b, kvh, g, s, -1) + mask.unsqueeze(1)  # mask [B,1,1,S,T]
            probs = torch.softmax(scores, dim=-1).view(b, kvh, g * s, -1)
            out = torch.matmul(probs, value).view(b, kvh * g, s, d)  # [B,heads,S,D]
            out = out.transpose(1, 2).reshape(b, s, kvh * g * d)
            return attn.o_proj(out), key, value

        def forward(
            self, hidden: Any, cos: Any, sin: Any, mask: Any, past_key: Any, past_value: Any
        ) -> tuple[Any, Any, Any]:
            layer = self.layer
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn, key, value = self.attention(x, cos, sin, mask, past_key, past_value)
            if self.spec.family == "gemma3":
                hidden = residual + layer.post_attention_layernorm(attn)
                mlp = layer.mlp(layer.pre_feedforward_layernorm(hidden))
                hidden = hidden + layer.post_feedforward_layernorm(mlp)
            else:
                hidden = residual + attn
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            return hidden, key, value

    class ProloguePiece(module):  # type: ignore[misc]
        """cos/sin per rotary kind and additive masks per layer type."""

        def __init__(self, spec: ArchSpec, rope: dict[str, tuple[Any, float]]) -> None:
            super().__init__()
            self.spec = spec
            self.kinds = spec.kinds
            self.scalings = {k: float(rope[k][1]) for k in self.kinds}
            for kind in self.kinds:
                self.register_buffer(f"inv_freq_{kind}", rope[kind][0].float().clone())

        def forward(self, position_ids: Any, past_key: Any) -> tuple[Any, ...]:
            total = past_key.shape[2] + position_ids.shape[1]
            # Keys sit at positions 0..T-1 of a contiguous cache.
            kpos = torch.arange(total, dtype=torch.int64)
            qpos = position_ids.unsqueeze(-1)  # [B,S,1]
            causal = kpos.view(1, 1, -1) <= qpos  # [B,S,T]
            low = torch.finfo(torch.float32).min
            outs = []
            for kind in self.kinds:
                inv_freq = getattr(self, f"inv_freq_{kind}")
                freqs = position_ids.unsqueeze(-1).float() * inv_freq  # [B,S,D/2]
                emb = torch.cat([freqs, freqs], dim=-1)
                outs.append(emb.cos() * self.scalings[kind])
                outs.append(emb.sin() * self.scalings[kind])
                allowed = causal
                window = self.spec.window(kind)
                if window:
                    allowed = allowed & (qpos - kpos.view(1, 1, -1) < window)
                outs.append(torch.where(allowed, 0.0, low).unsqueeze(1))  # [B,1,S,T]
            return tuple(outs)

    class HeadPiece(module):  # type: ignore[misc]
        """Final norm and LM head for the rows ``logit_index`` of the new tokens."""

        def __init__(self, norm: Any, lm_head: Any, spec: ArchSpec) -> None:
            super().__init__()
            self.norm, self.lm_head, self.spec = norm, lm_head, spec

        def forward(self, hidden: Any, logit_index: Any) -> tuple[Any, Any]:
            # The norm is per row, so norming every row and then picking is the
            # same arithmetic as picking first; every row's normed state is an
            # output too (``hidden_norm``: what embeddings pool).
            normed = self.norm(hidden)  # [B,S,H]
            picked = torch.index_select(normed, 1, logit_index)  # [B,K,H]
            logits = self.lm_head(picked)  # [B,K,V]
            cap = self.spec.final_logit_softcapping
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return logits, normed

    return {"layer": LayerPiece, "prologue": ProloguePiece, "head": HeadPiece}


def _rotate_half(torch: Any, x: Any) -> Any:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(model: Any, spec: ArchSpec) -> dict[str, tuple[Any, float]]:
    """Layer type -> (inverse frequencies [D/2], cos/sin scaling) from the HF model."""
    rotary = model.model.rotary_emb
    out = {}
    for kind in spec.kinds:
        inv = getattr(rotary, f"{kind}_inv_freq", None)
        scaling = getattr(rotary, f"{kind}_attention_scaling", None)
        if inv is None:
            inv, scaling = rotary.inv_freq, rotary.attention_scaling
        if inv.numel() * 2 != spec.head_dim:
            raise UnsupportedModelError(
                f"architecture '{spec.architecture}' rotates {inv.numel() * 2} of "
                f"{spec.head_dim} head dimensions; only full rotary embeddings are supported"
            )
        out[kind] = (inv.detach().float().cpu(), float(scaling if scaling is not None else 1.0))
    return out


def _export(
    module: Any,
    args: tuple[Any, ...],
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
    prefix: str,
) -> Any:
    """Export ``module`` and prefix every internal name with ``prefix/``."""
    torch = require("torch", "convert")
    onnx = require("onnx", "convert")
    module.eval()
    with tempfile.TemporaryDirectory(prefix="edgemesh-export-") as tmp:
        path = Path(tmp) / f"{prefix}.onnx"
        with torch.no_grad():
            # The TorchScript exporter: ~1 s a layer and exact to 1e-6; the
            # dynamo exporter took ~16 s for the same graph (FACTS.md).
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(path), load_external_data=True)
    rename_internal(model, prefix, keep=set(inputs) | set(outputs))
    return model


def rename_internal(model: Any, prefix: str, keep: set[str]) -> None:
    """Prefix every tensor and node name not in ``keep`` (in place)."""
    graph = model.graph

    def fix(name: str) -> str:
        return name if not name or name in keep else f"{prefix}/{name}"

    for init in graph.initializer:
        init.name = fix(init.name)
    for node in graph.node:
        node.name = f"{prefix}/{node.name or node.op_type}"
        node.input[:] = [fix(n) for n in node.input]
        node.output[:] = [fix(n) for n in node.output]
    for info in graph.value_info:
        info.name = fix(info.name)


def export_layer(model: Any, spec: ArchSpec, index: int) -> Any:
    """ONNX ModelProto of decoder layer ``index`` (fp32)."""
    torch = require("torch", "convert")
    piece = _modules(torch)["layer"](model.model.layers[index], spec).float()
    b, s, p = 1, 3, 2
    kv = (b, spec.num_kv_heads, p, spec.head_dim)
    args = (
        torch.randn(b, s, spec.hidden_size),
        torch.randn(b, s, spec.head_dim),
        torch.randn(b, s, spec.head_dim),
        torch.zeros(b, 1, s, p + s),
        torch.randn(*kv),
        torch.randn(*kv),
    )
    axes = {
        "hidden": {0: "batch", 1: "seq"},
        "cos": {0: "batch", 1: "seq"},
        "sin": {0: "batch", 1: "seq"},
        "mask": {0: "batch", 2: "seq", 3: "total"},
        "past_key": {0: "batch", 2: "past"},
        "past_value": {0: "batch", 2: "past"},
        "hidden_out": {0: "batch", 1: "seq"},
        "present_key": {0: "batch", 2: "total"},
        "present_value": {0: "batch", 2: "total"},
    }
    return _export(piece, args, LAYER_INPUTS, LAYER_OUTPUTS, axes, f"layer_{index:03d}")


def prologue_outputs(spec: ArchSpec) -> list[str]:
    return [f"{name}.{kind}" for kind in spec.kinds for name in ("cos", "sin", "mask")]


def export_prologue(model: Any, spec: ArchSpec) -> Any:
    torch = require("torch", "convert")
    piece = _modules(torch)["prologue"](spec, rope_tables(model, spec))
    args = (
        torch.tensor([[2, 3, 4]], dtype=torch.int64),
        torch.zeros(1, spec.num_kv_heads, 2, spec.head_dim),
    )
    outputs = prologue_outputs(spec)
    axes: dict[str, dict[int, str]] = {
        "position_ids": {0: "batch", 1: "seq"},
        "past_key": {0: "batch", 2: "past"},
    }
    for name in outputs:
        axes[name] = (
            {0: "batch", 2: "seq", 3: "total"}
            if name.startswith("mask")
            else {
                0: "batch",
                1: "seq",
            }
        )
    return _export(piece, args, ["position_ids", "past_key"], outputs, axes, "prologue")


def export_head(model: Any, spec: ArchSpec) -> Any:
    torch = require("torch", "convert")
    piece = _modules(torch)["head"](model.model.norm, model.lm_head, spec).float()
    args = (torch.randn(1, 3, spec.hidden_size), torch.tensor([2], dtype=torch.int64))
    axes = {
        "hidden": {0: "batch", 1: "seq"},
        "logit_index": {0: "picked"},
        "logits": {0: "batch", 1: "picked"},
        "hidden_norm": {0: "batch", 1: "seq"},
    }
    outputs = ["logits", "hidden_norm"]
    return _export(piece, args, ["hidden", "logit_index"], outputs, axes, "head")


def embedding_table(model: Any) -> Any:
    """The token embedding table as a float32 numpy array ``[V, H]``."""
    return model.model.embed_tokens.weight.detach().float().cpu().numpy()
