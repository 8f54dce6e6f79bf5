"""``edgemesh slim distill``: train a student on a teacher's logits, then package it.

The teacher is a package (its fp32 range graphs give the logits, so the
default model's package teaches without torch loading the GGUF) or a Hugging
Face folder / GGUF (torch). The student is a Hugging Face folder; it must
use the teacher's tokenizer (same vocabulary, token for token), checked
before anything is loaded. Training state lives in ``<out>.train/`` so an
interrupted run resumes where it stopped; the trained student is saved
there as a Hugging Face folder (``student/``) and converted into ``out``.
The record carries the mean KL to the teacher on the held-out text before
and after training.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgemesh.errors import ModelNotFoundError, SlimInputError, require
from edgemesh.sharding.convert.sources import TOKENIZER_FILE, open_source
from edgemesh.sharding.package.folder import Package, open_package
from edgemesh.sharding.slim.record import SlimResult, finish
from edgemesh.sharding.slim.text import heldout_text, load_calibration, windows
from edgemesh.sharding.slim.torchsrc import export_package, save_hf
from edgemesh.sharding.slim.train import (
    TrainConfig,
    distill,
    mean_kl,
    package_teacher,
)
from edgemesh.sharding.slim.writer import Draft, check_out

log = logging.getLogger(__name__)

WINDOW = 128
MAX_WINDOWS = 64
MIN_TEXT_TOKENS = 2 * WINDOW
HELDOUT_WINDOWS = 4


def _vocab_of_package(pkg: Package) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(pkg.root / TOKENIZER_FILE)).get_vocab(with_added_tokens=True)


def _vocab_of_hf(folder: Path) -> dict[str, int]:
    file = folder / TOKENIZER_FILE
    if file.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
    transformers = require("transformers", "convert")
    return dict(transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab())


def _converted_teacher(
    source: Path, folder: Path, threads: int | None, say: Callable[[str], None]
) -> Package:
    """A Hugging Face / GGUF teacher, converted once (fp32) into the training state:
    its logits then come from the same range graphs as a package teacher's, and
    it is the quality reference the student is measured against."""
    if (folder / "manifest.json").is_file():
        return open_package(folder)
    from edgemesh.sharding.convert.run import ConvertOptions, convert

    open_source(source)  # refuse an unsupported teacher before converting
    say(f"converting the teacher {source} once into {folder}")
    tmp = folder.with_name(folder.name + ".tmp")
    convert(
        source,
        tmp,
        ConvertOptions(precisions=("fp32",), evaluate=False, threads=threads, overwrite=True),
    )
    tmp.replace(folder)
    return open_package(folder)


def check_tokenizers(teacher: dict[str, int], student: dict[str, int], student_dir: Path) -> None:
    if teacher == student:
        return
    differ = sum(1 for t, i in teacher.items() if student.get(t) != i)
    raise SlimInputError(
        f"the student '{student_dir}' has a different tokenizer than the teacher "
        f"({len(student)} vs {len(teacher)} tokens, {differ} teacher tokens differ): "
        "distillation matches logits token for token",
        hint="pick a student built on the teacher's tokenizer",
    )


def slim_distill(
    teacher: Path | str,
    student: Path | str,
    text: Path | str | None,
    out: Path | str,
    *,
    steps: int,
    lr: float = 1e-4,
    temperature: float = 1.0,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    threads: int | None = None,
    overwrite: bool = False,
    score: bool = True,
    progress: Callable[[str], None] | None = None,
    step_progress: Callable[[int, int, float], None] | None = None,
) -> SlimResult:
    """Distil ``teacher`` into ``student`` for ``steps`` steps; package the student at ``out``."""
    say = progress or (lambda msg: log.info("%s", msg))
    started = time.perf_counter()
    torch = require("torch", "convert")
    cfg = TrainConfig(steps=steps, lr=lr, temperature=temperature)
    cfg.check()
    teacher_path = Path(teacher).expanduser()
    if not teacher_path.exists():
        raise ModelNotFoundError(f"no teacher at '{teacher_path}'")
    teacher_pkg = open_package(teacher_path) if (teacher_path / "manifest.json").is_file() else None
    student_dir = Path(student).expanduser()
    student_src = open_source(student_dir)  # architecture checked, no weights read
    if student_src.kind != "hf":
        raise SlimInputError(f"--student must be a Hugging Face folder, got '{student_dir}'")
    out_path = check_out(Path(out), overwrite)
    state = out_path.with_name(out_path.name + ".train")
    student_vocab = _vocab_of_hf(student_dir)
    if teacher_pkg is None and teacher_path.is_dir():  # check before converting it
        check_tokenizers(_vocab_of_hf(teacher_path), student_vocab, student_dir)
    if teacher_pkg is None:
        teacher_pkg = _converted_teacher(teacher_path, state / "teacher", threads, say)
    check_tokenizers(_vocab_of_package(teacher_pkg), student_vocab, student_dir)
    tok = teacher_pkg.tokenizer()
    corpus = load_calibration(text, tok, MIN_TEXT_TOKENS, "distillation")
    train_windows = windows(corpus.ids, WINDOW, MAX_WINDOWS)
    held = windows(tok.encode(heldout_text()), WINDOW, HELDOUT_WINDOWS)
    if threads:
        torch.set_num_threads(threads)
    from edgemesh.backends.base import BackendOptions
    from edgemesh.sharding.pipeline import load_pipeline

    pipe = load_pipeline(teacher_pkg, [], "fp32", options=BackendOptions(threads=threads))
    try:
        teach = package_teacher(pipe)
        model = student_src.load_model().float()
        cached = {}  # held-out teacher logits, reused for the before/after KL
        held_teacher = lambda ids: cached.setdefault(tuple(ids), teach(ids))  # noqa: E731
        kl_before = mean_kl(model, held_teacher, held)
        say(f"held-out KL to the teacher before training: {kl_before:.4f}")
        history = distill(model, teach, train_windows, cfg, state, progress=step_progress)
        kl_after = mean_kl(model, held_teacher, held)
        say(f"held-out KL after {steps} steps: {kl_after:.4f}")
    finally:
        pipe.close()
    hf = save_hf(model, teacher_pkg, state / "student")
    student_params = sum(p.numel() for p in model.parameters())
    del model
    params: dict[str, Any] = {
        "teacher": {"name": teacher_pkg.manifest.name, "digest": teacher_pkg.manifest.digest()},
        "student": str(student_dir),
        "steps": steps,
        "lr": lr,
        "temperature": temperature,
        "window": WINDOW,
        "windows": len(train_windows),
        "heldout_kl": {"before": round(kl_before, 6), "after": round(kl_after, 6)},
        "loss_first_last": [history[0]["loss"], history[-1]["loss"]] if history else [],
        "student_parameters": student_params,
        "size_vs_teacher_fp32": None,
        "state": str(state),
    }
    with Draft(out_path, overwrite) as draft:
        manifest = export_package(
            hf, draft.root, teacher_pkg, f"{student_dir.name}-distilled", precisions, threads
        )
        sizes = {a.path: a.bytes for a in manifest.artifacts}
        mine = sum(
            sizes[r] for r in open_package(draft.root).artifacts_for(0, manifest.num_layers, "fp32")
        )
        theirs = sum(
            a.bytes
            for a in teacher_pkg.manifest.artifacts
            if a.path in teacher_pkg.artifacts_for(0, teacher_pkg.num_layers, "fp32")
        )
        params["size_vs_teacher_fp32"] = round(mine / theirs, 4)
        (state / "distill.json").write_text(json.dumps(params, indent=1))
        return finish(
            draft,
            manifest,
            teacher_pkg,
            method="distill",
            params=params,
            calibration=corpus,
            precisions=("fp32",),
            started=started,
            threads=threads,
            score=score,
            say=say,
        )
