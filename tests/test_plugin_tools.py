"""Tools end to end through `llm --functions ... --cl`, with the real engine.

The tiny model has random weights, so a test-only logits processor (the
hook `model.TEST_LOGITS_PROCESSORS`) forces its output, token by token,
into the exact text of each round: reasoning, then a tool call (twice),
then an answer. Everything else is real: rendering, the engine, the
streaming parser, llm running the tool and logging the chain.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from llm.cli import cli

from llm_flashmoe import model as flash_model
from llm_flashmoe import registry

ADD = '''
def add(a: int, b: int) -> int:
    "Add two integers."
    return a + b
'''

ROUNDS = [
    "Adding.\n</think>\n\n<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n"
    "<parameter=b>\n3\n</parameter>\n</function>\n</tool_call><|im_end|>",
    "Now add 4.\n</think>\n\n<tool_call>\n<function=add>\n<parameter=a>\n5\n</parameter>\n"
    "<parameter=b>\n4\n</parameter>\n</function>\n</tool_call><|im_end|>",
    "Done.\n</think>\n\nThe sum is 9.<|im_end|>",
]


class ForcedRounds:
    """Logits processor: round r of the chain emits exactly ROUNDS[r]."""

    def __init__(self, tokenizer, rounds):
        self.scripts = [tokenizer.encode(text) for text in rounds]
        self.current: list[int] = []

    def __call__(self, generated, logits):
        if not generated:
            self.current = self.scripts.pop(0)
        if len(generated) >= len(self.current):
            return logits
        forced = np.full_like(logits, -np.inf)
        forced[self.current[len(generated)]] = 0.0
        return forced


@pytest.fixture
def steered(tmp_path, monkeypatch, tiny_hf):
    from llm_flashmoe.chat import load_tokenizer

    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    registry.add(registry.TINY_NAME, tiny_hf)
    processor = ForcedRounds(load_tokenizer(tiny_hf), ROUNDS)
    monkeypatch.setattr(flash_model, "TEST_LOGITS_PROCESSORS", [processor])
    return processor


def test_tool_chain_runs_tools_and_logs_them(steered, tiny_hf):
    from llm_flashmoe.chat import Message, ToolCall, ToolSpec, load_chat_template, render_prompt

    result = CliRunner().invoke(
        cli, ["-m", "flashmoe-tiny", "What is 2+3+4?", "--functions", ADD, "--cl", "5", "-o", "max_tokens", "80"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "The sum is 9." in result.output
    assert steered.scripts == []

    rows = json.loads(CliRunner().invoke(cli, ["logs", "--json", "-n", "0"]).output)
    assert len(rows) == 3
    calls = [[(c["name"], c["arguments"]) for c in row["tool_calls"]] for row in rows]
    assert calls == [[("add", {"a": 2, "b": 3})], [("add", {"a": 5, "b": 4})], []]
    results = [[r["output"] for r in row["tool_results"]] for row in rows]
    assert results == [[], ["5"], ["9"]]
    assert [row["response_json"]["finish_reason"] for row in rows] == ["tool_calls", "tool_calls", "stop"]
    assert rows[0]["reasoning"] == "Adding." and rows[2]["response"] == "The sum is 9."

    # Round two read the call and its result as the model's own format:
    # the reasoning of the round kept, the result in a <tool_response> turn.
    tool = ToolSpec("add", "Add two integers.", {
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "type": "object"})
    call_id = rows[0]["tool_calls"][0]["tool_call_id"]
    messages = [
        Message("user", "What is 2+3+4?"),
        Message("assistant", "", reasoning="Adding.", tool_calls=[ToolCall(call_id, "add", {"a": 2, "b": 3})]),
        Message("tool", "5", tool_call_id=call_id, name="add"),
    ]
    text = render_prompt(messages, [tool], template=load_chat_template(tiny_hf))
    assert "<tool_response>\n5\n</tool_response>" in text and "<think>\nAdding.\n</think>" in text
    import hashlib

    assert rows[1]["response_json"]["prompt_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    # Each round runs only what is new since the last one.
    assert rows[1]["response_json"]["cached_prompt_tokens"] >= rows[0]["response_json"]["prompt_tokens"] - 5
    assert rows[2]["response_json"]["processed_prompt_tokens"] < 60
