"""The block-wise integer weight format of int8/int4 pieces (MatMulNBits' layout).

Lives with the package format, not the converter, because runtimes read it
back too: TensorRT rebuilds its own int weights from these codes and scales.
"""

from __future__ import annotations

import numpy as np


def blockwise(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantisation of ``weight [N, K]`` along K.

    Returns ``packed [N, ceil(K/block), block*bits/8]`` uint8 (value + 2^(bits-1);
    two 4-bit values per byte, low nibble first) and ``scales [N, ceil(K/block)]``.
    """
    n, k = weight.shape
    blocks = -(-k // block)
    if blocks * block != k:  # zero-pad the last block; its extra weights dequantise to 0
        weight = np.pad(weight, ((0, 0), (0, blocks * block - k)))
    w = weight.reshape(n, blocks, block).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).max(axis=-1)  # [N, blocks]
    scales = amax / qmax
    if bits < 8:
        scales = _search_scales(w, amax, qmax)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    q = (np.clip(np.rint(w / safe), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scales.astype(np.float32)


def _search_scales(w: np.ndarray, amax: np.ndarray, qmax: int) -> np.ndarray:
    """Per block, the scale among ``amax / c`` (c from qmax - 1 to qmax + 2) with the
    least squared rounding error: with 16 levels, clipping the block's largest
    weight a little often rounds the other 31 better (llama.cpp searches alike).
    """
    best = amax / qmax
    best_err = np.full(amax.shape, np.inf, dtype=np.float64)
    for c in np.linspace(qmax - 1, qmax + 2, 13):
        scale = amax / c
        safe = np.where(scale == 0, 1.0, scale)[..., None]
        err = ((np.clip(np.rint(w / safe), -qmax - 1, qmax) * safe - w) ** 2).sum(-1)
        better = err < best_err
        best = np.where(better, scale, best)
        best_err = np.minimum(err, best_err)
    return best.astype(np.float32)


def dequantize(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of ``blockwise``: ``[N, K]`` float32 (for tests and error reports)."""
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    else:
        q = packed
    w: np.ndarray = (q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]
