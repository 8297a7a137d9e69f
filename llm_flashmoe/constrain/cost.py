"""What constraints cost in decode speed, for `llm flashmoe bench`.

Decodes the same chat prompt free and constrained to a JSON schema, in
interleaved rounds so machine load hits both alike, and reports tokens/s of
each and the constraint's own share of the constrained decode time.
"""

from __future__ import annotations

import time
from pathlib import Path

BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "count": {"type": "integer"},
        "size": {"enum": ["small", "medium", "large"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "count", "size", "tags"],
}


class TimedProcessor:
    """A logits-processor wrapper that adds up the time spent in it during
    decoding (the first call belongs to the time to first token, as in the
    engine's stats)."""

    def __init__(self, processor):
        self.processor, self.seconds = processor, 0.0

    def __call__(self, generated, logits):
        t0 = time.perf_counter()
        try:
            return self.processor(generated, logits)
        finally:
            if generated:
                self.seconds += time.perf_counter() - t0


def measure_constraint_cost(model, model_dir: str | Path, *, tokens: int = 32, rounds: int = 2) -> dict:
    from ..chat import load_tokenizer, render_prompt
    from ..chat.messages import user
    from ..engine.generate import Session
    from ..engine.sampling import SamplingParams
    from .processor import ConstrainedDecoding

    tok = load_tokenizer(model_dir)
    prompt = tok.encode(render_prompt([user("Describe a parcel as JSON.")], thinking=False))
    session = Session(model)
    # The grammar engine's one-time tokenizer set-up is not a per-token cost.
    import numpy as np

    ConstrainedDecoding(tok, schema=BENCH_SCHEMA, max_tokens=tokens, starts_in_reasoning=False)(
        [], np.zeros(model.cfg.vocab_size, np.float32))
    steps = {"free": 0, "constrained": 0}
    seconds = {"free": 0.0, "constrained": 0.0}
    inside = 0.0
    for rnd in range(rounds):
        for kind in ("free", "constrained"):
            procs = []
            if kind == "constrained":
                procs = [TimedProcessor(ConstrainedDecoding(tok, schema=BENCH_SCHEMA, max_tokens=tokens,
                                                    starts_in_reasoning=False))]
            for _ in session.generate(prompt, params=SamplingParams(temperature=1.0, seed=rnd), max_tokens=tokens,
                                      stop_token_ids=tok.eos_token_ids, logits_processors=procs,
                                      vocab_size=tok.vocab_size):
                pass
            steps[kind] += max(session.stats.generated_tokens - 1, 0)
            seconds[kind] += session.stats.decode_seconds
            inside += sum(p.seconds for p in procs)
    free = steps["free"] / seconds["free"] if seconds["free"] else 0.0
    constrained = steps["constrained"] / seconds["constrained"] if seconds["constrained"] else 0.0
    return {
        "free_tok_s": free,
        "constrained_tok_s": constrained,
        "constraint_share": inside / seconds["constrained"] if seconds["constrained"] else 0.0,
        "constraint_ms_per_token": 1000 * inside / max(steps["constrained"], 1),
    }
