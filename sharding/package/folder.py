"""Open a converted package, verify it, and compose the graph of a layer range.

Layout written by ``edgemesh convert`` (all paths relative to the package)::

    manifest.json           costs, tokenizer facts, every artifact's sha256
    tokenizer.json
    prologue.onnx           rotary tables and masks (no weights)
    <precision>/embed.onnx (+ .data)
    <precision>/layer_NNN.onnx (+ .data)    one per decoder layer
    <precision>/head.onnx (+ .data)

``range_graph(start, stop, precision)`` returns a self-contained ONNX file
for ``[start, stop)``: the pieces' nodes concatenated, their boundary
tensors renamed to one chain, and their weight files concatenated into one
``range.onnx.data`` (a byte copy, no tensor is parsed). The result is cached
on disk under a key made of the pieces' sha256s, so a re-cut composes once
in seconds and a repeated load is a cache hit.

Range graph I/O (B sequences of one padded batch; the backends send B > 1
for decode steps, see ``backends/batching.py``):

* inputs: ``input_ids [B,S]`` int64 (first range) or ``hidden_in [B,S,H]``;
  ``position_ids [B,S]`` int64; ``key_position [B,P+S]`` int64, the
  sequence position each KV slot of a row holds (past slots then the new
  ones), ``-1`` for an empty slot (padding); ``past_key.<i>``/
  ``past_value.<i>`` ``[B,KV,P,D]`` for each layer i of the range;
  ``logit_index [K]`` int64 (last range: which of the S rows get logits).
* outputs: ``logits [B,K,V]`` (last range) or ``hidden_out [B,S,H]``;
  ``present_key.<i>``/``present_value.<i>`` ``[B,KV,P+S,D]``; when asked
  for (``outputs=("hidden_norm",)``, last range), ``hidden_norm [B,S,H]``
  last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemesh import paths
from edgemesh.errors import ConfigError, CorruptArtifactError, ModelNotFoundError, require
from edgemesh.sharding.package.manifest import Manifest, verify_artifact
from edgemesh.sharding.package.range_cache import RANGE_CACHE_BYTES, mark_used, prune

log = logging.getLogger(__name__)

COMPOSE_VERSION = 2
"""2: attention masks from ``key_position`` (padded batches), not from the prologue."""
OPTIONAL_OUTPUTS = ("hidden_norm",)
"""Outputs a range graph has only when asked (``range_graph(outputs=...)``):
``hidden_norm [B,S,H]``, the last range's final-norm state of every new row
(embeddings pool it; packages converted before it existed lack it)."""
PROLOGUE = "prologue.onnx"
_ALIGN = 4096


def piece_path(kind: str, precision: str, index: int | None = None) -> str:
    """Relative path of one piece's graph file."""
    if kind == "prologue":
        return PROLOGUE
    if kind == "layer":
        return f"{precision}/layer_{index:03d}.onnx"
    return f"{precision}/{kind}.onnx"


def default_cache_dir() -> Path:
    return paths.ranges_dir()


def write_piece(model: Any, folder: Path, rel: str, threshold: int = 1024) -> list[str]:
    """Save a piece with its large tensors in ``<rel>.data``; return the files written."""
    onnx = require("onnx", "convert")
    path = Path(folder) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    written = [rel]
    offset = 0
    with open(path.parent / data_name, "wb") as fh:
        for init in model.graph.initializer:
            if not init.HasField("raw_data") or len(init.raw_data) < threshold:
                continue
            pad = -offset % 64  # keep every tensor 64-byte aligned for the runtimes' loaders
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(init.raw_data)
            size = len(init.raw_data)
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", size)):
                entry = init.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += size
    if offset:
        written.append(f"{rel}.data")
    else:
        (path.parent / data_name).unlink()
    path.write_bytes(model.SerializeToString())
    return written


def manifest_precisions(manifest: Manifest) -> list[str]:
    """The precisions the package has graphs for."""
    return list(manifest.extra.get("graphs", {}).get("precisions", []))


def check_range(manifest: Manifest, start: int, stop: int, precision: str) -> None:
    """Refuse a layer range outside the model or a precision it was not converted to."""
    if not 0 <= start < stop <= manifest.num_layers:
        raise ConfigError(
            f"layer range [{start}, {stop}) is not inside the model's {manifest.num_layers} layers"
        )
    precisions = manifest_precisions(manifest)
    if precision not in precisions:
        raise ConfigError(
            f"package '{manifest.name}' has no {precision} graphs",
            hint=f"available: {', '.join(precisions)}",
        )


def range_pieces(
    manifest: Manifest, start: int, stop: int, precision: str
) -> list[tuple[str, int | None, str]]:
    """``(kind, layer index, graph path)`` of each piece of ``[start, stop)``, in order."""
    check_range(manifest, start, stop, precision)
    out: list[tuple[str, int | None, str]] = [("prologue", None, PROLOGUE)]
    if start == 0:
        out.append(("embed", None, piece_path("embed", precision)))
    out += [("layer", i, piece_path("layer", precision, i)) for i in range(start, stop)]
    if stop == manifest.num_layers:
        out.append(("head", None, piece_path("head", precision)))
    return out


def range_artifacts(manifest: Manifest, start: int, stop: int, precision: str) -> list[str]:
    """The artifact paths a layer range loads (graphs and their weight files),
    from the manifest alone: a box that has no copy of the package yet knows
    what to fetch."""
    names = {a.path for a in manifest.artifacts}
    out = []
    for _, _, rel in range_pieces(manifest, start, stop, precision):
        out.append(rel)
        if f"{rel}.data" in names:
            out.append(f"{rel}.data")
    return out


@dataclass
class Package:
    """A converted model folder and its manifest."""

    root: Path
    manifest: Manifest

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def precisions(self) -> list[str]:
        return manifest_precisions(self.manifest)

    def layer_types(self) -> list[str]:
        return list(self.manifest.extra["layer_types"])

    def check_range(self, start: int, stop: int, precision: str) -> None:
        check_range(self.manifest, start, stop, precision)

    def pieces(self, start: int, stop: int, precision: str) -> list[tuple[str, int | None, str]]:
        """``(kind, layer index, graph path)`` of each piece of the range, in order."""
        return range_pieces(self.manifest, start, stop, precision)

    def artifacts_for(self, start: int, stop: int, precision: str) -> list[str]:
        return range_artifacts(self.manifest, start, stop, precision)

    def verify(self, rel_paths: list[str]) -> None:
        """sha256 of each listed artifact against the manifest; raises CorruptArtifactError."""
        for rel in rel_paths:
            verify_artifact(self.root, self.manifest.artifact(rel))

    def tokenizer(self) -> Any:
        """The package's tokenizer (verified), with the family's chat turn format as fallback."""
        from edgemesh.chat_templates import fallback_for
        from edgemesh.sharding.package.tokenizer import HFTokenizer

        info = self.manifest.tokenizer
        if info.file is None:
            raise ModelNotFoundError(f"package '{self.manifest.name}' has no tokenizer")
        path = verify_artifact(self.root, self.manifest.artifact(info.file))
        template = info.chat_template or fallback_for(
            str(self.manifest.extra.get("model_type", ""))
        )
        return HFTokenizer(
            path,
            bos_token_id=info.bos_token_id,
            eos_token_ids=list(info.eos_token_ids),
            chat_template=template,
            add_bos=info.add_bos,
        )

    # -- composition ------------------------------------------------------

    def range_key(
        self, start: int, stop: int, precision: str, outputs: tuple[str, ...] = ()
    ) -> str:
        shas = [
            self.manifest.artifact(r).sha256 for r in self.artifacts_for(start, stop, precision)
        ]
        parts: list[Any] = [COMPOSE_VERSION, start, stop, precision, shas]
        if outputs:  # absent when none: the keys of plain ranges stay what they were
            parts.append(sorted(outputs))
        blob = json.dumps(parts).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def range_graph(
        self,
        start: int,
        stop: int,
        precision: str,
        cache_dir: Path | None = None,
        cache_limit_bytes: int = RANGE_CACHE_BYTES,
        *,
        outputs: tuple[str, ...] = (),
    ) -> Path:
        """Path of the composed ONNX graph of ``[start, stop)`` at ``precision``.

        Verifies the range's artifacts by sha256 first, then composes (or
        reuses the cached composition). A new composition prunes the cache to
        ``cache_limit_bytes``, least recently used first (``range_cache``).
        ``outputs`` names optional outputs to expose after the standard ones
        where the range has them: ``hidden_norm`` (``OPTIONAL_OUTPUTS``).
        """
        unknown = set(outputs) - set(OPTIONAL_OUTPUTS)
        if unknown:
            raise ConfigError(
                f"no optional range output {sorted(unknown)}",
                hint=f"known: {', '.join(OPTIONAL_OUTPUTS)}",
            )
        self.verify(self.artifacts_for(start, stop, precision))
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = self.range_key(start, stop, precision, outputs)
        folder = cache / f"{_slug(self.manifest.name)}-{start}-{stop}-{precision}-{key}"
        graph = folder / "range.onnx"
        if _cache_ok(folder):
            log.debug("range [%d, %d) %s: cache hit %s", start, stop, precision, folder)
            mark_used(folder)
            return graph
        t0 = time.perf_counter()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".compose-", dir=cache))
        try:
            self._compose(start, stop, precision, tmp, outputs)
            if folder.exists():  # a stale or partial entry
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not _cache_ok(folder):  # lost a race to a healthy twin: use it
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        prune(cache, keep=folder, limit_bytes=cache_limit_bytes)
        log.info(
            "composed layers [%d, %d) at %s in %.2f s -> %s",
            start,
            stop,
            precision,
            time.perf_counter() - t0,
            folder,
        )
        return graph

    def _compose(
        self, start: int, stop: int, precision: str, out: Path, outputs: tuple[str, ...] = ()
    ) -> None:
        onnx = require("onnx", "onnx")
        from onnx import helper

        last = self.num_layers
        types = self.layer_types()

        def hidden(i: int) -> str:
            if i == start and start > 0:
                return "hidden_in"
            if i == stop and stop < last:
                return "hidden_out"
            return f"hidden.{i}"

        nodes: list[Any] = []
        inits: list[Any] = []
        values: dict[str, Any] = {}
        opsets: dict[str, int] = {}
        ir_version = 8
        data_out = out / "range.onnx.data"
        base = 0
        with open(data_out, "wb") as sink:
            for kind, index, rel in self.pieces(start, stop, precision):
                try:
                    piece = onnx.load(str(self.root / rel), load_external_data=False)
                except Exception as exc:  # protobuf's DecodeError and friends
                    raise CorruptArtifactError(rel, f"not a readable ONNX graph ({exc})") from exc
                ir_version = max(ir_version, piece.ir_version)
                for op in piece.opset_import:
                    opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
                if kind == "prologue":
                    # Its masks assume one contiguous cache per row; the range's masks
                    # come from key_position instead (_mask_nodes), so these are pruned.
                    ren = {"past_key": f"past_key.{start}"} | {
                        f"mask.{t}": f"prologue.unused_mask.{t}" for t in set(types)
                    }
                elif kind == "embed":
                    ren = {"hidden": hidden(0)}
                elif kind == "head":
                    ren = {"hidden": hidden(stop)}
                else:
                    assert index is not None  # range_pieces numbers every layer piece
                    t = types[index]
                    ren = {
                        "hidden": hidden(index),
                        "hidden_out": hidden(index + 1),
                        "cos": f"cos.{t}",
                        "sin": f"sin.{t}",
                        "mask": f"mask.{t}",
                        **{n: f"{n}.{index}" for n in ("past_key", "past_value")},
                        **{n: f"{n}.{index}" for n in ("present_key", "present_value")},
                    }
                for node in piece.graph.node:
                    node.input[:] = [ren.get(n, n) for n in node.input]
                    node.output[:] = [ren.get(n, n) for n in node.output]
                    nodes.append(node)
                for info in list(piece.graph.input) + list(piece.graph.output):
                    info.name = ren.get(info.name, info.name)
                    values.setdefault(info.name, info)
                data_file = self.root / rel
                data_file = data_file.with_name(data_file.name + ".data")
                if data_file.is_file():
                    pad = -base % _ALIGN
                    sink.write(b"\0" * pad)
                    base += pad
                    with open(data_file, "rb") as src:
                        shutil.copyfileobj(src, sink, 16 << 20)
                    for init in piece.graph.initializer:
                        _relocate(init, "range.onnx.data", base)
                    base += data_file.stat().st_size
                inits.extend(piece.graph.initializer)

        mask_nodes, mask_inits, key_position = _mask_nodes(
            helper, sorted(set(types[start:stop])), self.manifest.extra.get("sliding_window")
        )
        nodes = mask_nodes + nodes  # graph inputs only: first, for topological order
        inits += mask_inits
        values["key_position"] = key_position
        first_in = "input_ids" if start == 0 else "hidden_in"
        in_names = [first_in, "position_ids", "key_position"]
        out_names = ["logits" if stop == last else "hidden_out"]
        for i in range(start, stop):
            in_names += [f"past_key.{i}", f"past_value.{i}"]
            out_names += [f"present_key.{i}", f"present_value.{i}"]
        if stop == last:
            in_names.append("logit_index")
            # Packages converted before the head exported it have no hidden_norm.
            out_names += [n for n in outputs if n == "hidden_norm" and n in values]
        nodes, inits = prune_graph(nodes, inits, set(out_names))
        graph = helper.make_graph(
            nodes,
            f"layers_{start}_{stop}_{precision}",
            [values[n] for n in in_names],
            [values[n] for n in out_names],
            inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
        )
        model.ir_version = ir_version
        (out / "range.onnx").write_bytes(model.SerializeToString())
        meta = {
            "key": self.range_key(start, stop, precision, outputs),
            "layers": [start, stop],
            "precision": precision,
            "files": {n: (out / n).stat().st_size for n in ("range.onnx", "range.onnx.data")},
        }
        (out / "range.json").write_text(json.dumps(meta, indent=1))


SLIDING = "sliding_attention"


def _mask_nodes(
    helper: Any, kinds: list[str], window: int | None
) -> tuple[list[Any], list[Any], Any]:
    """Additive attention masks ``mask.<kind> [B,1,S,T]`` from ``position_ids
    [B,S]`` and ``key_position [B,T]``: a query sees a slot that holds an
    earlier-or-equal position of its own row (and, on sliding layers, one
    less than ``window`` back); empty slots (-1) are hidden. Same values as
    the prologue's masks (0 or float32's lowest), so a B=1 call is unchanged.
    Returns (nodes, initializers, the key_position input's value info)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    p = "mask_from_positions"
    consts: dict[str, np.ndarray] = {
        f"{p}/axis1": np.array([1], np.int64),
        f"{p}/axis2": np.array([2], np.int64),
        f"{p}/zero": np.array(0, np.int64),
        f"{p}/open": np.array(0.0, np.float32),
        f"{p}/shut": np.array(np.finfo(np.float32).min, np.float32),
    }
    if window:
        consts[f"{p}/window"] = np.array(int(window), np.int64)
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    node = helper.make_node
    nodes = [
        node("Unsqueeze", ["position_ids", f"{p}/axis2"], [f"{p}/q"], name=f"{p}/q"),  # [B,S,1]
        node("Unsqueeze", ["key_position", f"{p}/axis1"], [f"{p}/k"], name=f"{p}/k"),  # [B,1,T]
        node("LessOrEqual", [f"{p}/k", f"{p}/q"], [f"{p}/causal"], name=f"{p}/causal"),
        node("GreaterOrEqual", [f"{p}/k", f"{p}/zero"], [f"{p}/filled"], name=f"{p}/filled"),
        node("And", [f"{p}/causal", f"{p}/filled"], [f"{p}/full"], name=f"{p}/full"),  # [B,S,T]
    ]
    for kind in kinds:
        allowed = f"{p}/full"
        if kind == SLIDING and window:
            nodes += [
                node("Sub", [f"{p}/q", f"{p}/k"], [f"{p}/back"], name=f"{p}/back"),
                node("Less", [f"{p}/back", f"{p}/window"], [f"{p}/near"], name=f"{p}/near"),
                node("And", [f"{p}/full", f"{p}/near"], [f"{p}/slide"], name=f"{p}/slide"),
            ]
            allowed = f"{p}/slide"
        nodes += [
            node("Where", [allowed, f"{p}/open", f"{p}/shut"], [f"{p}/bias.{kind}"],
                 name=f"{p}/bias.{kind}"),
            node("Unsqueeze", [f"{p}/bias.{kind}", f"{p}/axis1"], [f"mask.{kind}"],
                 name=f"{p}/mask.{kind}"),
        ]  # fmt: skip
    info = helper.make_tensor_value_info("key_position", TensorProto.INT64, ["batch", "total"])
    return nodes, inits, info


def _relocate(init: Any, location: str, base: int) -> None:
    """Point an external initializer at ``location``, ``base`` bytes further on."""
    entries = {e.key: e.value for e in init.external_data}
    if not entries:
        return
    del init.external_data[:]
    entries["location"] = location
    entries["offset"] = str(int(entries.get("offset", 0)) + base)
    for key, value in entries.items():
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def prune_graph(
    nodes: list[Any], inits: list[Any], outputs: set[str]
) -> tuple[list[Any], list[Any]]:
    """Drop nodes (and initializers) nothing in ``outputs`` depends on. ``nodes``
    in topological order; the kept ones stay in that order. The one graph pruner:
    range composition here and RKNN's static graphs (``backends/rknn.py``)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    return kept, [i for i in inits if i.name in needed]


def _cache_ok(folder: Path) -> bool:
    """A cached range is whole when its sizes match what it recorded at write time."""
    try:
        meta = json.loads((folder / "range.json").read_text())
        return all((folder / n).stat().st_size == size for n, size in meta["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "model"


def open_package(path: Path | str) -> Package:
    """Read ``manifest.json`` of a package folder (artifacts are verified on use)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelNotFoundError(
            f"no model package at '{root}'",
            hint="convert a checkpoint with `edgemesh convert SOURCE --out DIR`",
        )
    manifest = Manifest.load(root)
    if "graphs" not in manifest.extra or "layer_types" not in manifest.extra:
        raise CorruptArtifactError(
            str(root / "manifest.json"), "not an ONNX layer-range package (no 'graphs' entry)"
        )
    return Package(root, manifest)
