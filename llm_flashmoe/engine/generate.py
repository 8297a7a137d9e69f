"""The generation loop: prompt processing in chunks, then token-by-token
decoding, with state kept between calls of one conversation.

A `Session` owns a model's cache for one conversation. A new prompt that
starts with tokens the cache has already seen skips them: the recurrent
state of linear attention cannot be rewound, so the session keeps a few
snapshots (references to the immutable state arrays) at turn boundaries and
resumes from the longest one that prefixes the new prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .cache import KVCache, LinearAttentionState, ModelCache
from .sampling import DeviceSampler, Sampler, SamplingParams

# (tokens generated so far in this call, logits [V]) -> logits; used for
# constrained decoding, thinking budgets and test steering.
LogitsProcessor = Callable[[list[int], np.ndarray], np.ndarray]

IM_START = 248045  # <|im_start|>: snapshots are taken before the last one of a prompt


@dataclass
class GenerationStats:
    prompt_tokens: int = 0        # tokens of the prompt
    processed_tokens: int = 0     # prompt tokens actually run (the rest came from the cache)
    prefill_seconds: float = 0.0
    time_to_first_token: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    experts_read: int = 0
    expert_bytes: int = 0
    expert_read_seconds: float = 0.0
    expert_cache_hits: int = 0
    expert_gpu_cache_hits: int = 0
    peak_memory_bytes: int = 0
    finish_reason: str = ""       # "stop" | "length" | "stop_sequence"
    pipelined: bool = False       # decode built each step before reading the token before it

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.processed_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes from prefill; the decode steps are the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "processed_prompt_tokens": self.processed_tokens,
            "cached_prompt_tokens": self.prompt_tokens - self.processed_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens_per_second": round(self.prompt_tokens_per_second, 2),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            "time_to_first_token_s": round(self.time_to_first_token, 3),
            "experts_read": self.experts_read,
            "expert_bytes": self.expert_bytes,
            "expert_read_s": round(self.expert_read_seconds, 3),
            "expert_page_cache_hits": self.expert_cache_hits,
            "expert_gpu_cache_hits": self.expert_gpu_cache_hits,
            "peak_memory_bytes": self.peak_memory_bytes,
            "finish_reason": self.finish_reason,
            "pipelined": self.pipelined,
        }


@dataclass
class _Snapshot:
    tokens: list[int]
    layers: list  # per layer: ("kv", keys, values, offset) or ("lin", conv, recurrent)


def _snapshot(cache: ModelCache) -> _Snapshot:
    import mlx.core as mx

    layers = []
    for c in cache.layers:
        if isinstance(c, KVCache):
            n = c.offset
            # Slices are new array objects: later in-place updates of the
            # cache's buffers do not reach them.
            k = c.keys[:, :, :n] if c.keys is not None else None
            v = c.values[:, :, :n] if c.values is not None else None
            layers.append(("kv", k, v, n))
        else:
            layers.append(("lin", c.conv, c.recurrent))
    arrays = [a for entry in layers for a in entry[1:3] if a is not None]
    if arrays:
        mx.eval(arrays)
    return _Snapshot(list(cache.tokens), layers)


def _restore(snap: _Snapshot) -> ModelCache:
    layers = []
    for entry in snap.layers:
        if entry[0] == "kv":
            c = KVCache()
            c.keys, c.values, c.offset = entry[1], entry[2], entry[3]
        else:
            c = LinearAttentionState()
            c.conv, c.recurrent = entry[1], entry[2]
        layers.append(c)
    return ModelCache(layers, list(snap.tokens))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """One conversation's state over a loaded model."""

    def __init__(self, model, *, prefill_chunk: int | None = None, max_snapshots: int = 4):
        import mlx.core as mx

        self.model = model
        self.prefill_chunk = prefill_chunk or (64 if mx.default_device() == mx.cpu else 512)
        self.max_snapshots = max_snapshots
        self.cache: ModelCache = model.make_cache()
        self.snapshots: list[_Snapshot] = []
        self.stats = GenerationStats()

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.snapshots.clear()

    def _resume_point(self, prompt: Sequence[int]) -> None:
        """Make `self.cache` the longest known state that prefixes `prompt`
        (at least one prompt token must remain to be run)."""
        best, best_len = None, 0
        candidates = [("live", self.cache.tokens)] + [(s, s.tokens) for s in self.snapshots]
        for who, toks in candidates:
            n = len(toks)
            if 0 < n < len(prompt) and n > best_len and _common_prefix(toks, prompt) == n:
                best, best_len = who, n
        if best is None:
            self.cache = self.model.make_cache()
        elif best != "live":
            self.cache = _restore(best)

    def _prefill(self, tokens: Sequence[int]):
        """Run `tokens`, snapshotting before the last <|im_start|>; return last logits."""
        import mlx.core as mx

        cut = None
        for i in range(len(tokens) - 1, 0, -1):
            if tokens[i] == IM_START:
                cut = i
                break
        logits = None
        pos = 0
        while pos < len(tokens):
            end = min(pos + self.prefill_chunk, len(tokens))
            if cut is not None and pos < cut < end:
                end = cut
            logits = self.model(tokens[pos:end], self.cache, last_only=True)
            mx.eval(logits, *self.cache.arrays())
            pos = end
            if cut is not None and pos == cut:
                self._remember(_snapshot(self.cache))
        return logits

    def _remember(self, snap: _Snapshot) -> None:
        self.snapshots = [s for s in self.snapshots if s.tokens != snap.tokens]
        self.snapshots.append(snap)
        del self.snapshots[: -self.max_snapshots]

    def generate(
        self,
        prompt: Sequence[int],
        *,
        params: SamplingParams = SamplingParams(),
        max_tokens: int = 256,
        stop_token_ids: Sequence[int] = (),
        logits_processors: Sequence[LogitsProcessor] = (),
        vocab_size: int | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids; `self.stats` describes the call when done.

        `vocab_size`: the tokenizer's size; the embedding rows past it are
        padding with no token and are never sampled.

        Stops at a stop token (not yielded), after `max_tokens`, or when the
        caller stops iterating.
        """
        import mlx.core as mx

        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt")
        source = self.model.experts
        source.stats.reset()
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()
        stats = self.stats = GenerationStats(prompt_tokens=len(prompt))
        t0 = time.perf_counter()

        self._resume_point(prompt)
        todo = prompt[len(self.cache.tokens):]
        stats.processed_tokens = len(todo)
        logits = self._prefill(todo)
        stats.prefill_seconds = time.perf_counter() - t0

        stops = set(int(t) for t in stop_token_ids)
        out: list[int] = []
        stats.finish_reason = "length"
        t_decode = time.perf_counter()
        pipelined = stats.pipelined = not logits_processors and pipeline_wanted() and self.model.pipelinable()
        try:
            if pipelined:
                steps = self._decode_pipelined(logits, params, max_tokens, stops, vocab_size)
                try:    # (closed here, not when collected: a step fed ahead is taken back at once)
                    for token in steps:
                        if not out:
                            stats.time_to_first_token = time.perf_counter() - t0
                            t_decode = time.perf_counter()
                        out.append(token)
                        stats.generated_tokens = len(out)
                        yield token
                finally:
                    steps.close()
                stats.finish_reason = "length" if len(out) >= max_tokens else "stop"
                return
            sampler = Sampler(params)
            while len(out) < max_tokens:
                row = np.array(logits[-1], dtype=np.float32)
                for proc in logits_processors:
                    row = proc(out, row)
                if vocab_size is not None:
                    row[vocab_size:] = -np.inf
                token = sampler(row)
                if not out:
                    stats.time_to_first_token = time.perf_counter() - t0
                    t_decode = time.perf_counter()
                if token in stops:
                    stats.finish_reason = "stop"
                    break
                out.append(token)
                stats.generated_tokens = len(out)
                yield token
                if len(out) >= max_tokens:
                    break
                logits = self.model([token], self.cache)
                mx.eval(logits)
        finally:
            stats.decode_seconds = time.perf_counter() - t_decode
            st = source.stats
            stats.experts_read, stats.expert_bytes = st.experts - st.gpu_hits, st.bytes
            stats.expert_read_seconds, stats.expert_cache_hits = st.read_seconds, st.cache_hits
            stats.expert_gpu_cache_hits = st.gpu_hits
            if hasattr(mx, "get_peak_memory"):
                stats.peak_memory_bytes = int(mx.get_peak_memory())

    def _decode_pipelined(self, logits, params: SamplingParams, max_tokens: int, stops: set,
                          vocab_size: int | None) -> Iterator[int]:
        """The decode loop with the host one step ahead: the token is sampled on the device, and
        the next step's graph is built on it and started before the token is read back, so that
        the host's work for a step (building its graph, launching its kernels) overlaps the device
        running the one before (as mlx-lm's generate does). A step fed a token that is then not wanted (a stop token,
        the caller stopping after it) is taken back with `ModelCache.rewind`: the cache ends as
        the step-by-step loop leaves it. Yields tokens up to `max_tokens`, ending at a stop."""
        import mlx.core as mx

        sample = DeviceSampler(params, vocab_size)
        cache = self.cache
        y = sample(logits[-1])
        mx.async_eval(y)
        n = 0
        while n < max_tokens:
            feed = n + 1 < max_tokens      # (the last token is never fed: the loop above neither)
            if feed:
                mark = cache.mark()
                following = sample(self.model.step(y, cache)[-1])
                mx.async_eval(following)
            token = int(y.item())
            wanted = False
            try:
                if token not in stops:
                    n += 1
                    yield token
                    wanted = True
            finally:
                if feed and not wanted:
                    cache.rewind(mark)
                    # let the unwanted step finish before returning: nothing of this call keeps
                    # running on the device while the caller, or the next prompt's expert reads,
                    # go on
                    mx.eval(following)
            if not (wanted and feed):
                return
            cache.tokens.append(token)
            y = following


def pipeline_wanted() -> bool:
    """FLASHMOE_PIPELINE: `auto` (default) pipelines decode wherever a step needs no host round
    trip (`Qwen35Model.pipelinable`) and no logits processor runs on the host; `0` never."""
    from ..errors import env_switch

    return env_switch("FLASHMOE_PIPELINE") is not False


def generate_text_tokens(model, prompt: Sequence[int], **kwargs) -> list[int]:
    """All tokens of one generation from a fresh state (tests, benchmarks)."""
    return list(Session(model).generate(prompt, **kwargs))
