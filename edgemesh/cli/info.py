"""`edgemesh info`: what this box is, and what edgemesh would run on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgemesh.cli._common import print_json, user_errors

if TYPE_CHECKING:
    from edgemesh.fingerprint import Fingerprint

# Features worth a glance when choosing kernels; the JSON lists them all.
_NOTABLE = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimdhp",
    "asimddp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f} GiB"


def render(fp: Fingerprint) -> str:
    """The human-readable summary printed without ``--json``."""
    cpu, mem = fp.cpu, fp.memory
    notable = [f for f in _NOTABLE if f in cpu.features]
    lines = [
        f"box         {fp.id}  (host {fp.hostname}, digest {fp.digest()})",
        f"board       {fp.board or '-'}",
        f"arch        {fp.arch}",
        f"cpu         {cpu.model}: {cpu.cores_online} online, {cpu.cores_effective:g} effective",
        f"features    {' '.join(notable) or '-'}",
        f"memory      {_gib(mem.total_bytes)} total, {_gib(mem.limit_bytes)} limit, "
        f"{_gib(mem.available_bytes)} available",
    ]
    if fp.cgroup.version:
        cg = fp.cgroup
        quota = f"{cg.cpu_quota_cores:g} CPUs" if cg.cpu_quota_cores is not None else "no CPU quota"
        limit = _gib(cg.memory_limit_bytes) if cg.memory_limit_bytes is not None else "no limit"
        lines.append(f"cgroup      {cg.version} {cg.path}: {quota}, memory {limit}")
    if fp.accelerators:
        for i, acc in enumerate(fp.accelerators):
            extra = [
                x for x in (acc.driver, _gib(acc.memory_bytes) if acc.memory_bytes else None) if x
            ]
            label = "accelerator" if i == 0 else ""
            lines.append(
                f"{label:<11} {acc.kind}: {acc.name}" + (f" ({', '.join(extra)})" if extra else "")
            )
    else:
        lines.append("accelerator none")
    lines.append(
        f"backends    {', '.join(fp.backends)}  (installed: {', '.join(fp.installed) or 'none'})"
    )
    lines.append(f"precision   {fp.precision}")
    m = fp.measurement
    if m is not None:
        source = "cached" if m.cached else f"measured in {m.seconds:.1f} s"
        lines.append(f"measured    ({source}, {m.shapes.get('threads', '?')} threads)")
        lines.append(f"  memory copy      {m.memory_bandwidth_gbps:8.1f} GB/s")
        for fig in m.matmul:
            lines.append(
                f"  {fig.key:<16} {fig.gflops:8.1f} GFLOP/s  {fig.bandwidth_gbps:6.1f} GB/s weights"
            )
        for key, why in m.skipped.items():
            lines.append(f"  {key:<16} skipped: {why.splitlines()[0][:80]}")
    for cal in fp.calibrations:
        lines.append(
            f"calibrated  '{cal.model}' ({cal.digest}) at {cal.position} cached tokens, "
            f"{cal.threads} threads, ms per decode token:"
        )
        for key, t in cal.timings.items():
            lines.append(
                f"  {key:<16} layer {t.layer_ms:7.3f}  stage {t.overhead_ms:7.3f}  "
                f"embedding {t.embed_ms:7.3f}  head {t.head_ms:7.3f}"
            )
        for key, why in cal.skipped.items():
            lines.append(f"  {key:<16} skipped: {why.splitlines()[0][:80]}")
    return "\n".join(lines)


def command(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the fingerprint as JSON.")
    ] = False,
    sysroot: Annotated[
        Path,
        typer.Option(
            help="Read /proc and /sys under this folder (a snapshot of another box).",
            file_okay=False,
        ),
    ] = Path("/"),
    measure: Annotated[
        bool,
        typer.Option(
            "--measure", help="Also measure matmul GFLOP/s and memory bandwidth (cached, ~10 s)."
        ),
    ] = False,
    box_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Box id; default: hostname + a hash of the machine id and the primary "
            "interface's MAC (what `edgemesh join` derives).",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Measurement cache; default: $EDGEMESH_CACHE_DIR/measure."),
    ] = None,
    calibrate: Annotated[
        list[Path] | None,
        typer.Option(
            help="Also time this model package's real layers on this box (with --measure; "
            "cached; the planner then prices this box's stages from the timings). Repeatable.",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Show this box's hardware, its backends (best first) and default precision."""
    from edgemesh.fingerprint import collect

    with user_errors():
        fp = collect(
            sysroot, measure=measure, box_id=box_id, cache_dir=cache_dir, calibrate=calibrate
        )
    if json_out:
        print_json(fp.to_dict())
    else:
        typer.echo(render(fp))
