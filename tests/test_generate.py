"""Sampling, the generation loop and state reuse across a conversation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.engine.generate import IM_START, Session
from llm_flashmoe.engine.load import load_model
from llm_flashmoe.engine.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def model(tiny_mlx):
    return load_model(tiny_mlx, dtype=mx.float32)


def test_sampler_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = lambda p: {Sampler(SamplingParams(seed=s, **p))(logits) for s in range(200)}  # noqa: E731
    assert draws(dict(temperature=0)) == {0}
    assert draws(dict(temperature=1, top_k=1, top_p=1)) == {0}
    assert draws(dict(temperature=1, top_k=0, top_p=1)) == {0, 1, 2, 3}
    assert draws(dict(temperature=1, top_k=2, top_p=1)) == {0, 1}
    assert draws(dict(temperature=1, top_k=0, top_p=0.7)) == {0, 1}   # 0.5 < 0.7, 0.5+0.3 >= 0.7
    assert draws(dict(temperature=1, top_k=0, top_p=1, min_p=0.35)) == {0, 1}  # 0.15 < 0.35*0.5


def test_sampler_respects_masks_and_seed():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    logits[::2] = -np.inf
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=0)
    a = [Sampler(p)(logits) for _ in range(3)]
    assert all(t % 2 == 1 for t in a)
    s1, s2 = Sampler(p), Sampler(p)
    assert [s1(logits) for _ in range(20)] == [s2(logits) for _ in range(20)]


def test_seeded_generation_reproducible_and_stop_tokens(model):
    prompt = list(range(1000, 1020))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=0)
    a = list(Session(model).generate(prompt, params=p, max_tokens=12))
    b = list(Session(model).generate(prompt, params=p, max_tokens=12))
    c = list(Session(model).generate(prompt, params=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1),
                                     max_tokens=12))
    assert a == b and len(a) == 12
    assert a != c
    s = Session(model)
    stopped = list(s.generate(prompt, params=p, max_tokens=12, stop_token_ids=[a[5]]))
    assert stopped == a[: a.index(a[5])]
    assert s.stats.finish_reason == "stop"


def test_logits_processor_forces_tokens(model):
    forced = [11, 22, 33]

    def force(out, logits):
        masked = np.full_like(logits, -np.inf)
        masked[forced[len(out) % 3]] = 0
        return masked

    got = list(Session(model).generate([5, 6, 7], max_tokens=6, logits_processors=[force]))
    assert got == forced * 2


def test_conversation_reuses_state_and_matches_fresh_run(model):
    # Turn 1 prompt ends with a generation header after an <|im_start|>.
    turn1 = [IM_START, 100, 101, 102, 248046, IM_START, 200, 201]
    s = Session(model, prefill_chunk=4)
    greedy = SamplingParams(temperature=0)
    out1 = list(s.generate(turn1, params=greedy, max_tokens=5))
    assert s.stats.processed_tokens == len(turn1)
    # Turn 2 drops turn 1's generation header (as history rendering may) but
    # keeps everything before it: only the new tokens are run.
    turn2 = turn1[:5] + [IM_START, 300] + out1 + [248046, IM_START, 400, 401]
    out2 = list(s.generate(turn2, params=greedy, max_tokens=5))
    assert s.stats.processed_tokens == len(turn2) - 5
    fresh = list(Session(model).generate(turn2, params=greedy, max_tokens=5))
    assert out2 == fresh
    # A prompt that extends the live state (prompt + generated) runs only its tail.
    turn3 = turn2 + out2[:-1] + [7, 8]
    list(s.generate(turn3, params=greedy, max_tokens=2))
    assert s.stats.processed_tokens == 2


def test_padding_rows_never_sampled(model):
    # Push every padding id above the real tokens: still none is chosen.
    def favour_padding(out, logits):
        logits = logits.copy()
        logits[248077:] = 1e4
        return logits

    s = Session(model)
    got = list(s.generate([1, 2, 3], params=SamplingParams(temperature=0), max_tokens=4,
                          logits_processors=[favour_padding], vocab_size=248077))
    assert len(got) == 4 and all(t < 248077 for t in got)


def test_set_experts_per_token(model):
    model.set_experts_per_token(2)
    try:
        assert all(layer.moe.k == 2 for layer in model.layers)
    finally:
        model.set_experts_per_token(4)
