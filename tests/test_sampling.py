import numpy as np
import pytest

from edgemesh.errors import RequestError
from edgemesh.sampling import SamplingParams, apply_penalties, sample


def _logits(vocab: int = 5000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert sample(logits, SamplingParams(temperature=0.0), np.random.default_rng()) == int(
        np.argmax(logits)
    )


def test_seed_makes_sampling_repeatable() -> None:
    logits = _logits()
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, params, np.random.default_rng(7)) for _ in range(5)]
    b = [sample(logits, params, np.random.default_rng(7)) for _ in range(5)]
    assert a == b


def test_top_k_only_returns_the_k_best() -> None:
    logits = _logits()
    best = set(np.argsort(-logits)[:3].tolist())
    rng = np.random.default_rng(1)
    draws = {sample(logits, SamplingParams(temperature=2.0, top_k=3), rng) for _ in range(300)}
    assert draws <= best and len(draws) == 3


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_the_nucleus_by_brute_force(top_p: float) -> None:
    # A flat distribution forces the fallback past the 1,024 candidates.
    logits = _logits(vocab=4000, seed=3) * (0.1 if top_p > 0.9 else 1.0)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    nucleus = set(order[:keep].tolist())
    rng = np.random.default_rng(2)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=top_p), rng) for _ in range(400)}
    assert draws <= nucleus
    if keep > 1:
        assert len(draws) > 1


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    rng = np.random.default_rng(4)
    draws = np.bincount([sample(logits, SamplingParams(), rng) for _ in range(4000)], minlength=3)
    assert np.allclose(draws / 4000, [0.7, 0.2, 0.1], atol=0.03)


def test_penalties_lower_seen_tokens() -> None:
    logits = np.zeros(10, dtype=np.float32)
    out = apply_penalties(
        logits, {3: 2, 5: 1}, SamplingParams(presence_penalty=0.5, frequency_penalty=1.0)
    )
    assert out[3] == pytest.approx(-2.5) and out[5] == pytest.approx(-1.5) and out[0] == 0
    assert logits[3] == 0  # the caller's array is untouched


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 2.5},
        {"top_p": 0.0},
        {"max_tokens": -1},
        {"top_k": -1},
        {"presence_penalty": 3.0},
    ],
)
def test_bad_parameters_raise_request_errors(kwargs: dict) -> None:
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_grammar_mask_allows_only_its_tokens_even_at_high_temperature() -> None:
    import pickle

    from edgemesh.pipeline import Pick

    logits = _logits(vocab=1000)
    allowed = [3, 64, 999]
    bits = np.zeros((1000 + 31) // 32, dtype=np.uint32)
    for t in allowed:
        bits[t // 32] |= np.uint32(1 << (t % 32))
    params = SamplingParams(temperature=2.0, logprobs=2)
    picks = [Pick(params, seed=1, step=s, allowed=bits) for s in range(200)]
    # Picks cross Ray to the last stage: they must survive pickling unchanged.
    picks = [pickle.loads(pickle.dumps(p)) for p in picks]
    out = [p.apply(logits[None]) for p in picks]
    assert {o.token for o in out} == set(allowed)
    for o in out:
        assert len(o.top) == 2 and {t for t, _ in o.top} <= set(allowed)
        probs = np.exp(logits[allowed] - logits[allowed].max())
        expected = np.log(probs[allowed.index(o.token)] / probs.sum())
        assert o.logprob == pytest.approx(expected, abs=1e-4)  # renormalised over the mask


def test_logit_bias_and_prompt_scoring() -> None:
    from edgemesh.pipeline import Pick
    from edgemesh.sampling import apply_logit_bias, logprobs_of

    logits = _logits(vocab=50)
    biased = apply_logit_bias(logits, ((7, 100.0), (10**6, 5.0)))
    assert int(np.argmax(biased)) == 7 and np.array_equal(logits, _logits(vocab=50))
    rows = np.stack([_logits(50, seed=s) for s in range(3)])  # [S, V]
    pick = Pick(SamplingParams(temperature=0.0, logprobs=1), 0, 0, score=np.array([4, 9]))
    got = pick.apply(rows)
    assert [s[0] for s in got.scored] == pytest.approx(
        [logprobs_of(rows[0], 4, 0)[0], logprobs_of(rows[1], 9, 0)[0]]
    )
    assert got.token == int(np.argmax(rows[-1]))
    with pytest.raises(RequestError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 500.0),))
