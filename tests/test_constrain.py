"""Constrained decoding without a model: grammars, the processor's lifecycle,
and the acceptance loops driven by random logits over the full vocabulary
(a stand-in for an untrained model that is cheap enough to sample 50 times)."""

from __future__ import annotations


import jsonschema
import numpy as np
import pytest

from chat_helpers import tokenizer
from constrain_helpers import (
    ORDER_SCHEMA, TOOL_CALL, TOOLS, RandomModel, answer_json, check_tool_calls, force_tool_call, parse, sample,
)
from llm_flashmoe.chat import AnswerText, ReasoningText, ToolSpec
from llm_flashmoe.chat.thinking_budget import ThinkingBudget
from llm_flashmoe.constrain import ConstrainedDecoding, constraint_processor
from llm_flashmoe.errors import FlashMoeError

THINK_END = 248069


def test_nothing_to_constrain_gives_no_processor():
    assert constraint_processor(tokenizer()) is None
    assert constraint_processor(tokenizer(), tools=TOOLS, constrain_tools=False) is None


def test_user_errors_raise_flashmoe_error():
    with pytest.raises(FlashMoeError, match="schema"):
        ConstrainedDecoding(tokenizer(), schema={"type": "object", "properties": {"a": {"type": "bogus"}}})
    with pytest.raises(FlashMoeError, match="not valid JSON"):
        ConstrainedDecoding(tokenizer(), schema="{nope")
    with pytest.raises(FlashMoeError, match="rename"):
        ConstrainedDecoding(tokenizer(), tools=[ToolSpec("bad>name")])
    with pytest.raises(FlashMoeError, match="requires"):
        ConstrainedDecoding(tokenizer(), tools=[ToolSpec("f", "", {"type": "object", "required": ["x"]})])


def test_free_text_and_reasoning_stay_untouched():
    processor = ConstrainedDecoding(tokenizer(), tools=TOOLS, max_tokens=256)
    logits = np.random.default_rng(0).standard_normal(248320).astype(np.float32)
    generated = tokenizer().encode("Let me think about the weather.\n</think>\n\nSure, checking.")
    for n in range(len(generated) + 1):
        assert processor(generated[:n], logits) is logits


def test_a_call_the_model_writes_well_passes_the_grammar_unchanged():
    text = (
        "<tool_call>\n<function=book_table>\n<parameter=guests>\n4\n</parameter>\n"
        "<parameter=outdoor>\nfalse\n</parameter>\n<parameter=names>\n[\"Ann\", \"Bo\"]\n</parameter>\n"
        "<parameter=contact>\n{\"phone\": \"555 0100\"}\n</parameter>\n</function>\n</tool_call>"
    )
    ids = tokenizer().encode(text)
    processor = ConstrainedDecoding(tokenizer(), tools=TOOLS, max_tokens=256, starts_in_reasoning=False)
    for n, token in enumerate(ids):
        out = processor(ids[:n], np.zeros(248320, np.float32))
        assert np.isfinite(out[token]), (n, tokenizer().decode(ids[: n + 1]))
    assert processor.matcher is not None
    processor(ids, np.zeros(248320, np.float32))
    assert processor.matcher is None  # the call is over: free text again
    [call] = check_tool_calls(parse(tokenizer(), ids, TOOLS))
    assert call.arguments == {"guests": 4, "outdoor": False, "names": ["Ann", "Bo"], "contact": {"phone": "555 0100"}}


def test_a_finished_answer_ends_the_turn():
    """A JSON value that can take no more bytes stops the grammar before <|im_end|>."""
    processor = ConstrainedDecoding(tokenizer(), schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                                        "required": ["a"], "additionalProperties": False},
                                    max_tokens=256, starts_in_reasoning=False)
    ids = tokenizer().encode('{"a": 12}')
    logits = np.zeros(248320, np.float32)
    for n in range(len(ids)):
        assert np.isfinite(processor(ids[:n], logits)[ids[n]])
    assert np.flatnonzero(np.isfinite(processor(ids, logits))).tolist() == [248046]


def test_calls_start_only_when_they_can_finish():
    processor = ConstrainedDecoding(tokenizer(), tools=TOOLS, max_tokens=120)
    shortest = processor.shortest("call")
    assert 10 < shortest < 100
    logits = np.zeros(248320, np.float32)
    words = tokenizer().encode(" word" * 120)
    assert np.isfinite(processor(words[: 120 - shortest - 1], logits)[TOOL_CALL])
    assert np.isneginf(processor(words[: 120 - shortest], logits)[TOOL_CALL])


@pytest.mark.parametrize("thinking", [False, True])
def test_schema_answers_from_an_untrained_model_validate(thinking):
    """Acceptance 1 on random logits: 50 answers, nested objects/arrays/enums/integers."""
    processor = ConstrainedDecoding(tokenizer(), schema=ORDER_SCHEMA, max_tokens=80, starts_in_reasoning=thinking)
    processors = [processor]
    if thinking:
        processors.insert(0, ThinkingBudget(6))
    for seed in range(50 if not thinking else 5):
        ids = sample(RandomModel(seed), processors, max_tokens=80)
        events = parse(tokenizer(), ids, starts_in_reasoning=thinking)
        assert any(isinstance(e, ReasoningText) for e in events) == thinking or not thinking
        jsonschema.validate(answer_json(events), ORDER_SCHEMA)


def test_schema_multi_and_budget_shorter_than_reasoning():
    """llm's --schema-multi wrapper; reasoning that never ends is closed in time."""
    from llm.utils import multi_schema

    schema = multi_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    processor = ConstrainedDecoding(tokenizer(), schema=schema, max_tokens=60)
    for seed in range(5):
        ids = sample(RandomModel(seed), [processor], max_tokens=60)
        assert THINK_END in ids and len(ids) <= 60
        data = answer_json(parse(tokenizer(), ids, starts_in_reasoning=True))
        jsonschema.validate(data, schema)
        assert isinstance(data["items"], list)


def test_schema_answer_may_be_tool_calls_when_tools_are_offered():
    processor = ConstrainedDecoding(tokenizer(), tools=TOOLS, schema=ORDER_SCHEMA, max_tokens=120,
                                    starts_in_reasoning=False)
    ids = sample(RandomModel(1), [force_tool_call, processor], max_tokens=120)
    check_tool_calls(parse(tokenizer(), ids, TOOLS))
    assert not any(isinstance(e, AnswerText) for e in parse(tokenizer(), ids, TOOLS))


def test_tool_calls_from_an_untrained_model_parse_and_type_check():
    """Acceptance 2 on random logits: 50 forced calls within max_tokens 256."""
    processor = ConstrainedDecoding(tokenizer(), tools=TOOLS, max_tokens=256, starts_in_reasoning=False)
    names = set()
    for seed in range(50):
        ids = sample(RandomModel(seed), [force_tool_call, processor], max_tokens=256)
        assert len(ids) <= 256
        calls = check_tool_calls(parse(tokenizer(), ids, TOOLS))
        names.update(call.name for call in calls)
    assert names == {"get_weather", "book_table"}
