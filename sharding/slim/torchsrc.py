"""The torch side of slimming: the source checkpoint in, an ordinary package out.

Pruning and distillation change shapes or weights, so their result is
exported the way ``edgemesh convert`` exports any checkpoint: the slimmed
``transformers`` model is saved as a Hugging Face folder and converted
(``convert.convert``), so its pieces, costs and manifest are made by the
same code as every other package. The source is the checkpoint the package
was converted from (``manifest.extra["source"]["path"]``: for the default
model its GGUF, ``sharding/convert/sources.py``), or one given with ``--source``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgemesh.errors import ModelNotFoundError, require
from edgemesh.sharding.convert.sources import TOKENIZER_FILE, Source, open_source
from edgemesh.sharding.package.folder import Package, open_package
from edgemesh.sharding.package.manifest import Manifest


def source_of(pkg: Package, override: Path | str | None = None) -> Source:
    """The checkpoint ``pkg`` was converted from (architecture checked, no weights read)."""
    path = override or pkg.manifest.extra.get("source", {}).get("path")
    if not path or not Path(path).expanduser().exists():
        raise ModelNotFoundError(
            f"the source checkpoint of '{pkg.manifest.name}' is not at '{path}'",
            hint="pass --source with the Hugging Face folder or .gguf it was converted from",
        )
    return open_source(path)


def save_hf(model: Any, pkg: Package, folder: Path) -> Path:
    """Save a (slimmed) transformers model with the package's tokenizer, for ``convert``."""
    transformers = require("transformers", "convert")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    info = pkg.manifest.tokenizer
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(pkg.root / TOKENIZER_FILE))
    ids = {
        i: tok.convert_ids_to_tokens(i)
        for i in [info.bos_token_id, *info.eos_token_ids]
        if i is not None
    }
    if info.bos_token_id is not None:
        tok.bos_token = ids[info.bos_token_id]
    if info.eos_token_ids:
        tok.eos_token = ids[info.eos_token_ids[0]]
    if info.chat_template:
        tok.chat_template = info.chat_template
    tok.save_pretrained(folder)
    return folder


def export_package(
    hf_dir: Path,
    out: Path,
    like: Package,
    name: str,
    precisions: tuple[str, ...],
    threads: int | None,
) -> Manifest:
    """Convert ``hf_dir`` into ``out`` and give it ``like``'s tokenizer facts exactly
    (a GGUF source's end-of-turn ids are not in a saved HF tokenizer)."""
    from edgemesh.sharding.convert.run import ConvertOptions, convert
    from edgemesh.sharding.package.manifest import Artifact, sha256_file

    convert(
        hf_dir,
        out,
        ConvertOptions(precisions=precisions, name=name, evaluate=False, threads=threads),
    )
    shutil.copyfile(like.root / TOKENIZER_FILE, out / TOKENIZER_FILE)
    manifest = open_package(out).manifest
    tok_file = out / TOKENIZER_FILE
    arts = [a for a in manifest.artifacts if a.path != TOKENIZER_FILE]
    arts.append(Artifact(TOKENIZER_FILE, sha256_file(tok_file), tok_file.stat().st_size))
    extra = dict(manifest.extra)
    extra["source"] = {**extra.get("source", {}), "derived_from": like.manifest.extra.get("source")}
    manifest = replace(manifest, tokenizer=like.manifest.tokenizer, artifacts=arts, extra=extra)
    manifest.save(out)
    return manifest
