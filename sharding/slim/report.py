"""``edgemesh slim report PKG...``: one quality row per package and precision.

A slimmed package's row comes from the figures recorded when it was made
(``manifest.extra["slim"]["quality"]``), against the fp32 of the package it
was made from; a plain package is measured now (``measure.measure``, cached
by digest) against its own fp32. Every row has the same columns: size on
disk and its reduction, decode tokens/s against fp32, held-out perplexity
and its loss against fp32, the downstream score, and the time the method took.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgemesh.sharding.package.folder import open_package
from edgemesh.sharding.slim.measure import Quality, measure


@dataclass(frozen=True)
class Row:
    package: str
    method: str
    precision: str
    disk_mb: float
    size_vs_fp32: float
    tokens_per_s: float | None
    speed_vs_fp32: float | None
    ttft_s: float | None
    perplexity: float
    loss_vs_fp32: float
    acc_norm: float | None
    reference_acc_norm: float | None
    seconds: float | None
    loadavg: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(name: str, method: str, q: Quality, ref: Quality, seconds: float | None) -> Row:
    tps, rtps = q.decode_tokens_per_s, ref.decode_tokens_per_s
    return Row(
        package=name,
        method=method,
        precision=q.precision,
        disk_mb=round(q.disk_bytes / 1e6, 1),
        size_vs_fp32=round(q.disk_bytes / ref.disk_bytes, 4),
        tokens_per_s=tps,
        speed_vs_fp32=round(tps / rtps, 3) if tps and rtps else None,
        ttft_s=q.ttft_s,
        perplexity=q.perplexity,
        loss_vs_fp32=round(q.perplexity / ref.perplexity - 1.0, 6),
        acc_norm=(q.score or {}).get("acc_norm"),
        reference_acc_norm=(ref.score or {}).get("acc_norm"),
        seconds=seconds,
        loadavg=q.loadavg,
    )


def report(
    packages: Sequence[Path | str],
    *,
    precisions: Sequence[str] | None = None,
    threads: int | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Row]:
    rows = []
    for path in packages:
        pkg = open_package(path)
        record = pkg.manifest.extra.get("slim")
        if record:
            quality = record["quality"]
            ref = Quality(**quality["reference"])
            wanted = precisions or [p for p in quality if p not in ("reference", "heldout")]
            for p in wanted:
                q = (
                    Quality(**quality[p])
                    if p in quality
                    else measure(pkg, p, threads=threads, say=say)
                )
                rows.append(_row(pkg.manifest.name, record["method"], q, ref, record["seconds"]))
            continue
        ref = measure(pkg, "fp32", threads=threads, say=say)
        for p in precisions or ["fp32"]:
            q = ref if p == "fp32" else measure(pkg, p, threads=threads, say=say)
            method = (
                "source"
                if p == "fp32"
                else pkg.manifest.extra["graphs"]
                .get("quantization", {})
                .get(p, {})
                .get("method", "rtn")
            )
            rows.append(_row(pkg.manifest.name, method, q, ref, None))
    return rows


HEADER = (
    "| package | method | precision | disk MB | size vs fp32 | tokens/s | vs fp32 | TTFT s "
    "| perplexity | loss vs fp32 | next-sentence acc_norm (fp32) | time s | load |"
)


def markdown(rows: Sequence[Row]) -> str:
    lines = [HEADER, "|" + "---|" * 13]
    for r in rows:
        acc = "—" if r.acc_norm is None else f"{r.acc_norm:.3f} ({r.reference_acc_norm:.3f})"
        lines.append(
            f"| {r.package} | {r.method} | {r.precision} | {r.disk_mb:.1f} | {r.size_vs_fp32:.2f} "
            f"| {_f(r.tokens_per_s)} | {_f(r.speed_vs_fp32, 2)} | {_f(r.ttft_s, 3)} "
            f"| {r.perplexity:.3f} | {r.loss_vs_fp32 * 100:+.1f}% | {acc} | {_f(r.seconds, 0)} "
            f"| {r.loadavg:.1f} |"
        )
    return "\n".join(lines)


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
