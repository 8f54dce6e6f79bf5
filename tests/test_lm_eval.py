"""lm-evaluation-harness against the gateway, as its users run it (the `lm_eval`
command, `local-completions` model, remote tokenizer through /tokenize).

lm-eval's own tasks download their data sets, and there is no internet here,
so the test writes two tiny tasks of its own: a task YAML per task over a
local jsonl file (`dataset_path: json` + `data_files`, read by the
`datasets` json builder offline). One is scored by loglikelihood
(`multiple_choice`: echo + logprobs), one by generation (`generate_until`).
The loglikelihoods lm-eval logs must equal the backend's own, computed here
from the pipeline's logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemesh.backends.base import SeqInput
from edgemesh.gateway import create_app
from edgemesh.gateway.service import ModelService
from edgemesh.limits import ServingLimits
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource

pytestmark = pytest.mark.slow

MC = [
    {"question": "The cat sat on the", "choices": ["mat", "moon"], "answer": 0},
    {"question": "One, two,", "choices": ["three", "blue"], "answer": 0},
    {"question": "The sky is", "choices": ["blue", "loud"], "answer": 0},
]
GEN = [
    {"question": "Once upon a time", "answer": " there"},
    {"question": "The end of the", "answer": " story"},
]
MC_TASK = """task: edgemesh_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: edgemesh_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelService]:
    from tests.fixtures.tiny_models import convert_tiny_model

    pkg = convert_tiny_model("qwen2", tmp_path_factory.mktemp("lmeval"), precisions=("fp32",))
    svc = load_service(
        ModelSource("tiny", Path(pkg), "package"),
        LocalOptions(
            ServingLimits(threads=1, context_length=256, max_sequences=4),
            backend="onnxruntime",
            precision="fp32",
        ),
    )
    yield svc
    svc.close()


def _tasks(folder: Path) -> None:
    for name, rows, task in (("mc", MC, MC_TASK), ("gen", GEN, GEN_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"tiny_{name}.yaml").write_text(task.format(data=data))


def _reference_loglikelihood(service: ModelService, context: str, continuation: str) -> float:
    """log p(continuation | context) from the pipeline's logits, outside the gateway."""
    tok = service.tokenizer
    # lm-eval tokenizes the two parts apart (through /tokenize) and joins the ids.
    ctx = tok.encode(context, add_bos=False)
    whole = ctx + tok.encode(continuation, add_bos=False)
    pipe = service.engine.pipeline
    seq = 10**9  # far from the engine's ids
    try:
        (logits,) = pipe.forward([SeqInput(seq, 0, tokens=np.asarray(whole), logits="all")])
    finally:
        pipe.release(seq)
    x = logits.astype(np.float64)  # [S, V]
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return float(sum(x[i - 1, whole[i]] - lse[i - 1] for i in range(len(ctx), len(whole))))


def test_lm_eval_scores_a_served_model(service: ModelService, tmp_path: Path) -> None:
    from tests.conftest import LiveServer

    exe = shutil.which("lm_eval")
    if exe is None:
        pytest.skip("lm-eval is not installed (pip install 'edgemesh[dev]')")
    _tasks(tmp_path)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    with LiveServer(create_app([service])) as live:
        args = (
            f"model=tiny,base_url={live.url}/v1/completions,tokenizer_backend=remote,"
            "num_concurrent=1,max_retries=1"
        )
        run = subprocess.run(
            [
                exe,
                "--model",
                "local-completions",
                "--model_args",
                args,
                "--tasks",
                "edgemesh_tiny_mc,edgemesh_tiny_gen",
                "--include_path",
                str(tmp_path),
                "--output_path",
                str(out),
                "--log_samples",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=tmp_path,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    acc = results["edgemesh_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert 0.0 <= results["edgemesh_tiny_gen"]["exact_match,none"] <= 1.0
    (samples,) = out.rglob("samples_edgemesh_tiny_mc_*.jsonl")
    rows: list[dict[str, Any]] = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == len(MC)
    for row in rows:
        doc = row["doc"]
        for choice, resp in zip(doc["choices"], row["resps"], strict=True):
            ll = float(resp[0][0])
            assert ll == pytest.approx(
                # lm-eval joins context and choice with its target_delimiter, " "
                _reference_loglikelihood(service, doc["question"], " " + choice),
                abs=2e-3,
            )
    (gen_samples,) = out.rglob("samples_edgemesh_tiny_gen_*.jsonl")
    gen_rows = [json.loads(line) for line in gen_samples.read_text().splitlines()]
    assert all(isinstance(r["resps"][0][0], str) for r in gen_rows)
