"""Knowledge distillation on CPU: a student learns a teacher's next-token distributions.

One loop serves both uses: the short *recovery* after pruning (teacher: the
unpruned model) and ``slim distill`` (teacher: a package or a Hugging Face
model). The loss is ``KL(teacher || student)`` of the next-token
distributions at temperature ``T``, averaged over positions, times ``T^2``.
Only the decoder layers train: the embedding (tied to the LM head in the
default model, 63% of its weights) stays frozen, which keeps the optimiser
state small enough for a 2-core, shared box.

Training is resumable: every ``save_every`` steps the student's trainable
weights, the optimiser and the step go to ``<state>/train.pt``; each step
appends ``{"step", "loss", "seconds"}`` to ``<state>/loss.jsonl``. A run
started again with the same state folder continues from the saved step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError, require

log = logging.getLogger(__name__)

TeacherFn = Callable[[list[int]], Any]
"""Token ids [S] -> teacher logits, a torch tensor [S, V]."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-4
    temperature: float = 1.0
    save_every: int = 10
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"--steps must be >= 0, got {self.steps}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("the learning rate and temperature must be > 0")


def trainable(model: Any) -> list[Any]:
    """The decoder layers' parameters (embedding and head frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for p in model.model.layers.parameters():
        p.requires_grad_(True)
        params.append(p)
    norm = getattr(model.model, "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def kl_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Mean over positions of KL(teacher || student), times T^2. Both [S, V]."""
    torch = require("torch", "convert")
    f = torch.nn.functional
    s = f.log_softmax(student_logits.float() / temperature, dim=-1)
    t = f.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # [S]
    return kl.mean() * temperature**2


def mean_kl(student: Any, teacher: TeacherFn, windows: list[list[int]]) -> float:
    """KL(teacher || student) at T=1, averaged over the windows' positions (no grad)."""
    torch = require("torch", "convert")
    student.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = student(torch.tensor([ids]), use_cache=False).logits[0]
            total += float(kl_loss(logits, teacher(ids), 1.0)) * len(ids)
            n += len(ids)
    return total / max(n, 1)


def distill(
    student: Any,
    teacher: TeacherFn,
    windows: list[list[int]],
    config: TrainConfig,
    state_dir: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` for ``config.steps`` steps (resuming from ``state_dir``)."""
    torch = require("torch", "convert")
    config.check()
    if not windows:
        raise ConfigError("distillation needs at least one window of text")
    state_dir.mkdir(parents=True, exist_ok=True)
    ckpt, log_file = state_dir / "train.pt", state_dir / "loss.jsonl"
    torch.manual_seed(config.seed)
    params = trainable(student)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    step = 0
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved.get("config") != _resume_key(config) or saved.get("names") != names:
            raise ConfigError(
                f"'{ckpt}' was saved by a different run (config or model differs)",
                hint="use the same options, or another --out / remove that folder",
            )
        student.load_state_dict(saved["weights"], strict=False)
        optim.load_state_dict(saved["optim"])
        step = int(saved["step"])
        log.info("resuming distillation at step %d of %d", step, config.steps)
    history = _read_log(log_file, step)

    def save() -> None:
        weights = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "config": _resume_key(config),
                "names": names,
                "weights": weights,
                "optim": optim.state_dict(),
                "step": step,
            },
            tmp,
        )
        tmp.replace(ckpt)  # a crash mid-save keeps the previous checkpoint

    student.train()
    while step < config.steps:
        t0 = time.perf_counter()
        ids = windows[step % len(windows)]
        target = teacher(ids)  # [S, V], no grad
        logits = student(torch.tensor([ids]), use_cache=False).logits[0]
        loss = kl_loss(logits, target, config.temperature)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        step += 1
        entry = {
            "step": step,
            "loss": round(float(loss.detach()), 6),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(entry)
        with open(log_file, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if progress:
            progress(step, config.steps, float(loss.detach()))
        if step % config.save_every == 0 or step == config.steps:
            save()
    student.eval()
    return history


def _resume_key(config: TrainConfig) -> dict[str, Any]:
    """What must match to resume: everything but the step count, which may grow."""
    key = asdict(config)
    key.pop("steps")
    return key


def _read_log(path: Path, upto: int) -> list[dict[str, float]]:
    """The loss log's entries up to the resumed step (later ones were not checkpointed)."""
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [e for e in entries if e["step"] <= upto]
    if len(kept) != len(entries):
        path.write_text("".join(json.dumps(e) + "\n" for e in kept))
    return kept


def torch_teacher(model: Any) -> TeacherFn:
    torch = require("torch", "convert")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def logits(ids: list[int]) -> Any:
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=False).logits[0].float()

    return logits


def package_teacher(pipeline: Any) -> TeacherFn:
    """Teacher logits from a package's range graphs (``sharding.pipeline.load_pipeline``)."""
    torch = require("torch", "convert")
    import numpy as np

    from edgemesh.backends.base import SeqInput

    def logits(ids: list[int]) -> Any:
        try:
            out = pipeline.forward(
                [SeqInput(11, 0, tokens=np.asarray(ids, np.int64), logits="all")]
            )[0]
        finally:
            pipeline.release(11)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    return logits
