"""Decode steps through compiled graphs: the settings that turn them on, and a model's whole
decode step (embedding, every layer, head) as one traced function (`WholeStep`).

Building a token's graph op by op in Python costs the host as much as the GPU takes to run it
(H200, 397B shapes), so on the GPU backends decode steps are compiled: each layer's step
(`DecoderLayer.decode_step`, in qwen35.py with the math) and, where every layer's step is one
function of arrays, the whole model's, which Python then calls once per token."""

from __future__ import annotations

import operator
import os

import mlx.core as mx

from ..errors import env_switch
from .linear import embedding_rows


def compile_default(ops) -> bool:
    """FLASHMOE_COMPILE: `auto` (default) compiles decode steps on the GPU backends, where
    building each token's graph in Python costs as much as running it; `1` also with the
    kernels' plain twins (tests); `0` never."""
    want = os.environ.get("FLASHMOE_COMPILE", "auto").strip().lower()
    if want in ("0", "off", "no", "false"):
        return False
    if ops is None or ops.backend == "cpu":     # the CPU kernels run on the host: nothing to trace
        return False
    return want in ("1", "on", "yes", "true") or ops.backend in ("cuda", "metal")


def _setting(name: str, ops) -> bool:
    """An `auto | 1 | 0` switch (`env_switch`): auto means on with the GPU backends' kernels, 1
    also with the kernels' plain twins (tests)."""
    want = env_switch(name)
    if want is False or ops is None or ops.backend == "cpu":
        return False
    return want is True or ops.backend in ("cuda", "metal")


_SETTINGS_ENV = ("FLASHMOE_COMPILE_STEP", "FLASHMOE_COMPILE_ATTENTION")


def _env_settings() -> tuple:
    """The environment's say on whole-step compilation, as it is now (a plan made under other
    settings is made again)."""
    env = os.environ
    return tuple(env.get(k) for k in _SETTINGS_ENV)


class StepPlan:
    """What `WholeStep` works out once for a run of steps over the same layers and experts: the
    compiled step (or None: layer by layer) and the expert lookups it takes."""

    def __init__(self, sig, devs):
        self.sig, self.devs = sig, devs
        self.fn, self.lookups = None, []

    def same(self, sig, devs) -> bool:
        """Whether a step of these layers (`sig`: the layers, their ops, their compile switches, the
        environment's settings) reading these experts (`devs`) can use this plan."""
        (layers, ops, comp, env), s = sig, self.sig
        return (env == s[3] and comp == s[2] and len(layers) == len(s[0]) and len(devs) == len(self.devs)
                and all(map(operator.is_, layers, s[0])) and all(map(operator.is_, ops, s[1]))
                and all(map(operator.is_, devs, self.devs)))


def compile_attention(ops) -> bool:
    """FLASHMOE_COMPILE_ATTENTION (auto | 1 | 0): with FLASHMOE_COMPILE, the full-attention
    layers' decode steps compiled whole too (the KV cache written with a slice update at a
    position computed on the device) rather than their mixer built op by op in Python each token.
    On by default with the GPU kernels: on the H200 the pipelined decode is bound by the host's
    work per layer, and this took it from 263.0 to 110.7 us per layer in one run, 135.0 to 113.8
    in another (397B shapes, 4 resident layers, medians of 4 rounds of `overhead settings`)."""
    return _setting("FLASHMOE_COMPILE_ATTENTION", ops)


def compile_whole_step(ops) -> bool:
    """FLASHMOE_COMPILE_STEP (auto | 1 | 0): a decode step of the whole model (embedding, every
    layer, the head) as one compiled graph wherever each layer's step is one function of arrays,
    so that Python calls one function per token rather than one per layer (H200, 4 resident 397B
    layers, pipelined: 77.5 against 113.8 us per layer, medians of 4 rounds)."""
    return _setting("FLASHMOE_COMPILE_STEP", ops)


class WholeStep:
    """A model's decode step as one compiled graph (FLASHMOE_COMPILE_STEP): its traces, per what
    they bake in besides their array inputs, and the last step's plan."""

    def __init__(self, model):
        self.model = model
        self.traces: dict = {}
        self.plan: StepPlan | None = None

    def __call__(self, token: mx.array, cache) -> mx.array | None:
        """One decode step of the whole model as one compiled graph (FLASHMOE_COMPILE_STEP) ->
        float32 logits [1, V], lazily; None where a layer's step is not one function of arrays
        (see `DecoderLayer.whole`): then the layers run one by one. The trace takes the token,
        every layer's state arrays and expert lookups, and gives the logits and the new states; it
        is traced again when a shape changes (a KV buffer growing: at 256, 512, ... tokens, then every
        4096, `KVCache.reserve(ahead=True)`)."""
        model = self.model
        layers = model.layers
        if not layers:
            return None
        devs = [l.device_experts() for l in layers]
        plan = self.plan
        # The step's plan (its trace, which layers' state goes where) holds while the layers, their
        # ops and settings and the experts they read are the same objects as last step: then none
        # of `make_plan`'s per-layer checks and keys is needed (Python's share of a step's host
        # time: 7.8 -> 4-5 us per layer on a desktop CPU).
        sig = ([*layers], [l.ops for l in layers], [l.compile for l in layers], _env_settings())
        if plan is None or not plan.same(sig, devs):
            plan = self.plan = self.make_plan(sig, devs)
        if plan.fn is None:
            return None
        positions: dict = {}
        args = [token]
        for l, c in zip(layers, cache.layers):
            args += l.state_in(c, model.dtype, positions)
        out = plan.fn(*args, *plan.lookups)
        i = 1
        for l, c, d in zip(layers, cache.layers, devs):
            l.state_out(c, out[i:i + 2])
            l.moe.count_device(d)
            i += 2
        return out[0]

    def make_plan(self, sig, devs) -> StepPlan:
        """The plan for these layers and experts: the compiled step (None where a layer's step is
        not one function of arrays, or the settings say no) and its expert lookups."""
        layers = self.model.layers
        plan = StepPlan(sig, devs)
        if not all(l.compile for l in layers):
            return plan
        ops = {id(l.ops): l.ops for l in layers}
        if not all(compile_whole_step(o) for o in ops.values()):
            return plan
        attention = {i: compile_attention(o) for i, o in ops.items()}
        if not all(l.whole(d, attention[id(l.ops)]) for l, d in zip(layers, devs)):
            return plan
        n_state = [l.state_size() for l in layers]
        lookups = [[] if d[3] is None else [d[3]] for d in devs]
        key = tuple(l.step_key(d) for l, d in zip(layers, devs))
        fn = self.traces.get(key)
        if fn is None:
            if len(self.traces) >= 8:    # stacks that changed: drop old traces
                self.traces.clear()
            fn = self.traces[key] = mx.compile(self.step_fn(devs, n_state, [len(lk) for lk in lookups]))
        plan.fn, plan.lookups = fn, [a for lk in lookups for a in lk]
        return plan

    def step_fn(self, devs, n_state, n_lookup):
        """The function traced: (token, states..., lookups...) -> (logits, new states...), two new
        state arrays per layer."""
        model = self.model

        def f(token, *args):
            states, lookups = [], []
            i = 0
            for n in n_state:
                states.append(args[i:i + n])
                i += n
            for n in n_lookup:
                lookups.append(args[i] if n else None)
                i += n
            x = embedding_rows(model.embed, token.reshape(1).astype(mx.int32)).astype(model.dtype).reshape(1, 1, -1)
            new = []
            for layer, d, st, lk in zip(model.layers, devs, states, lookups):
                x, st_new = layer.step_math(d, x, st, lk)
                new += st_new
            return (model.head(x.reshape(1, -1)), *new)
        return f
