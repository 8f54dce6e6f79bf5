"""``edgemesh convert``: checkpoint -> package of per-layer ONNX pieces + manifest.

Order of work, chosen for peak memory: the model is loaded once in its
checkpoint's dtype; each decoder layer is upcast to float32, exported,
written at every precision, and dropped before the next. Precision
variants are made here, not at load time, so that a re-cut only composes
files (``package.range_graph``) and every byte that runs has a sha256 in
the manifest.

Costs in the manifest come from the exported graphs themselves: weight
bytes are the sizes of each piece's files at each precision, FLOPs are
2 x the multiply-adds of its MatMuls. Accuracy is the perplexity of each
precision on ``sharding/convert/data/perplexity.txt`` relative to fp32, taken in
windows of the model's context when the text is longer (``perplexity_windows``).

The quality step never costs the export: the package is written (manifest
included) before it runs, and when it cannot measure (a tokenizer that maps
the text to fewer than two tokens, a runtime that refuses a precision) the
manifest records the precision as not measured with the reason, and the
planner then allows only fp32/fp16 (``costs.precision_refusal``).
"""

from __future__ import annotations

import logging
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from edgemesh.backends.base import BackendOptions
from edgemesh.errors import ConfigError, require
from edgemesh.sharding.convert import export
from edgemesh.sharding.convert.architectures import ArchSpec
from edgemesh.sharding.convert.quantize import (
    PRECISIONS,
    QUANT,
    check_precision,
    embedding_model,
    to_precision,
)
from edgemesh.sharding.convert.sources import Source, open_source
from edgemesh.sharding.package.folder import PROLOGUE, open_package, piece_path, write_piece
from edgemesh.sharding.package.manifest import (
    Artifact,
    LayerCost,
    Manifest,
    TokenizerInfo,
    sha256_file,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertOptions:
    precisions: tuple[str, ...] = PRECISIONS
    name: str | None = None
    evaluate: bool = True
    """Measure perplexity per precision (fills ``manifest.accuracy``)."""
    eval_tokens: int | None = None
    """Cap on the evaluation text's tokens (None: all of it)."""
    threads: int | None = None
    overwrite: bool = False
    cache_dir: Path | None = None
    """Where evaluation composes whole-model graphs; None: a temporary folder."""


@dataclass
class ConvertReport:
    package: Path
    manifest: Manifest
    seconds_export: float
    seconds_eval: float
    peak_rss_bytes: int
    perplexity: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from edgemesh.sharding.planner.costs import unmeasured_note

        m = self.manifest
        return {
            "package": str(self.package),
            "name": m.name,
            "architecture": m.architecture,
            "layers": m.num_layers,
            "precisions": list(m.extra["graphs"]["precisions"]),
            "seconds_export": round(self.seconds_export, 2),
            "seconds_eval": round(self.seconds_eval, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
            "perplexity": {k: round(v, 4) for k, v in self.perplexity.items()},
            "accuracy": m.accuracy,
            "accuracy_note": unmeasured_note(m),
            "bytes": sum(a.bytes for a in m.artifacts),
        }


def eval_text() -> str:
    text = resources.files("edgemesh.sharding.convert").joinpath("data/perplexity.txt")
    return text.read_text("utf-8")


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _matmul_macs(model: Any) -> int:
    """Multiply-adds per token of a piece's MatMuls with constant 2-D weights."""
    inits = {i.name: i for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            dims = list(inits[node.input[1]].dims)
            if len(dims) == 2:
                macs += dims[0] * dims[1]
    return macs


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"'{out}' is not empty", hint="pass --overwrite or another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def convert(
    source: Path | str,
    out: Path | str,
    options: ConvertOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> ConvertReport:
    """Convert ``source`` (HF folder or .gguf) into a package at ``out``."""
    torch = require("torch", "convert")
    options = options or ConvertOptions()
    precisions = tuple(check_precision(p) for p in options.precisions)
    if "fp32" not in precisions:
        raise ConfigError("fp32 must be among the precisions (it is the accuracy reference)")
    say = progress or (lambda msg: log.info("%s", msg))
    t0 = time.perf_counter()
    src = open_source(source)  # refuses unsupported architectures before any weight is read
    spec = src.spec
    out = Path(out).expanduser()
    _prepare_out(out, options.overwrite)
    say(
        f"{spec.architecture}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"vocab {spec.vocab_size}"
    )
    tok = src.save_tokenizer(out)
    files: list[str] = [tok.file]
    model = src.load_model()
    if options.threads:
        torch.set_num_threads(options.threads)

    files += write_piece(export.export_prologue(model, spec), out, PROLOGUE)
    sizes: dict[str, dict[str, int]] = {}  # piece name -> precision -> bytes

    def save_all(fp32: Any, key: str, rel: Callable[[str], str]) -> None:
        sizes[key] = {}
        for p in precisions:
            written = write_piece(to_precision(fp32, p), out, rel(p))
            files.extend(written)
            sizes[key][p] = sum((out / w).stat().st_size for w in written)

    table = export.embedding_table(model)  # [V, H] float32
    sizes["embed"] = {}
    for p in precisions:
        written = write_piece(
            embedding_model(table, spec.embed_scale, p, export.OPSET), out, piece_path("embed", p)
        )
        files.extend(written)
        sizes["embed"][p] = sum((out / w).stat().st_size for w in written)
    del table
    layer_macs = []
    for i in range(spec.num_layers):
        fp32 = export.export_layer(model, spec, i)
        layer_macs.append(_matmul_macs(fp32))
        save_all(fp32, f"layer_{i}", partial(piece_path, "layer", index=i))
        model.model.layers[i] = torch.nn.Module()  # free the layer's weights
        say(f"layer {i + 1}/{spec.num_layers} exported")
    head = export.export_head(model, spec)
    head_macs = _matmul_macs(head)
    save_all(head, "head", lambda p: piece_path("head", p))
    del model, head
    t_export = time.perf_counter() - t0
    say(f"exported {len(files)} files in {t_export:.1f} s")

    manifest = _manifest(
        src, spec, options, precisions, tok, files, out, sizes, layer_macs, head_macs
    )
    manifest.save(out)
    t1 = time.perf_counter()
    quality = (
        evaluate(out, precisions, options, say)
        if options.evaluate
        else Quality(reason="convert ran with --no-eval")
    )
    manifest = replace(
        manifest,
        accuracy=quality.accuracy(precisions),
        extra={**manifest.extra, "perplexity": quality.to_dict()},
    )
    if quality.unmeasured(precisions):
        from edgemesh.sharding.planner.costs import unmeasured_note

        say(unmeasured_note(manifest) or f"accuracy not measured: {quality.reason}")
    ppl = dict(quality.values)
    t_eval = time.perf_counter() - t1
    extra = dict(manifest.extra)
    extra["convert"] = {
        "seconds_export": round(t_export, 2),
        "seconds_eval": round(t_eval, 2),
        "peak_rss_bytes": _peak_rss(),
    }
    manifest = replace(manifest, extra=extra)
    manifest.save(out)
    return ConvertReport(out, manifest, t_export, t_eval, _peak_rss(), ppl)


def _manifest(
    src: Source,
    spec: ArchSpec,
    options: ConvertOptions,
    precisions: Sequence[str],
    tok: Any,
    files: list[str],
    out: Path,
    sizes: dict[str, dict[str, int]],
    layer_macs: list[int],
    head_macs: int,
) -> Manifest:
    kv_bytes = 2 * spec.num_kv_heads * spec.head_dim * 4  # K and V, float32 cache
    layers = [
        LayerCost(
            weight_bytes=sizes[f"layer_{i}"],
            flops_per_token=2 * layer_macs[i],
            kv_bytes_per_token=kv_bytes,
            attn_flops_per_token_per_ctx=4 * spec.num_heads * spec.head_dim,
        )
        for i in range(spec.num_layers)
    ]
    artifacts = [Artifact(f, sha256_file(out / f), (out / f).stat().st_size) for f in files]
    return Manifest(
        name=options.name or src.name,
        architecture=spec.architecture,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size,
        context_length=spec.context_length,
        layers=layers,
        embedding=LayerCost(weight_bytes=sizes["embed"], flops_per_token=0),
        head=LayerCost(weight_bytes=sizes["head"], flops_per_token=2 * head_macs),
        tokenizer=TokenizerInfo(
            file=tok.file,
            bos_token_id=tok.bos_token_id,
            eos_token_ids=list(tok.eos_token_ids),
            chat_template=tok.chat_template,
            add_bos=tok.add_bos,
        ),
        artifacts=artifacts,
        accuracy={p: None for p in precisions} | {"fp32": 0.0},
        extra={
            "model_type": spec.model_type,
            "family": spec.family,
            "heads": spec.num_heads,
            "kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim,
            "intermediate_size": spec.intermediate_size,
            "layer_types": spec.layer_types,
            "sliding_window": spec.sliding_window,
            "rope_types": spec.rope_types,
            "embed_scale": spec.embed_scale,
            "tie_word_embeddings": spec.tie_word_embeddings,
            "kv_dtype": "float32",
            "graphs": {
                "format": "onnx-pieces/1",
                "opset": export.OPSET,
                "precisions": list(precisions),
                "quantization": {p: QUANT[p].to_dict() for p in precisions if p in QUANT},
            },
            "source": {"kind": src.kind, "path": str(src.path), **src.extra},
        },
    )


@dataclass
class Quality:
    """What the quality step measured, and why anything was not measured."""

    values: dict[str, float] = field(default_factory=dict)
    """Precision -> perplexity (only the measured ones)."""
    reason: str | None = None
    """Why some precision (or all) has no value."""
    tokens: int = 0
    window: int = 0
    stride: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    """Precision -> the error that stopped its measurement."""

    def unmeasured(self, precisions: Sequence[str]) -> list[str]:
        return [p for p in precisions if p not in self.values]

    def accuracy(self, precisions: Sequence[str]) -> dict[str, float | None]:
        """Relative perplexity increase vs fp32; None where not measured (fp32 is 0.0,
        the reference, measured or not)."""
        base = self.values.get("fp32")
        out: dict[str, float | None] = {}
        for p in precisions:
            value = self.values.get(p)
            out[p] = None if base is None or value is None else round(value / base - 1.0, 6)
        return out | {"fp32": 0.0}

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": "sharding/convert/data/perplexity.txt",
            "measured": bool(self.values) and not self.failed and self.reason is None,
            "reason": self.reason,
            "tokens": self.tokens,
            "window": self.window,
            "stride": self.stride,
            "values": {p: round(v, 4) for p, v in self.values.items()},
            "failed": dict(self.failed),
        }


def evaluate(
    package: Path,
    precisions: Sequence[str],
    options: ConvertOptions,
    say: Callable[[str], None],
) -> Quality:
    """Perplexity of the whole model at each precision on the bundled English text,
    in windows of the model's context. Never raises an edgemesh error: what it
    cannot measure comes back in ``Quality.reason``/``failed``."""
    from edgemesh.errors import EdgemeshError
    from edgemesh.offline import perplexity_windows
    from edgemesh.sharding.pipeline import load_pipeline

    pkg = open_package(package)
    ids = pkg.tokenizer().encode(eval_text())
    if options.eval_tokens:
        ids = ids[: options.eval_tokens]
    if len(ids) < 2:
        return Quality(
            reason=f"the tokenizer maps the bundled text to {len(ids)} token(s); "
            "perplexity needs at least two",
            tokens=len(ids),
        )
    window = pkg.manifest.context_length
    quality = Quality(tokens=len(ids))
    tmp = None
    cache = options.cache_dir
    if cache is None:
        tmp = tempfile.mkdtemp(prefix="edgemesh-eval-")
        cache = Path(tmp)
    try:
        for p in precisions:
            backend_opts = BackendOptions(threads=options.threads, cache_dir=cache)
            t = time.perf_counter()
            try:
                pipe = load_pipeline(pkg, [], p, options=backend_opts)
                try:
                    got = perplexity_windows(pipe, ids, window=window)
                finally:
                    pipe.close()
            except EdgemeshError as exc:
                log.warning("perplexity %s not measured: %s", p, exc)
                quality.failed[p] = str(exc)
                say(f"perplexity {p}: not measured ({exc})")
                if p == "fp32":  # the reference: nothing else can be compared
                    quality.reason = f"fp32 perplexity failed: {exc}"
                    break
                continue
            finally:
                if tmp is not None:  # whole-model graphs are big; keep one at a time
                    for child in Path(tmp).iterdir():
                        shutil.rmtree(child, ignore_errors=True)
            quality.values[p] = got.value
            quality.window, quality.stride = got.window, got.stride
            windows = "" if got.window == got.tokens else f", windows of {got.window}"
            say(
                f"perplexity {p}: {got.value:.3f} ({got.tokens} tokens{windows}, "
                f"{time.perf_counter() - t:.1f} s)"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if quality.failed and quality.reason is None:
        quality.reason = "; ".join(f"{p}: {why}" for p, why in quality.failed.items())
    return quality
