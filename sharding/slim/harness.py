"""A small downstream score through lm-evaluation-harness's Python API, on a package.

The gateway's logprobs (issue 16) are not there yet, so the harness talks to
the package directly: ``PackageLM`` is an ``lm_eval.api.model.LM`` whose
``loglikelihood`` runs the package's own range graphs (``load_pipeline``),
the same code every backend and the mesh run. The task is built from the
held-out part of the bundled text (``text.heldout_text``; nothing here
needs the network): *next sentence*, four choices. For each sentence after
the first of a paragraph, the context is the section title and the
paragraph so far, the gold choice is the true next sentence and the three
distractors are sentences of the other held-out paragraphs (fixed seed).
It is scored like HellaSwag: ``acc`` (summed log-likelihood) and
``acc_norm`` (per byte). Chance is 0.25.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.backends.base import BackendOptions, SeqInput
from edgemesh.errors import require
from edgemesh.sharding.package.folder import Package
from edgemesh.sharding.slim.text import heldout_text

log = logging.getLogger(__name__)

TASK = "edgemesh_heldout_next_sentence"
CHOICES = 4
SEED = 0


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", paragraph) if s.strip()]


def next_sentence_docs() -> list[dict[str, Any]]:
    """The task's documents: ``{"context", "choices", "label"}`` from the held-out text."""
    rng = random.Random(SEED)
    sections = [s for s in heldout_text().split("\n\n") if s.strip()]
    paragraphs: list[tuple[str, list[str]]] = []
    title = ""
    for block in sections:
        sents = _sentences(block)
        if len(sents) <= 1 and len(block) < 60:  # a section title
            title = block.strip()
            continue
        paragraphs.append((title, sents))
    docs = []
    for p, (title, sents) in enumerate(paragraphs):
        others = [s for q, (_, ss) in enumerate(paragraphs) if q != p for s in ss]
        for k in range(1, len(sents)):
            distractors = rng.sample(others, CHOICES - 1)
            label = rng.randrange(CHOICES)
            choices = [*distractors[:label], sents[k], *distractors[label:]]
            docs.append(
                {
                    "context": f"{title}\n\n" + " ".join(sents[:k]),
                    "choices": choices,
                    "label": label,
                }
            )
    return docs


def _lm_class() -> type:
    require("lm_eval", "slim")
    from lm_eval.api.model import LM

    class PackageLM(LM):
        """lm-eval's model interface over a package at one precision (greedy, B=1)."""

        def __init__(self, package: Package, precision: str, options: BackendOptions) -> None:
            super().__init__()
            from edgemesh.sharding.pipeline import load_pipeline

            self.pkg = package
            self.tok = package.tokenizer()
            self.pipe = load_pipeline(package, [], precision, options=options)

        def close(self) -> None:
            self.pipe.close()

        def _logprobs(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
            """Score several continuations of one context, prefilling it once."""
            seq = 7
            first = self.pipe.forward([SeqInput(seq, 0, tokens=np.asarray(ctx, np.int64))])[0]
            out = []
            try:
                for cont in conts:
                    rows = [first[-1]]  # [V] predicts cont[0]
                    if len(cont) > 1:
                        step = SeqInput(
                            seq, len(ctx), tokens=np.asarray(cont[:-1], np.int64), logits="all"
                        )
                        rows += list(self.pipe.forward([step])[0])  # rewinds to len(ctx) each time
                    logits = np.stack(rows).astype(np.float64)  # [n, V]
                    top = logits.max(-1, keepdims=True)
                    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
                    picked = logits[np.arange(len(cont)), cont]
                    greedy = bool((logits.argmax(-1) == np.asarray(cont)).all())
                    out.append((float((picked - logz).sum()), greedy))
            finally:
                self.pipe.release(seq)
            return out

        def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(req.args[0], []).append(i)
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            for context, idx in groups.items():
                ctx = self.tok.encode(context)
                conts = [self.tok.encode(requests[i].args[1], add_bos=False) for i in idx]
                for i, r in zip(idx, self._logprobs(ctx, conts), strict=True):
                    results[i] = r
            return [r for r in results if r is not None]

        def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
            out = []
            for req in requests:
                ids = self.tok.encode(req.args[0])
                out.append(self._logprobs(ids[:1], [ids[1:]])[0][0] if len(ids) > 1 else 0.0)
            return out

        def generate_until(self, requests: Sequence[Any]) -> list[str]:
            from edgemesh.offline import generate

            texts = []
            for req in requests:
                context, kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {})
                result = generate(
                    self.pipe,
                    self.tok.encode(context),
                    max_tokens=int(kwargs.get("max_gen_toks", 32)),
                    eos_ids=sorted(self.tok.eos_ids),
                )
                text = self.tok.decode(result.token_ids)
                for stop in kwargs.get("until", []) or []:
                    text = text.split(stop)[0]
                texts.append(text)
            return texts

    return PackageLM


@dataclass(frozen=True)
class Score:
    task: str
    acc: float
    acc_norm: float
    docs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "acc": round(self.acc, 4),
            "acc_norm": round(self.acc_norm, 4),
            "docs": self.docs,
        }


def downstream_score(
    package: Package, precision: str, options: BackendOptions, limit: int | None = None
) -> Score:
    """Run the next-sentence task through ``lm_eval.simple_evaluate`` on the package."""
    # Local files only: the json builder of `datasets` must not ask the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = require("lm_eval", "slim")
    docs = next_sentence_docs()[:limit] if limit else next_sentence_docs()
    with tempfile.TemporaryDirectory(prefix="edgemesh-harness-") as tmp:
        data = Path(tmp) / "test.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        task = {
            "task": TASK,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "target_delimiter": " ",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
        lm = _lm_class()(package, precision, options)
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        finally:
            lm.close()
    metrics = results["results"][TASK]
    return Score(TASK, float(metrics["acc,none"]), float(metrics["acc_norm,none"]), len(docs))
