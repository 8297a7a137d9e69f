"""Constrained decoding on the real engine: the `tiny` random-weight model
(4-bit MLX layout, and converted with 2-bit experts), sampled with the
engine's own sampler.

The tiny model decodes about 10 tokens/s on a shared 2-core CI machine, so
CI runs a few short samples per check; `FLASHMOE_ACCEPTANCE=50` runs issue
8's full acceptance (50 schema answers and 50 tool calls at max_tokens 256
per model; an untrained model writes until the budget closes its structure,
so each check is 12,800 decode steps: about 20 minutes there).
What constraints cost in speed is measured by `llm flashmoe bench`
(constrain/cost.py), never asserted in a test.
"""

from __future__ import annotations

import os

import jsonschema
import mlx.core as mx
import pytest

from constrain_helpers import ORDER_SCHEMA, TOOLS, answer_json, check_tool_calls, force_tool_call, parse
from llm_flashmoe.chat import load_tokenizer, render_prompt
from llm_flashmoe.chat.messages import user
from llm_flashmoe.constrain import ConstrainedDecoding
from llm_flashmoe.engine.generate import Session
from llm_flashmoe.engine.load import load_model
from llm_flashmoe.engine.sampling import SamplingParams

FULL = int(os.environ.get("FLASHMOE_ACCEPTANCE", "0"))
SAMPLES = FULL or 2
SCHEMA_TOKENS = 256 if FULL else 40
CALL_TOKENS = 256 if FULL else 80  # the shortest whole call is about 63 tokens
PARAMS = dict(temperature=1.0, top_p=0.95, top_k=20)


@pytest.fixture(scope="module", params=["mlx4", "packed2"])
def engine(request, tiny_mlx, tmp_path_factory):
    """(model, tokenizer, samples) for the 4-bit model and its 2-bit-expert conversion."""
    if request.param == "mlx4":
        model_dir, samples = tiny_mlx, SAMPLES
    else:
        from llm_flashmoe.experts.convert import convert_checkpoint

        model_dir = convert_checkpoint(tiny_mlx, tmp_path_factory.mktemp("q2") / "tiny-2bit", expert_bits=2,
                                       progress=False)
        samples = SAMPLES if FULL else 1
    return load_model(model_dir, dtype=mx.float32), load_tokenizer(model_dir), samples


def _generate(session, tokenizer, prompt, processors, max_tokens, seed):
    return list(session.generate(
        prompt, params=SamplingParams(seed=seed, **PARAMS), max_tokens=max_tokens,
        stop_token_ids=tokenizer.eos_token_ids, logits_processors=processors, vocab_size=tokenizer.vocab_size,
    ))


def test_schema_answers_validate(engine):
    """Acceptance 1 (and 3): sampled answers of an untrained model validate against the schema."""
    model, tokenizer, samples = engine
    prompt = tokenizer.encode(render_prompt([user("Make up an order.")], thinking=False))
    processor = ConstrainedDecoding(tokenizer, schema=ORDER_SCHEMA, max_tokens=SCHEMA_TOKENS,
                                    starts_in_reasoning=False)
    session = Session(model)
    for seed in range(samples):
        ids = _generate(session, tokenizer, prompt, [processor], SCHEMA_TOKENS, seed)
        assert len(ids) <= SCHEMA_TOKENS
        jsonschema.validate(answer_json(parse(tokenizer, ids)), ORDER_SCHEMA)


def test_forced_tool_calls_parse_and_type_check(engine):
    """Acceptance 2 (and 3): pushed into a call, the model writes valid calls within the budget."""
    model, tokenizer, samples = engine
    samples = samples if FULL else 1
    prompt = tokenizer.encode(render_prompt([user("Weather in Paris, or a table for 4?")], TOOLS))
    processor = ConstrainedDecoding(tokenizer, tools=TOOLS, max_tokens=CALL_TOKENS)
    session = Session(model)
    for seed in range(samples):
        ids = _generate(session, tokenizer, prompt, [processor, force_tool_call], CALL_TOKENS, seed)
        if FULL:
            print(f"call {seed}: {len(ids)} tokens", flush=True)
        assert len(ids) <= CALL_TOKENS
        check_tool_calls(parse(tokenizer, ids, TOOLS, starts_in_reasoning=True))
