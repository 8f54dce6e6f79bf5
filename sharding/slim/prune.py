"""Structured pruning on the source checkpoint: whole FFN channels, whole layers.

* FFN channels (``prune-ffn --ratio R``): channel ``j`` of a layer's MLP is
  row ``j`` of ``gate_proj``/``up_proj`` and column ``j`` of ``down_proj``.
  Its importance is ``mean_tokens |a_j| * ||down_proj[:, j]||``, ``a`` being
  the down-projection's input on the calibration text (the structured form
  of Wanda's |activation| x |weight|). Every layer keeps the same number of
  channels, ``round(I * (1 - R))``, so the model stays one Hugging Face
  config (``intermediate_size``) and every layer piece has the same shape.
* Layers (``prune-depth --layers K``): a layer's importance is
  ``1 - mean_tokens cos(h_in, h_out)`` (ShortGPT's block influence: a layer
  that barely turns the hidden state is the cheapest to drop); the K least
  important go, and Gemma's ``layer_types`` follow.

Shapes are validated before any weight is read (``check_*``).
"""

from __future__ import annotations

import logging
from typing import Any

from edgemesh.errors import SlimInputError, require

log = logging.getLogger(__name__)


def kept_channels(intermediate: int, ratio: float) -> int:
    """Channels each layer keeps; refuses a ratio outside [0, 1) or an emptied MLP.

    Ratio 0 is accepted as the identity (it re-exports the source unchanged,
    which the tests use to prove the path is exact)."""
    if not 0.0 <= ratio < 1.0:
        raise SlimInputError(f"--ratio must be in (0, 1) (0 re-exports unchanged), got {ratio}")
    keep = round(intermediate * (1.0 - ratio))
    if keep < 1:
        raise SlimInputError(
            f"--ratio {ratio} would leave 0 of {intermediate} FFN channels in every layer",
            hint=f"use a ratio below {1 - 0.5 / intermediate:.4f}",
        )
    return keep


def check_depth(num_layers: int, drop: int) -> None:
    if not 0 < drop < num_layers:
        raise SlimInputError(
            f"--layers {drop} must be between 1 and {num_layers - 1}: the model has "
            f"{num_layers} layers and pruning must leave at least one",
        )


def _mlp(layer: Any) -> Any:
    mlp = layer.mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(mlp, name):
            raise SlimInputError(f"the MLP has no {name}: FFN pruning needs a gated MLP")
    return mlp


def ffn_importance(model: Any, windows: list[list[int]]) -> list[Any]:
    """Per layer, a [I] tensor of channel importance on the calibration windows."""
    torch = require("torch", "convert")
    layers = model.model.layers
    sums = [torch.zeros(_mlp(layer).down_proj.in_features) for layer in layers]
    count = [0]
    hooks = []
    for i, layer in enumerate(layers):

        def hook(_mod: Any, args: tuple, i: int = i) -> None:
            a = args[0].detach().float()  # [B,S,I]
            sums[i] += a.abs().reshape(-1, a.shape[-1]).sum(0)

        hooks.append(_mlp(layer).down_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in windows:
                model(torch.tensor([ids]), use_cache=False)
                count[0] += len(ids)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, layer in enumerate(layers):
        norms = _mlp(layer).down_proj.weight.detach().float().norm(dim=0)  # [I]
        out.append(sums[i] / max(count[0], 1) * norms)
    return out


def prune_ffn(model: Any, importance: list[Any], keep: int) -> list[list[int]]:
    """Keep the ``keep`` most important channels of every layer (in place)."""
    torch = require("torch", "convert")
    nn = torch.nn
    kept = []
    for layer, score in zip(model.model.layers, importance, strict=True):
        mlp = _mlp(layer)
        idx = torch.sort(torch.topk(score, keep).indices).values
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(
                old.in_features, keep, bias=old.bias is not None, dtype=old.weight.dtype
            )
            new.weight.data = old.weight.data[idx].clone()
            if old.bias is not None:
                new.bias.data = old.bias.data[idx].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = nn.Linear(keep, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.data = old.weight.data[:, idx].clone()
        if old.bias is not None:
            new.bias.data = old.bias.data.clone()
        mlp.down_proj = new
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
        kept.append(idx.tolist())
    model.config.intermediate_size = keep
    return kept


def depth_importance(model: Any, windows: list[list[int]]) -> list[float]:
    """Per layer, ``1 - mean cos(input, output)`` of its hidden states (block influence)."""
    torch = require("torch", "convert")
    layers = model.model.layers
    sims = [0.0] * len(layers)
    tokens = [0]
    hooks = []
    for i, layer in enumerate(layers):

        def hook(_mod: Any, args: tuple, kwargs: dict, output: Any, i: int = i) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sims[i] += float(cos.sum())

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for ids in windows:
                model(torch.tensor([ids]), use_cache=False)
                tokens[0] += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return [1.0 - s / max(tokens[0], 1) for s in sims]


def prune_depth(model: Any, importance: list[float], drop: int) -> list[int]:
    """Remove the ``drop`` least important layers (in place); returns the removed indices."""
    torch = require("torch", "convert")
    order = sorted(range(len(importance)), key=lambda i: (importance[i], i))
    removed = sorted(order[:drop])
    keep = [i for i in range(len(importance)) if i not in removed]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(importance):
        cfg.layer_types = [types[i] for i in keep]
    return removed
