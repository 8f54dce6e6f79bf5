"""How far one precision's outputs are from the source framework's.

All figures are over every output and sample:

* ``max_abs``: ``max |y - y_ref|``.
* ``max_rel``: ``max_abs / max |y_ref|`` (element-wise ratios explode at
  outputs near zero, so the scale is the output's own range).
* ``rel_l2``: ``‖y - y_ref‖₂ / ‖y_ref‖₂``.
* ``top1_agreement`` (classifiers): share of rows whose arg-max over the
  last axis of the first output agrees.

``loss``, compared with ``--max-accuracy-loss``: ``1 - top1_agreement`` for
a classifier, ``rel_l2`` otherwise.
"""

from __future__ import annotations

import numpy as np

from edgemesh.graph.manifest import Accuracy

FP32_MAX_REL = 1e-3
"""fp32 ONNX vs the source framework: both compute in fp32, so only
reassociation noise is expected; anything above this is a conversion bug."""


def compare(
    reference: list[list[np.ndarray]],
    got: list[list[np.ndarray]],
    *,
    classifier: bool,
    samples: int,
    sample_source: str,
) -> Accuracy:
    """``reference``/``got``: per chunk of samples, the outputs in graph order."""
    max_abs = 0.0
    ref_max = 0.0
    diff_sq = 0.0
    ref_sq = 0.0
    agree = total = 0
    for ref_outs, got_outs in zip(reference, got, strict=True):
        for i, (r, g) in enumerate(zip(ref_outs, got_outs, strict=True)):
            r64 = np.asarray(r, np.float64)
            g64 = np.asarray(g, np.float64).reshape(r64.shape)
            d = np.abs(g64 - r64)
            if d.size:
                max_abs = max(max_abs, float(d.max()))
                ref_max = max(ref_max, float(np.abs(r64).max()))
            diff_sq += float((d**2).sum())
            ref_sq += float((r64**2).sum())
            if classifier and i == 0 and r64.ndim >= 2:
                rows_r = r64.reshape(-1, r64.shape[-1]).argmax(-1)
                rows_g = g64.reshape(-1, g64.shape[-1]).argmax(-1)
                agree += int((rows_r == rows_g).sum())
                total += rows_r.size
    rel_l2 = float(np.sqrt(diff_sq) / max(np.sqrt(ref_sq), 1e-12))
    top1 = agree / total if classifier and total else None
    return Accuracy(
        max_abs=max_abs,
        max_rel=max_abs / max(ref_max, 1e-12),
        rel_l2=rel_l2,
        top1_agreement=top1,
        samples=samples,
        sample_source=sample_source,
        loss=(1.0 - top1) if top1 is not None else rel_l2,
    )


def rounded(acc: Accuracy) -> Accuracy:
    """Figures with 6 significant digits, for a readable manifest."""

    def r(x: float | None) -> float | None:
        return None if x is None else float(f"{x:.6g}")

    return Accuracy(
        max_abs=r(acc.max_abs),
        max_rel=r(acc.max_rel),
        rel_l2=r(acc.rel_l2),
        top1_agreement=r(acc.top1_agreement),
        samples=acc.samples,
        sample_source=acc.sample_source,
        loss=r(acc.loss),
    )
