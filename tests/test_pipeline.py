"""Pipelined decode (the next step built on a token sampled on the device, before it is read
back) against the step-by-step loop, and the device sampler against the host one."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import mlx.core as mx

from llm_flashmoe.engine.cache import KVCache
from llm_flashmoe.engine.generate import Session
from llm_flashmoe.engine.sampling import DeviceSampler, Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture()
def twin_model(tiny_mlx, monkeypatch):
    """The tiny model, all experts resident, through the fused ops' twins with compiled decode
    steps: the configuration of a GPU backend, whose steps need no host round trip."""
    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.setenv("FLASHMOE_COMPILE", "1")
    from llm_flashmoe.engine.load import load_model

    model = load_model(tiny_mlx)
    assert model.pipelinable()
    steps = []
    real = model.step
    model.step = lambda token, cache: steps.append(1) or real(token, cache)
    model.steps_taken = steps
    return model


def _states(cache):
    out = []
    for c in cache.layers:
        if isinstance(c, KVCache):
            out += [np.array(c.keys[:, :, : c.offset]), np.array(c.values[:, :, : c.offset])]
        else:
            out += [np.array(c.conv), np.array(c.recurrent)]
    return out


def _run(model, monkeypatch, pipeline: str, prompts, take=None, **kw):
    """Generate for each prompt in turn in one session -> (token lists, the cache's tokens after
    each turn, its states after each turn, the last turn's stats)."""
    monkeypatch.setenv("FLASHMOE_PIPELINE", pipeline)
    s = Session(model)
    outs, tokens, states = [], [], []
    for i, p in enumerate(prompts):
        gen = s.generate(p, **kw)
        if take is not None and i == 0:
            got = [t for _, t in zip(range(take), gen)]
            gen.close()
        else:
            got = list(gen)
        outs.append(got)
        tokens.append(list(s.cache.tokens))
        states += _states(s.cache)
    return outs, tokens, states, s.stats


@pytest.mark.parametrize("case", ["length", "stop", "closed", "one"])
def test_pipelined_decode_matches_step_by_step(twin_model, monkeypatch, case):
    """The same tokens, and the cache left exactly as the step-by-step loop leaves it, whether
    generation ends at max_tokens, at a stop token, or when the caller stops iterating; a second
    turn on the same session then continues identically."""
    prompt = [5, 17, 300, 42, 7, 99]
    first, _, _, _ = _run(twin_model, monkeypatch, "0", [prompt], max_tokens=10, params=GREEDY)
    kw = dict(max_tokens=10, params=GREEDY)
    take = None
    if case == "stop":
        kw["stop_token_ids"] = [first[0][4]]
    if case == "closed":
        take = 3
    if case == "one":
        kw["max_tokens"] = 1
    second = prompt + first[0][:3] + [11, 12]
    ref = _run(twin_model, monkeypatch, "0", [prompt, second], take=take, **kw)
    twin_model.steps_taken.clear()
    got = _run(twin_model, monkeypatch, "auto", [prompt, second], take=take, **kw)
    # (with one token to make, nothing is fed: the last token never is)
    assert bool(twin_model.steps_taken) == (case != "one"), "the pipelined loop ran as expected"
    assert got[0] == ref[0]
    assert got[1] == ref[1]
    assert len(got[2]) == len(ref[2])
    for a, b in zip(got[2], ref[2]):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert got[3].finish_reason == ref[3].finish_reason
    if case == "stop":
        assert len(ref[0][0]) == first[0].index(first[0][4])


def test_logits_processors_keep_the_step_by_step_loop(twin_model, monkeypatch):
    monkeypatch.setenv("FLASHMOE_PIPELINE", "auto")
    seen = []
    list(Session(twin_model).generate([1, 2, 3], max_tokens=4, params=GREEDY,
                                      logits_processors=[lambda out, row: seen.append(1) or row]))
    assert len(seen) == 4 and not twin_model.steps_taken


def _expected(logits, p: SamplingParams, vocab=None):
    """The distribution the samplers draw from, written out directly."""
    l = logits.astype(np.float64).copy()
    if vocab is not None:
        l[vocab:] = -np.inf
    l /= p.temperature
    order = np.argsort(-l, kind="stable")[: p.top_k or len(l)]
    pr = np.exp(l[order] - l[order[0]])
    pr /= pr.sum()
    keep = (pr >= p.min_p * pr[0]) & ((np.cumsum(pr) - pr) < p.top_p)
    keep[0] = True
    out = np.zeros(len(l))
    out[order[keep]] = pr[keep] / pr[keep].sum()
    return out


@pytest.mark.parametrize("params", [SamplingParams(0.8, 0.9, 10, 0.05, seed=3),
                                    SamplingParams(1.3, 1.0, 0, 0.0, seed=4),
                                    SamplingParams(0.6, 0.5, 5, 0.2, seed=5)])
def test_device_sampler_draws_from_the_host_samplers_distribution(params):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 40).astype(np.float32)
    vocab = 36
    logits[37] = 50.0                                   # past the vocabulary: never drawn
    want = _expected(logits, params, vocab)
    dev = DeviceSampler(params, vocab_size=vocab)
    x = mx.array(logits)
    n = 3000
    draws = np.array([int(dev(x).item()) for _ in range(n)])
    host = Sampler(params)
    masked = logits.copy()
    masked[vocab:] = -np.inf
    host_draws = np.array([host(masked) for _ in range(n)])
    for d in (draws, host_draws):
        assert set(d) <= set(np.flatnonzero(want))
        freq = np.bincount(d, minlength=len(want)) / n
        assert 0.5 * np.abs(freq - want).sum() < 0.05     # total variation; ~0.02 expected at n=3000
    # reproducible for a seed
    again = DeviceSampler(params, vocab_size=vocab)
    assert [int(again(x).item()) for _ in range(20)] == draws[:20].tolist()


def test_device_sampler_greedy_is_the_host_argmax():
    logits = np.array([0.5, 3.0, -1.0, 3.0, 2.0, 9.0], np.float32)
    dev = DeviceSampler(GREEDY, vocab_size=5)          # 9.0 lies past the vocabulary
    host = Sampler(GREEDY)
    masked = logits.copy()
    masked[5:] = -np.inf
    assert int(dev(mx.array(logits)).item()) == host(masked) == 1    # the first of equal maxima


@pytest.mark.parametrize("whole_step", ["0", "1"])
def test_compiled_attention_layers_and_whole_steps_match_op_by_op(tiny_mlx, monkeypatch, whole_step):
    """FLASHMOE_COMPILE_ATTENTION: the attention layers' decode steps compiled whole (the KV cache
    written by a slice update at a position held in an array) give the logits and the cache of
    the op-by-op attention step, across KV buffer growth (blocks of 4 tokens here; compiled steps
    grow the buffers by doubling, each growth a new trace), step by step and pipelined;
    FLASHMOE_COMPILE_STEP: the same with the whole model's step (embedding, layers, head) as one
    compiled graph."""
    import llm_flashmoe.engine.cache as cache_mod
    from llm_flashmoe.engine.load import load_model

    monkeypatch.setattr(cache_mod, "_KV_STEP", 4)
    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.setenv("FLASHMOE_COMPILE", "1")
    monkeypatch.setenv("FLASHMOE_COMPILE_STEP", whole_step)
    model = load_model(tiny_mlx)
    prompt = [5, 17, 300, 42, 7]
    got = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("FLASHMOE_COMPILE_ATTENTION", mode)
        cache = model.make_cache()
        logits = [model(prompt, cache, last_only=True)]
        for t in [9, 1000, 77, 5, 123456, 8, 2, 31, 64, 900]:
            logits.append(model([t], cache))
        got[mode] = (np.stack([np.array(l).reshape(-1) for l in logits]), _states(cache), cache.layers)
        attn = [c for c in cache.layers if isinstance(c, KVCache)]
        assert attn and all(c.offset == len(prompt) + 10 for c in attn)
        assert len(cache.tokens) == len(prompt) + 10
    ref, new = got["0"], got["1"]
    assert np.array_equal(ref[0].argmax(axis=1), new[0].argmax(axis=1))
    np.testing.assert_allclose(new[0], ref[0], rtol=1e-4, atol=1e-4 * np.abs(ref[0]).max())
    for a, b in zip(new[1], ref[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # what ran compiled: the whole step (traced again per KV buffer shape), or each layer whole
    attn_whole = [k for l in model.layers if not l.is_linear for k in l._compiled if k[0] == "layer"]
    if whole_step == "1":
        assert len(model.whole_step.traces) == 1 and not attn_whole
    else:
        assert not model.whole_step.traces and attn_whole
    # and pipelined generation through it equals step by step
    outs = {}
    for pipe in ("0", "auto"):
        monkeypatch.setenv("FLASHMOE_PIPELINE", pipe)
        s = Session(model)
        outs[pipe] = (list(s.generate(prompt, max_tokens=9, params=GREEDY)), _states(s.cache))
    assert outs["auto"][0] == outs["0"][0]
    for a, b in zip(outs["auto"][1], outs["0"][1]):
        assert np.array_equal(a, b)


def test_the_whole_steps_plan_is_kept_until_its_layers_experts_or_settings_change(tiny_mlx, monkeypatch):
    """WholeStep (engine/compiled.py) works out its plan (the compiled step, which layer's state goes
    where) once and keeps it while the same layers read the same experts under the same settings;
    a change of any of them makes it again (and a bad setting is still refused mid-run)."""
    from llm_flashmoe.engine.load import load_model
    from llm_flashmoe.errors import FlashMoeError

    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.setenv("FLASHMOE_COMPILE", "1")
    monkeypatch.setenv("FLASHMOE_COMPILE_STEP", "1")
    monkeypatch.setenv("FLASHMOE_COMPILE_ATTENTION", "1")
    model = load_model(tiny_mlx)
    cache = model.make_cache()
    model([5, 17, 300], cache, last_only=True)
    steps = []

    def step(t):
        steps.append(np.array(model([t], cache)).reshape(-1))
        return model.whole_step.plan

    plan = step(9)
    assert plan.fn is not None and step(1000) is plan and step(77) is plan
    monkeypatch.setenv("FLASHMOE_COMPILE_STEP", "0")        # layer by layer from the next step
    off = step(5)
    assert off is not plan and off.fn is None
    monkeypatch.setenv("FLASHMOE_COMPILE_STEP", "1")        # back: the same trace, a new plan
    again = step(8)
    assert again is not plan and again.fn is plan.fn
    experts = model.layers[0].moe.experts                   # layer 0's experts: a new stack object
    before = model.layers[0].device_experts()
    experts.layers[0] = tuple(list(experts.layers[0]))
    assert model.layers[0].device_experts() is not before
    moved = step(2)
    assert moved is not again and moved.fn is plan.fn      # the same stacks' weights: the same trace
    model.layers[-1] = model.layers[-1]                     # the same layer put back: the plan holds
    assert step(4) is moved
    model.layers[0] = copy.copy(model.layers[0])     # another layer object reading the same experts
    swapped = step(6)                                  # with the same ops: a plan and a trace of its own
    assert swapped is not moved and swapped.fn is not None and swapped.fn is not plan.fn
    monkeypatch.setenv("FLASHMOE_COMPILE_STEP", "maybe")
    with pytest.raises(FlashMoeError, match="FLASHMOE_COMPILE_STEP"):
        step(3)
    # every step decoded the same way as a fresh model layer by layer
    monkeypatch.setenv("FLASHMOE_COMPILE_STEP", "0")
    ref_model = load_model(tiny_mlx)
    ref_cache = ref_model.make_cache()
    ref_model([5, 17, 300], ref_cache, last_only=True)
    assert len(steps) == 8
    for t, got in zip([9, 1000, 77, 5, 8, 2, 4, 6], steps):
        want = np.array(ref_model([t], ref_cache)).reshape(-1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_compile_settings_are_checked(monkeypatch):
    from llm_flashmoe import kernels
    from llm_flashmoe.engine.compiled import compile_attention, compile_whole_step
    from llm_flashmoe.errors import FlashMoeError

    twin, cuda = kernels.ops("twin"), kernels.Ops("cuda", *[None] * len(kernels.OP_NAMES))
    for name, fn in (("FLASHMOE_COMPILE_ATTENTION", compile_attention), ("FLASHMOE_COMPILE_STEP", compile_whole_step)):
        monkeypatch.setenv(name, "auto")      # on with the GPU kernels only
        assert fn(cuda) and not fn(twin) and not fn(None)
        monkeypatch.setenv(name, "1")
        assert fn(cuda) and fn(twin) and not fn(None)
        monkeypatch.setenv(name, "0")
        assert not fn(cuda)
        monkeypatch.setenv(name, "maybe")
        with pytest.raises(FlashMoeError, match=name):
            fn(cuda)


def test_a_bad_pipeline_setting_is_refused(monkeypatch):
    from llm_flashmoe.engine.generate import pipeline_wanted
    from llm_flashmoe.errors import FlashMoeError

    for v, want in (("auto", True), ("", True), ("0", False), ("off", False)):
        monkeypatch.setenv("FLASHMOE_PIPELINE", v)
        assert pipeline_wanted() is want
    monkeypatch.setenv("FLASHMOE_PIPELINE", "sometimes")
    with pytest.raises(FlashMoeError, match="FLASHMOE_PIPELINE"):
        pipeline_wanted()


def test_pipelined_timing_of_the_first_layers_runs_those_and_restores_the_model(tiny_mlx, monkeypatch):
    """decode_bench's marginal per-layer cost times the model cut to its first layers: only those
    run, and the model has all its layers again afterwards."""
    from llm_flashmoe.engine.load import load_model
    from llm_flashmoe.engine.qwen35 import DecoderLayer
    from llm_flashmoe.kernels.decode_bench import marginal_layer_time, pipelined_time

    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.setenv("FLASHMOE_COMPILE", "0")
    model = load_model(tiny_mlx)
    layers = list(model.layers)
    ran = []
    real = DecoderLayer.__call__
    monkeypatch.setattr(DecoderLayer, "__call__", lambda self, x, c: ran.append(layers.index(self)) or real(self, x, c))
    pipelined_time(model, [5, 17, 300], 3, warmup=1, first=3)
    assert set(ran) == {0, 1, 2}
    assert model.layers == layers
    ran.clear()
    per_layer, rest, whole = marginal_layer_time(model, [5, 17], 2)
    assert set(ran) == set(range(len(layers))) and model.layers == layers
    assert abs(rest + len(layers) * per_layer - whole) < 1e-9    # (the split of the whole model's time)


def test_marginal_layer_time_in_pairs_takes_each_half_against_the_whole_just_before(monkeypatch):
    """`marginal_layer_time(..., pairs=N)`: the whole model and its first half timed in turn, each
    half against the whole just before it; the medians of those differences and of the wholes
    (the caller's whole time is the first pair's). The timings are scripted here: what is tested
    is the order of the calls and the arithmetic."""
    from llm_flashmoe.kernels import decode_bench

    class Model:
        layers = list(range(8))

    script = iter([5.0, 9.0, 5.5, 10.0, 6.0])      # half, whole, half, whole, half (seconds/token)
    calls = []

    def timed(model, prompt, steps, embed_head_only=False, warmup=16, first=None):
        calls.append(first)
        return next(script), 0.0

    monkeypatch.setattr(decode_bench, "pipelined_time", timed)
    per, rest, whole = decode_bench.marginal_layer_time(Model(), [1], 4, whole=8.0, pairs=3)
    assert calls == [4, None, 4, None, 4]
    diffs = [(8.0 - 5.0) / 4, (9.0 - 5.5) / 4, (10.0 - 6.0) / 4]
    assert per == sorted(diffs)[1] and whole == 9.0 and rest == 9.0 - 8 * per


def test_pipelined_rounds_summary_is_the_median_of_each_column():
    """decode_bench's summary of its pipelined rounds: each figure the median over the rounds
    (a round's missing marginal figure left out), each round's marginal figure listed."""
    from llm_flashmoe.kernels.decode_bench import pipe_summary

    rounds = [(1.4, 0.0, 0.6, 100.0, 147.0, 0.24), (1.2, 0.1, 0.7, 80.0, 93.8, 0.30),
              (1.0, 0.2, 0.5, 60.0, float("nan"), float("nan"))]
    line = pipe_summary(rounds, 8)
    assert "median of 3 rounds: 1.20 ms/token (host waits 0.10), embed+head 0.60 ms, 80.0 us/layer" in line
    assert "8 layers against 4: 120.4 us per layer, the rest 0.27 ms/token" in line
    assert f"-> 60 layers: {0.27 + 60 * 120.4 / 1e3:.1f} ms/token" in line
    assert "(marginal per round: 147.0 93.8 nan)" in line


def test_kv_buffers_grow_ahead_by_doubling_for_compiled_steps():
    """A compiled step is traced again whenever the KV buffers change shape: for those steps
    (`ahead`) the buffers double, up to _KV_AHEAD_MAX tokens at a time; otherwise they grow in
    blocks of _KV_STEP."""
    from llm_flashmoe.engine.cache import _KV_AHEAD_MAX, _KV_STEP

    def capacities(ahead, upto):
        c, seen = KVCache(), []
        c.reserve(5, 2, 8, mx.float32)
        while c.offset < upto:
            c.reserve(1, 2, 8, mx.float32, ahead=ahead)
            if not seen or seen[-1] != c.keys.shape[2]:
                seen.append(c.keys.shape[2])
            c.offset += 1
        return seen

    top = 2 * _KV_AHEAD_MAX + _KV_STEP
    doubling = [_KV_STEP * 2 ** i for i in range(20) if _KV_STEP * 2 ** i <= _KV_AHEAD_MAX]
    assert capacities(True, top) == doubling + [2 * _KV_AHEAD_MAX, 3 * _KV_AHEAD_MAX]
    assert capacities(False, 4 * _KV_STEP) == [_KV_STEP * i for i in range(1, 5)]
