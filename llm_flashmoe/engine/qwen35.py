"""The Qwen3.5 MoE forward pass (SPEC section 2), batch of one sequence.

    layer:  h = x + mixer(rmsnorm(x));  out = h + moe(rmsnorm(h))
    mixer:  GatedDeltaNet (3 of every 4 layers) or gated full attention
    model:  embed -> layers -> rmsnorm -> lm_head

Shapes: T tokens in this call, H hidden, E experts, K experts per token,
Hq/Hkv/Dh attention heads, Hk/Hv/Dk/Dv linear-attention heads.
All weights are plain `Linear`s and arrays taken from the internal-name
dict of checkpoint.py; the experts come from an `ExpertSource`.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..errors import FlashMoeError, env_switch
from ..experts.source import ExpertSource, ResidentExperts
from .. import kernels
from .cache import KVCache, LinearAttentionState, ModelCache
from .compiled import WholeStep, compile_attention, compile_default
from .linear import Linear, embedding_rows, matrix_with_room


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt((x32 * x32).sum(-1, keepdims=True) + eps)).astype(x.dtype)


def take_linear(w: dict, name: str, cfg: ModelConfig, dtype) -> Linear:
    q = cfg.quant_for(name)
    if q is None:
        return Linear(w[name + ".weight"].astype(dtype))
    lin = Linear(w[name + ".weight"], w[name + ".scales"].astype(dtype), w[name + ".biases"].astype(dtype),
                 q.bits, q.group_size)
    return matrix_with_room(lin)


class GatedDeltaNet:
    """Linear attention: a gated delta-rule recurrence over a causal conv."""

    def __init__(self, cfg: ModelConfig, w: dict, p: str, dtype):
        L = lambda n: take_linear(w, p + n, cfg, dtype)  # noqa: E731
        self.in_proj_qkv, self.in_proj_z = L("in_proj_qkv"), L("in_proj_z")
        self.in_proj_b, self.in_proj_a, self.out_proj = L("in_proj_b"), L("in_proj_a"), L("out_proj")
        self.conv_weight = w[p + "conv1d.weight"].astype(dtype)         # [C, Kc]
        self.dt_bias = w[p + "dt_bias"].astype(mx.float32)              # [Hv]
        self.A = -mx.exp(w[p + "A_log"].astype(mx.float32))             # [Hv], negative decay rate
        self.norm_weight = w[p + "norm.weight"].astype(dtype)           # [Dv]
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.Dk, self.Dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.eps = cfg.rms_norm_eps
        self.ops = kernels.ops()
        self.after: list[Linear] = []   # the matrices the launches after out_proj read (DecoderLayer sets them)

    def __call__(self, x: mx.array, state: LinearAttentionState) -> mx.array:
        _, T, _ = x.shape
        if T == 1 and self.ops is not None:
            return self.decode_fused(x, state)
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        qkv = self.in_proj_qkv(x)                                   # [1, T, C]
        z = self.in_proj_z(x).reshape(1, T, Hv, Dv)
        b, a = self.in_proj_b(x), self.in_proj_a(x)                 # [1, T, Hv]

        # Causal depthwise conv over the q|k|v stream, continuing from the
        # last Kc-1 inputs of the previous call.
        Kc = self.conv_weight.shape[1]
        past = state.conv if state.conv is not None else mx.zeros((1, Kc - 1, qkv.shape[-1]), qkv.dtype)
        conv_in = mx.concatenate([past, qkv], axis=1)               # [1, Kc-1+T, C]
        state.conv = conv_in[:, -(Kc - 1):]
        conv = sum(conv_in[:, j : j + T] * self.conv_weight[:, j] for j in range(Kc))
        qkv = conv * mx.sigmoid(conv)                               # SiLU

        q, k, v = mx.split(qkv, [Hk * Dk, 2 * Hk * Dk], axis=-1)
        q = l2_normalize(q.reshape(1, T, Hk, Dk)) * (Dk ** -0.5)
        k = l2_normalize(k.reshape(1, T, Hk, Dk))
        v = v.reshape(1, T, Hv, Dv)

        g = self.A * mx.logaddexp(a.astype(mx.float32) + self.dt_bias, 0.0)   # A * softplus(a + dt_bias)
        beta = mx.sigmoid(b)
        if state.recurrent is None:
            state.recurrent = mx.zeros((1, Hv, Dv, Dk), mx.float32)
        # S = S*exp(g); delta = (v - S k)*beta; S += outer(delta, k); o = S q
        o, state.recurrent = mx.fast.gated_delta_update(q, k, v, mx.exp(g), beta, state.recurrent)

        # Gated RMSNorm: rmsnorm(o) * w * silu(z), the gate in float32.
        o = rms_norm(o, self.norm_weight, self.eps)
        z32 = z.astype(mx.float32)
        o = (o.astype(mx.float32) * z32 * mx.sigmoid(z32)).astype(x.dtype)
        return self.out_proj(o.reshape(1, T, Hv * Dv))

    def zero_state(self, dtype) -> tuple[mx.array, mx.array]:
        """The conv and recurrent state before the first token."""
        C, Kc = self.conv_weight.shape
        return mx.zeros((1, Kc - 1, C), dtype), mx.zeros((1, self.Hv, self.Dv, self.Dk), mx.float32)

    def decode_fused(self, x: mx.array, state: LinearAttentionState, norm=None) -> mx.array:
        """One token, the same math as above through the fused kernels; norm = (weight, eps): x is
        the layer's input, normalized in the projections' launch."""
        qkv, z, b, a = _in_proj(self.ops, x, norm, [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a])
        o, state.conv, state.recurrent = self.ops.gdn_step(
            qkv, z, b, a, state.conv, self.conv_weight, self.A, self.dt_bias, self.norm_weight,
            state.recurrent, self.Hk, self.Dk, self.eps, then=[self.out_proj, *self.after])
        return self.ops.qmv(o, [self.out_proj])[0].reshape(x.shape)


def _in_proj(ops, x: mx.array, norm, linears):
    """A mixer's input projections of one token: of x, or of rmsnorm(x) * norm[0] (norm =
    (weight, eps)), the norm in the projections' launch unless FLASHMOE_FUSE_INPUT_NORM=0. x [1, 1, H]
    as it is (no reshape: one operation fewer per step) -> outputs [1, 1, N] (the CPU's: [1, N])."""
    if norm is None:
        return ops.qmv(x, linears)
    if not _fuse_input_norm():
        return ops.qmv(ops.rms_norm(x, norm[0], norm[1]), linears)
    return ops.norm_qmv(x, None, norm[0], norm[1], linears)[0]


def _fuse_input_norm() -> bool:
    """FLASHMOE_FUSE_INPUT_NORM (default 1): the layer's input norm in the launch of the input
    projections (one launch and one MLX operation fewer per layer); 0: MLX's rms_norm, then the
    projections. Since the kernels round their norms as MLX's rms_norm does (`rms_out` in
    kernels/common.kern), both give the same logits to the bit on the H200 (397B shapes, 2 layers,
    8 steps: rel. error 8.067e-03 against plain's 1.226e-02 either way); with one rounding they had
    differed by one bf16 rounding and flipped a routing (ratio 5.55). Step by step (not
    pipelined), 8 resident layers: 159.7 against 201.9 us per layer."""
    return os.environ.get("FLASHMOE_FUSE_INPUT_NORM", "1").strip().lower() in ("1", "on", "yes", "true")


class Attention:
    """Gated full attention with q/k RMSNorm, partial rope and GQA."""

    def __init__(self, cfg: ModelConfig, w: dict, p: str, dtype):
        L = lambda n: take_linear(w, p + n, cfg, dtype)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = L("q_proj"), L("k_proj"), L("v_proj"), L("o_proj")
        self.q_norm = w[p + "q_norm.weight"].astype(dtype)
        self.k_norm = w[p + "k_norm.weight"].astype(dtype)
        self.Hq, self.Hkv, self.Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_dims, self.rope_theta, self.eps = cfg.rope_dims, cfg.rope_theta, cfg.rms_norm_eps
        self.ops = kernels.ops()
        self.after: list[Linear] = []   # the matrices the launches after o_proj read (DecoderLayer sets them)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        _, T, _ = x.shape
        if T == 1 and self.ops is not None:
            return self.decode_fused(x, cache)
        Hq, Hkv, Dh = self.Hq, self.Hkv, self.Dh
        qg = self.q_proj(x).reshape(1, T, Hq, 2 * Dh)
        q, gate = qg[..., :Dh], qg[..., Dh:].reshape(1, T, Hq * Dh)
        k = self.k_proj(x).reshape(1, T, Hkv, Dh)
        v = self.v_proj(x).reshape(1, T, Hkv, Dh).transpose(0, 2, 1, 3)

        q = rms_norm(q, self.q_norm, self.eps).transpose(0, 2, 1, 3)   # [1, Hq, T, Dh]
        k = rms_norm(k, self.k_norm, self.eps).transpose(0, 2, 1, 3)   # [1, Hkv, T, Dh]
        start = cache.offset
        q = mx.fast.rope(q, self.rope_dims, traditional=False, base=self.rope_theta, scale=1.0, offset=start)
        k = mx.fast.rope(k, self.rope_dims, traditional=False, base=self.rope_theta, scale=1.0, offset=start)
        keys, values = cache.update(k, v)

        # Causal within this chunk; every earlier token is visible.
        mask = None
        if T > 1:
            cols = mx.arange(start + T)[None, :]
            rows = mx.arange(start, start + T)[:, None]
            mask = cols <= rows                                          # [T, start+T]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=Dh ** -0.5, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(1, T, Hq * Dh)
        return self.o_proj(out * mx.sigmoid(gate))

    def decode_fused(self, x: mx.array, cache: KVCache, norm=None) -> mx.array:
        """One token, the same math as above through the fused kernels (norm: as GatedDeltaNet's)."""
        Hkv, Dh = self.Hkv, self.Dh
        qg, k, v = _in_proj(self.ops, x, norm, [self.q_proj, self.k_proj, self.v_proj])
        q, k = self.ops.qk_norm_rope(qg, k, self.q_norm, self.k_norm, cache.offset, self.rope_dims,
                                     self.rope_theta, self.eps, Hkv)
        # The cache holds MLX arrays (a backend may hand back host arrays).
        cache.update(*(mx.array(t, dtype=self.q_norm.dtype).reshape(1, Hkv, 1, Dh) for t in (k, v)))
        out = self.ops.decode_attention(q, cache.keys, cache.values, cache.offset, qg,
                                        then=[self.o_proj, *self.after])
        return self.ops.qmv(out, [self.o_proj])[0].reshape(x.shape)


    def decode_math(self, x: mx.array, keys: mx.array, values: mx.array, pos: mx.array, n: mx.array, norm):
        """decode_fused's math with the KV buffers [1, Hkv, capacity, Dh], the position and the
        length pos + 1 (the ops' `index` arrays, both made once a step by `state_in`: no add here) as arrays,
        all arrays in and out so that it compiles (FLASHMOE_COMPILE_ATTENTION) -> (y, keys,
        values), this token's key and value written at pos (the capacity reserved)."""
        qg, k, v = _in_proj(self.ops, x, norm, [self.q_proj, self.k_proj, self.v_proj])
        q, _, keys, values = self.ops.qk_norm_rope_kv(qg, k, v, keys, values, self.q_norm, self.k_norm, pos,
                                                      self.rope_dims, self.rope_theta, self.eps, self.Hkv)
        out = self.ops.decode_attention(q, keys, values, n, qg, then=[self.o_proj, *self.after])
        return self.ops.qmv(out, [self.o_proj])[0].reshape(x.shape), keys, values


class SparseMoE:
    """Router softmax (float32) -> top-K -> selected SwiGLU experts, plus the
    shared expert scaled by its sigmoid gate."""

    def __init__(self, cfg: ModelConfig, w: dict, p: str, layer: int, experts: ExpertSource, k: int, dtype):
        L = lambda n: take_linear(w, p + n, cfg, dtype)  # noqa: E731
        self.router = L("gate")
        self.shared_gate_proj, self.shared_up_proj = L("shared_expert.gate_proj"), L("shared_expert.up_proj")
        self.shared_down_proj, self.shared_expert_gate = L("shared_expert.down_proj"), L("shared_expert_gate")
        self.layer, self.experts, self.k, self.dtype = layer, experts, k, dtype
        self.norm_topk_prob = cfg.norm_topk_prob
        self.ops = kernels.ops()
        self.next_router = None  # the next MoE layer's router, where experts are prefetched (Qwen35Model)
        self._dev_src = self._dev = None   # device_experts' last answer and what it came from

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x [T, H] -> expert ids [T, K] and their weights [T, K]."""
        probs = mx.softmax(self.router(x).astype(mx.float32), axis=-1)        # [T, E]
        inds = mx.argpartition(-probs, kth=self.k - 1, axis=-1)[:, : self.k]
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        """residual + moe(x)"""
        B, T, H = x.shape
        x2 = x.reshape(T, H)
        inds, scores = self.route(x2)
        inds_np = np.array(inds)                         # the read below needs the ids now
        batch = self.experts.fetch(self.layer, np.unique(inds_np), gather=True)
        rows = batch.lookup[inds_np]                     # [T, K] rows of the fetched stacks

        xe = x2[:, None, None, :]                        # [T, 1, 1, H]
        idx = mx.array(rows)
        order = None
        if rows.size >= 64:                               # sort by expert so each is read once
            flat = rows.reshape(-1)
            order_np = np.argsort(flat, kind="stable")
            order = mx.array(np.argsort(order_np))
            xe = x2[mx.array(order_np // self.k)][:, None, :]                  # [T*K, 1, H]
            idx = mx.array(flat[order_np])
        g = batch.gate.gather(xe, idx, sorted_indices=order is not None)
        u = batch.up.gather(xe, idx, sorted_indices=order is not None)
        hidden = (g * mx.sigmoid(g) * u).astype(self.dtype)
        y = batch.down.gather(hidden, idx, sorted_indices=order is not None)   # [..., 1, H]
        if order is not None:
            y = y[order].reshape(T, self.k, 1, H)
        y = y.reshape(T, self.k, H)
        y = (y * scores[..., None].astype(y.dtype)).sum(axis=1)                  # [T, H]

        sg = self.shared_gate_proj(x2)
        shared = self.shared_down_proj(sg * mx.sigmoid(sg) * self.shared_up_proj(x2))
        shared = mx.sigmoid(self.shared_expert_gate(x2)) * shared
        return residual + (y + shared).astype(x.dtype).reshape(B, T, H)

    def device_experts(self):
        """(gate, up, down, lookup, all_in_gpu) when the router's choice can be resolved on the
        device, with no round trip to the host: every expert resident (lookup None: the rows are
        the ids), or a source that keeps a lookup table in GPU memory. None otherwise."""
        # (the same tuple for as long as its source is the same object: decode steps ask every
        # token, and `WholeStep` (compiled.py) keeps its plan while every layer's answer is the same)
        if isinstance(self.experts, ResidentExperts):
            src = self.experts.layers[self.layer]
            if self._dev_src is not src:
                self._dev_src, self._dev = src, (*src, None, True)
            return self._dev
        resident = getattr(self.experts, "resident_batch", None) if self.ops.backend != "cpu" else None
        batch = resident(self.layer) if resident is not None else None
        if batch is None:
            return None
        if self._dev_src is not batch:
            self._dev_src, self._dev = batch, (batch.gate, batch.up, batch.down, batch.device_lookup, batch.all_in_gpu)
        return self._dev

    def count_device(self, dev) -> None:
        """Stats of a decode step whose experts `device_experts` resolved."""
        self.experts.stats.experts += self.k
        if dev[3] is not None and dev[4]:
            self.experts.stats.gpu_hits += self.k

    def _router(self, x: mx.array, y: mx.array, norm_w: mx.array, eps: float, flat: bool = True):
        """h = x + y, n = rmsnorm(h) * norm_w, and the router's and the shared expert gate's
        logits of n, in one launch -> (logits, shared logit, h, n); with `flat`, x and y as [1, H]
        (what the CPU's MoE takes), else as they come ([1, 1, H]: no reshapes in compiled steps)."""
        if flat:
            x, y = x.reshape(1, -1), y.reshape(1, -1)
        (logits, shared_logit), h, n = self.ops.norm_qmv(x, y, norm_w, eps, [self.router, self.shared_expert_gate])
        return logits, shared_logit, h, n

    def decode_math(self, x: mx.array, y: mx.array, norm_w: mx.array, eps: float, gate: Linear, up: Linear,
                    down: Linear, lookup: mx.array | None) -> mx.array:
        """h + moe(rmsnorm(h) * norm_w), h = x + y, for one token with the experts' stacks and a
        device-side lookup (no host round trip): all arrays in, all arrays out, so that it can be
        compiled."""
        logits, shared_logit, h, n = self._router(x, y, norm_w, eps, flat=False)
        hh, hs, rows, scores = self.ops.moe_route_gate_up(logits, self.k, self.norm_topk_prob, lookup, n, gate, up,
                                                          self.shared_gate_proj, self.shared_up_proj,
                                                          then=(down, self.shared_down_proj))
        return self.ops.moe_down(hh, rows, scores, down, hs, self.shared_down_proj, shared_logit, h)

    def decode_fused(self, x: mx.array, y: mx.array, norm_w: mx.array, eps: float) -> mx.array:
        """One token of h + moe(rmsnorm(h) * norm_w), h = x + y (the layer's input and its mixer's
        output), through the fused kernels."""
        dev = self.device_experts()
        if dev is not None:
            # No mx.async_eval(out) here to start the MoE early: on the H200 each extra evaluation
            # cost ~0.15 ms per layer (0.574 -> 0.425 ms per layer without it, all experts cached).
            self.count_device(dev)
            return self.decode_math(x, y, norm_w, eps, *dev[:4]).reshape(x.shape)
        logits, shared_logit, residual, x1 = self._router(x, y, norm_w, eps)
        ids, scores = self.ops.moe_route(logits, self.k, self.norm_topk_prob)
        ids_np = np.array(ids)
        on_cpu = self.ops.backend == "cpu"
        if on_cpu and getattr(self.experts, "overlap", False):   # compute while the misses land
            batch, pending = self.experts.fetch_streaming(self.layer, np.unique(ids_np))
        else:
            batch, pending = self.experts.fetch(self.layer, np.unique(ids_np), host_rows=on_cpu), None
        if self.next_router is not None:
            self._prefetch_next(x1)
        if pending is not None:   # (all ready too: the same sums whatever speculation made ready)
            from ..cpu.streamed import moe_streamed

            out = moe_streamed(x1, batch.lookup[ids_np], scores, batch, pending, self.shared_gate_proj,
                               self.shared_up_proj, self.shared_down_proj, shared_logit, residual)
            return out.reshape(x.shape)
        gate, up, down, rows = batch.gate, batch.up, batch.down, mx.array(batch.lookup[ids_np])
        h, hs = self.ops.moe_gate_up(x1, rows, gate, up, self.shared_gate_proj, self.shared_up_proj)
        out = self.ops.moe_down(h, rows, scores, down, hs, self.shared_down_proj, shared_logit, residual)
        return out.reshape(x.shape)

    def _prefetch_next(self, x1) -> None:
        """Guess the next layer's experts with its router on this layer's MoE input (the residual
        stream changes little from one layer to the next) and announce them to the source, whose
        reads then overlap this layer's MoE and the next layer's attention."""
        prefetch = getattr(self.experts, "prefetch", None)
        if prefetch is None:
            return
        wants = getattr(self.experts, "wants_prefetch", None)
        if wants is not None and not wants(self.layer + 1):
            return   # (the source would ignore the guess: skip the router's matvec)
        logits = np.asarray(self.ops.qmv(x1, [self.next_router])[0], dtype=np.float32).reshape(-1)
        guess = np.argpartition(-logits, self.k - 1)[: self.k]
        prefetch(self.layer + 1, guess[np.argsort(-logits[guess], kind="stable")])   # best guess first


class DecoderLayer:
    def __init__(self, cfg, w, i, experts, k, dtype):
        p = f"layers.{i}."
        self.is_linear = cfg.is_linear(i)
        self.input_norm = w[p + "input_layernorm.weight"].astype(dtype)
        self.post_norm = w[p + "post_attention_layernorm.weight"].astype(dtype)
        if self.is_linear:
            self.mixer = GatedDeltaNet(cfg, w, p + "linear_attn.", dtype)
        else:
            self.mixer = Attention(cfg, w, p + "self_attn.", dtype)
        self.moe = SparseMoE(cfg, w, p + "mlp.", i, experts, k, dtype)
        self.mixer.after = [self.moe.router, self.moe.shared_expert_gate]   # the launch after its output projection
        self.eps = cfg.rms_norm_eps
        self.ops = kernels.ops()
        self.compile = compile_default(self.ops)
        self._compiled: dict = {}

    def __call__(self, x: mx.array, cache) -> mx.array:
        if self.compile and self.ops is not None and x.shape[1] == 1:
            out = self.decode_step(x, cache)
            if out is not None:
                return out
        if self.ops is not None and x.shape[1] == 1:
            # one token through the kernels: each norm runs in the launch of the matvec after it
            y = self.mixer.decode_fused(x, cache, (self.input_norm, self.eps))
            return self.moe.decode_fused(x, y, self.post_norm, self.eps)
        norm = rms_norm if self.ops is None else self.ops.rms_norm
        y = self.mixer(norm(x, self.input_norm, self.eps), cache)
        if self.ops is None:
            h = x + y
            return self.moe(rms_norm(h, self.post_norm, self.eps), residual=h)    # h + moe(norm(h))
        h, n = self.ops.add_rms_norm(x, y, self.post_norm, self.eps)             # h = x + y, n = norm(h)
        return self.moe(n, residual=h)

    # -- decode through compiled graphs --------------------------------------------------------
    # A decode step of one layer is 7-11 operations whose graph Python would otherwise build
    # again for every token (~0.2 ms per layer on the H200, as long as the kernels take).
    # mx.compile records it once and replays it from C++. What can be compiled is what takes and
    # gives only arrays: the GatedDeltaNet mixer with its state, the attention mixer with its KV
    # buffers written at a position held in an array (FLASHMOE_COMPILE_ATTENTION), and the MoE
    # when the router's choice is resolved on the device (`SparseMoE.device_experts`); MoEs that
    # read experts through the host stay op by op. Compiled functions are kept per what they bake
    # in (K, the ops, the expert stacks), as mx.compile takes Python values in at tracing. Where
    # every layer's step compiles, the whole model's step is one graph (compiled.py, `WholeStep`),
    # built from the same `step_math`.

    def _fn(self, key, make):
        fn = self._compiled.get(key)
        if fn is None:
            if len(self._compiled) >= 32:   # stacks that changed (scales converted per table): drop old traces
                self._compiled.clear()
            fn = self._compiled[key] = mx.compile(make())
        return fn

    def device_experts(self):
        """The MoE's `device_experts()` where this layer's compiled step can read them: experts
        given by host address only through the CUDA kernels."""
        dev = self.moe.device_experts()
        if dev is not None and dev[3] is not None and dev[3].dtype == mx.uint64 and self.ops.backend != "cuda":
            return None
        return dev

    def whole(self, dev, attention: bool | None = None) -> bool:
        """Whether this layer's decode step is one function of arrays (`step_math`): the router's
        choice resolved on the device, and an attention mixer compiled too (`attention`:
        `compile_attention` of this layer's ops, where the caller has it already)."""
        if dev is None:
            return False
        return self.is_linear or (compile_attention(self.ops) if attention is None else attention)

    def step_key(self, dev) -> tuple:
        """What a trace of `step_math` bakes in besides its array inputs (this layer's weights:
        its identity)."""
        return (id(self.ops), self.moe.k, tuple(id(l.weight) for l in dev[:3]), dev[3] is not None, self.is_linear, id(self))

    def state_in(self, cache, dtype, positions: dict | None = None) -> list:
        """The state arrays `step_math` takes: conv and recurrent state, or the KV buffers (room
        reserved for one more token), the position and the length after this token (the ops'
        `index` arrays, shared through `positions` by the layers of one step)."""
        if self.is_linear:
            if cache.conv is None or cache.recurrent is None:
                cache.conv, cache.recurrent = self.mixer.zero_state(dtype)
            return [cache.conv, cache.recurrent]
        cache.reserve(1, self.mixer.Hkv, self.mixer.Dh, self.mixer.q_norm.dtype, ahead=True)
        positions = {} if positions is None else positions
        pos = positions.get(cache.offset)
        if pos is None:   # in the form the launches read (on CUDA int32 [4], made on the device)
            index = self.ops.index if self.ops is not None else kernels.plain.index
            pos = positions[cache.offset] = [index(cache.offset), index(cache.offset + 1)]
        return [cache.keys, cache.values, *pos]

    def state_size(self) -> int:
        """How many arrays `state_in` gives."""
        return 2 if self.is_linear else 4

    def state_out(self, cache, new) -> None:
        """Take `step_math`'s new state arrays into the cache."""
        if self.is_linear:
            cache.conv, cache.recurrent = new
        else:
            cache.keys, cache.values = new
            cache.offset += 1

    def mixer_math(self, x: mx.array, state) -> tuple[mx.array, list]:
        """One token through the mixer, arrays in and out (`state_in`'s) -> (output, new state
        arrays)."""
        norm = (self.input_norm, self.eps)
        if self.is_linear:
            st = LinearAttentionState()
            st.conv, st.recurrent = state
            y = self.mixer.decode_fused(x, st, norm)
            return y, [st.conv, st.recurrent]
        y, keys, values = self.mixer.decode_math(x, *state, norm)
        return y, [keys, values]

    def step_math(self, dev, x: mx.array, state, lookup) -> tuple[mx.array, list]:
        """One token through the whole layer, arrays in and out (so that it compiles) -> (output,
        new state arrays)."""
        y, new = self.mixer_math(x, state)
        out = self.moe.decode_math(x, y, self.post_norm, self.eps, *dev[:3], lookup).reshape(x.shape)
        return out, new

    def decode_step(self, x: mx.array, cache) -> mx.array | None:
        """One token through compiled graphs; None where nothing compiles (attention before an MoE
        that needs the host): then the op-by-op path runs."""
        moe, eps = self.moe, self.eps
        dev = self.device_experts()
        if dev is None and not self.is_linear:
            return None
        lk = () if dev is None or dev[3] is None else (dev[3],)
        if dev is not None:
            moe.count_device(dev)

        if self.whole(dev):
            state = self.state_in(cache, x.dtype)
            n = len(state)

            def layer():
                def f(x, *args):
                    out, new = self.step_math(dev, x, args[:n], args[n] if len(args) > n else None)
                    return (out, *new)
                return f
            out, *new = self._fn(("layer",) + self.step_key(dev), layer)(x, *state, *lk)
            self.state_out(cache, new)
            return out

        key = (id(self.ops), moe.k, () if dev is None else tuple(id(l.weight) for l in dev[:3]), len(lk))
        if not self.is_linear:   # the mixer op by op (its KV cache at a Python offset), the MoE compiled
            y = self.mixer.decode_fused(x, cache, (self.input_norm, eps))

            def moe_part(x, y, *lookup):
                return moe.decode_math(x, y, self.post_norm, eps, *dev[:3], lookup[0] if lookup else None).reshape(x.shape)
            return self._fn(("attn",) + key, lambda: moe_part)(x, y, *lk)

        # GatedDeltaNet before an MoE that needs the host: the mixer compiled, the MoE op by op
        def mixer_part(x, conv, rec):
            y, new = self.mixer_math(x, (conv, rec))
            return (y, *new)

        y, *new = self._fn(("gdn",) + key, lambda: mixer_part)(x, *self.state_in(cache, x.dtype))
        self.state_out(cache, new)
        return moe.decode_fused(x, y, self.post_norm, eps)


def _prefetch_default(experts) -> bool:
    """FLASHMOE_PREFETCH: guess the next layer's experts (its router on this layer's MoE input)
    and have the expert source read them ahead. `auto` (default): only where the source reads
    guesses straight into its own RAM cache (FLASHMOE_COLD_READS=direct: speculative direct reads
    of the top guess fill the disk's idle time between a layer's last read and the next layer's
    router; 8 streamed 397B layers on 2 cores, cold: faster in 13 of 14 alternating bench pairs,
    190.0 against 220.4 ms/token on average, and 142.7 against 147.4 (median) interleaved in one
    process; 62% of the guesses picked; llm_flashmoe/cpu/DESIGN.md);
    `1`: always, also as announcements to the kernel's readahead (the other read modes), which did
    not pay on synthetic 397B layers (the wrong guesses' reads cost the disk what the right ones
    saved: 3.86 vs 3.76 tokens/s on average over six runs each, noise larger than the difference);
    `0`: never."""
    want = env_switch("FLASHMOE_PREFETCH")
    if want is False or not hasattr(experts, "prefetch"):
        return False
    return want is True or bool(getattr(experts, "speculative", False))


class Qwen35Model:
    """Tokens in, logits out, state in a `ModelCache`."""

    def __init__(self, cfg: ModelConfig, weights: dict, experts: ExpertSource, *,
                 dtype=mx.float32, experts_per_token: int | None = None):
        k = cfg.num_experts_per_tok if experts_per_token is None else experts_per_token
        self.cfg, self.dtype, self.experts = cfg, dtype, experts
        self.embed = take_linear(weights, "embed_tokens", cfg, dtype)
        self.layers = [DecoderLayer(cfg, weights, i, experts, cfg.num_experts_per_tok, dtype)
                       for i in range(cfg.num_hidden_layers)]
        self.norm = weights["norm.weight"].astype(dtype)
        self.lm_head = self.embed if cfg.tie_word_embeddings else take_linear(weights, "lm_head", cfg, dtype)
        self.set_experts_per_token(k)
        self.set_prefetch(_prefetch_default(experts))
        self.whole_step = WholeStep(self)    # decode steps as one compiled graph

    def set_prefetch(self, on: bool) -> None:
        """Announce each layer's probable experts to the expert source one layer ahead (decode)."""
        moes = [l.moe for l in self.layers]
        for a, b in zip(moes, moes[1:]):
            a.next_router = b.router if on and hasattr(self.experts, "prefetch") else None

    def set_experts_per_token(self, k: int) -> None:
        """Route each token to its top `k` experts (at most the model's top-k).
        Caches computed with another K belong to another model: start new ones."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.cfg.num_experts_per_tok:
            raise FlashMoeError(
                f"experts_per_token must be between 1 and the model's top-k "
                f"({self.cfg.num_experts_per_tok}), got {k!r}."
            )
        self.experts_per_token = k
        for layer in self.layers:
            layer.moe.k = k

    def make_cache(self) -> ModelCache:
        return ModelCache([LinearAttentionState() if l.is_linear else KVCache() for l in self.layers])

    def __call__(self, tokens: list[int] | np.ndarray, cache: ModelCache, *, last_only: bool = False) -> mx.array:
        """Feed `tokens` (continuing `cache`) -> logits [T, V] (or [1, V])."""
        ids = mx.array(np.asarray(tokens, dtype=np.int32))
        logits = self.whole_step(ids, cache) if len(tokens) == 1 else None
        if logits is None:
            x = embedding_rows(self.embed, ids).astype(self.dtype)[None]      # [1, T, H]
            for layer, c in zip(self.layers, cache.layers):
                x = layer(x, c)
            if last_only:
                x = x[:, -1:]
            logits = self.head(x[0])
        cache.tokens.extend(int(t) for t in tokens)
        if not isinstance(self.experts, ResidentExperts):
            # Streamed experts live in reused buffers (the store's double buffer, the GPU cache's
            # slots): finish reading them now, before a later call's fetches overwrite them (one
            # evaluation with the head's: each costs ~0.15 ms on the H200).
            mx.eval(logits)
        return logits

    def pipelinable(self) -> bool:
        """Whether a decode step runs with no round trip to the host, so that the next step's graph
        can be built while this one runs (`step`): every layer through the fused ops on the device,
        and the router's choice resolved there (all experts resident, or an expert cache whose
        lookup table in GPU memory covers every expert: the full pool, or the host tier; decode
        then fetches nothing, so no buffer it reads is refilled under it)."""
        if not self.layers or any(l.ops is None or l.ops.backend == "cpu" for l in self.layers):
            return False
        if isinstance(self.experts, ResidentExperts):
            return True
        return all(l.moe.device_experts() is not None for l in self.layers)

    def step(self, token: mx.array, cache: ModelCache) -> mx.array:
        """One decode step whose token is an array not yet computed (sampled on the device from
        the previous step's logits) -> float32 logits [1, V], lazily. `cache.tokens` is left to
        the caller, who learns the token later (see `pipelinable`)."""
        logits = self.whole_step(token, cache)
        if logits is not None:
            return logits
        x = embedding_rows(self.embed, token.reshape(1).astype(mx.int32)).astype(self.dtype)[None]
        for layer, c in zip(self.layers, cache.layers):
            x = layer(x, c)
        return self.head(x[0])

    def head(self, x: mx.array) -> mx.array:
        """Final norm and lm_head: hidden states [T, H] -> float32 logits [T, V]."""
        ops = self.layers[0].ops if self.layers else None
        if ops is not None and ops.backend == "cpu" and x.shape[0] <= 4:
            # The head is the largest matvec; MLX's CPU op runs it at ~1 GB/s.
            x = ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps)
            return mx.array(ops.qmv(x, [self.lm_head])[0], dtype=mx.float32)
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        if ops is not None and ops.backend in ("cuda", "twin") and x.shape[0] == 1:
            # One token on CUDA: the fused qmv reads the head at ~2 TB/s, MLX's at ~1 (H200, 4096 ->
            # 248320 4-bit: 293 vs 568 us, `python -m llm_flashmoe.kernels.overhead rows`). Metal
            # keeps MLX's own kernel, tuned for Apple GPUs (ours is not timed there).
            return ops.qmv(x, [self.lm_head])[0].astype(mx.float32)
        return self.lm_head(x).astype(mx.float32)
