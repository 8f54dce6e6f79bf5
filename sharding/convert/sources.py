"""Read a checkpoint to convert: a local Hugging Face folder or a ``.gguf`` file.

Nothing is downloaded. The architecture is checked from the config alone,
before any weight is read, so an unsupported model fails in seconds.

GGUF files are read with transformers' own GGUF loader (``gguf`` package
underneath), which dequantises every tensor to float32 and undoes
llama.cpp's renames and norm offsets; the tokenizer is rebuilt from the
file's vocabulary once and saved into the package as ``tokenizer.json``
(reading a 262k vocabulary takes tens of seconds, so it is never redone).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.errors import CorruptArtifactError, ModelNotFoundError, require
from edgemesh.sharding.convert.architectures import ArchSpec, spec_from_config

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")
"""End-of-turn markers that stop generation as EOS does (llama.cpp's list of
end-of-generation tokens, for the supported families)."""


@dataclass
class TokenizerFacts:
    """What the package records about the tokenizer it writes."""

    file: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    chat_template: str | None
    add_bos: bool


@dataclass
class Source:
    """A checkpoint on disk, its config, and how to load it."""

    path: Path
    kind: str
    """``"hf"`` (a folder) or ``"gguf"`` (a file)."""
    config: Any
    spec: ArchSpec
    name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def load_model(self) -> Any:
        """The transformers model in eval mode (weights in the checkpoint's dtype)."""
        torch = require("torch", "convert")
        transformers = require("transformers", "convert")
        if self.kind == "hf":
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.path), dtype="auto", low_cpu_mem_usage=True
                )
            except OSError as exc:
                raise CorruptArtifactError(
                    str(self.path), f"weights could not be read: {exc}"
                ) from exc
            return model.eval()
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        transformers.utils.logging.disable_progress_bar()  # the CLI prints its own progress
        model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        try:
            tensors = load_gguf_checkpoint(
                str(self.path), return_tensors=True, model_to_load=model
            )["tensors"]
        except (ValueError, KeyError, OSError) as exc:
            raise CorruptArtifactError(str(self.path), f"GGUF tensors unreadable: {exc}") from exc
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        # A tied head has no tensor of its own in the file.
        missing = [
            m for m in missing if not (m == "lm_head.weight" and self.spec.tie_word_embeddings)
        ]
        if missing:
            raise CorruptArtifactError(str(self.path), f"tensors missing: {missing[:5]}")
        if unexpected:
            log.warning(
                "ignoring %d unexpected GGUF tensors (%s...)", len(unexpected), unexpected[0]
            )
        model.tie_weights()
        return model.eval()

    def save_tokenizer(self, out_dir: Path) -> TokenizerFacts:
        """Write ``tokenizer.json`` into ``out_dir`` and return its facts."""
        transformers = require("transformers", "convert")
        try:
            if self.kind == "gguf":
                tok = transformers.AutoTokenizer.from_pretrained(
                    str(self.path.parent), gguf_file=self.path.name
                )
            else:
                tok = transformers.AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptArtifactError(str(self.path), f"tokenizer unreadable: {exc}") from exc
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise CorruptArtifactError(str(self.path), "no fast (tokenizers) tokenizer available")
        backend.save(str(Path(out_dir) / TOKENIZER_FILE))
        bos = tok.bos_token_id
        # The tokenizer adds BOS itself when its post-processor says so.
        probe = tok("a").input_ids
        add_bos = bos is not None and probe[:1] == [bos]
        eos = _eos_ids(self) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        if self.kind == "gguf":
            # A GGUF names one EOS; chat turns end with the family's own marker
            # (Gemma's <end_of_turn> is 106), which llama.cpp also stops at.
            vocab = tok.get_vocab()
            eos += [vocab[t] for t in END_OF_TURN if t in vocab]
        eos = [int(i) for i in dict.fromkeys(eos)]
        template = getattr(tok, "chat_template", None)
        if isinstance(template, dict):  # several named templates: keep the default one
            template = template.get("default") or next(iter(template.values()), None)
        return TokenizerFacts(TOKENIZER_FILE, bos, eos, template, add_bos)


def _eos_ids(source: Source) -> list[int]:
    ids = list(source.spec.eos_token_ids)
    gen = source.path / "generation_config.json" if source.kind == "hf" else None
    if gen is not None and gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            value = None
        if value is not None:
            ids += value if isinstance(value, list) else [value]
    return [int(i) for i in dict.fromkeys(ids)]


def open_source(path: Path | str) -> Source:
    """Identify a checkpoint and check its architecture (no weights read)."""
    transformers = require("transformers", "convert")
    path = Path(path).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(
                f"'{path}' has no config.json",
                hint="pass a Hugging Face model folder or a .gguf file",
            )
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptArtifactError(str(cfg_path), f"not valid JSON ({exc})") from exc
        spec = spec_from_config(raw)  # refuse unsupported models before transformers parses
        config = transformers.AutoConfig.from_pretrained(str(path))
        return Source(path, "hf", config, spec_from_config(config), path.name)
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise CorruptArtifactError(str(path), f"not a GGUF file (starts with {magic!r})")
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            meta = load_gguf_checkpoint(str(path), return_tensors=False)
        except ValueError as exc:
            # transformers names the GGUF architecture it does not know.
            from edgemesh.errors import UnsupportedModelError

            raise UnsupportedModelError(f"{path.name}: {exc}") from exc
        raw = dict(meta["config"])
        spec_from_config(raw)
        config = transformers.AutoConfig.for_model(**raw)
        spec = spec_from_config(config)
        name = str(raw.get("_model_name_or_path") or path.stem)
        return Source(path, "gguf", config, spec, name, {"gguf_file": path.name})
    raise ModelNotFoundError(
        f"no checkpoint at '{path}'", hint="pass a Hugging Face model folder or a .gguf file"
    )
