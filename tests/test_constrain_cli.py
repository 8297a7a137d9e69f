"""`--schema`, `--schema-multi` and constrained tool calls through llm's own CLI,
with the tiny random-weight model (it knows neither JSON nor the call format)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from llm.cli import cli

from llm_flashmoe import model as flash_model
from llm_flashmoe import registry

TOOL_CALL, IM_END = 248058, 248046

ADD = '''
def add(a: int, b: int) -> int:
    "Add two integers."
    return a + b
'''

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "stops": {"type": "array", "items": {"type": "object", "properties": {
            "day": {"type": "integer"}, "mode": {"enum": ["walk", "bus"]}}, "required": ["day", "mode"]}},
    },
    "required": ["city", "stops"],
}


@pytest.fixture
def llm_home(tmp_path, monkeypatch, tiny_hf):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    registry.add(registry.TINY_NAME, tiny_hf)
    return tmp_path / "llm"


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_schema_answer_is_valid_json_and_logged(llm_home):
    out = run("-m", "flashmoe-tiny", "Plan a trip.", "--schema", json.dumps(SCHEMA),
              "-o", "max_tokens", "36", "-o", "thinking_budget", "4", "-o", "seed", "3")
    [row] = json.loads(run("logs", "--json", "-n", "0"))
    assert row["reasoning"]  # thinking on: the schema holds only after </think>
    data = json.loads(row["response"])
    jsonschema.validate(data, SCHEMA)
    assert row["response"] in out
    logged = json.loads(run("logs", "--schema", json.dumps(SCHEMA), "--data"))
    assert logged == data  # --data prints one JSON object per line


def test_schema_multi(llm_home):
    out = run("-m", "flashmoe-tiny", "Two cities.", "--schema-multi", "name, population int",
              "-o", "max_tokens", "40", "-o", "thinking", "false", "-o", "seed", "1")
    data = json.loads(out)
    assert isinstance(data["items"], list)
    for item in data["items"]:
        assert isinstance(item["name"], str) and isinstance(item["population"], int)


class PushIntoACall:
    """Round one may only open with <tool_call>; round two ends at once."""

    def __init__(self):
        self.rounds = 0

    def __call__(self, generated, logits):
        if generated:
            return logits
        self.rounds += 1
        forced = np.full_like(logits, -np.inf)
        forced[TOOL_CALL if self.rounds == 1 else IM_END] = 0.0
        return forced


def test_constrained_call_from_a_random_model_is_executed(llm_home, monkeypatch):
    monkeypatch.setattr(flash_model, "TEST_LOGITS_PROCESSORS", [PushIntoACall()])
    run("-m", "flashmoe-tiny", "Add 2 and 3.", "--functions", ADD, "--cl", "5",
        "-o", "max_tokens", "40", "-o", "thinking", "false", "-o", "seed", "0")
    rows = json.loads(run("logs", "--json", "-n", "0"))
    [call] = rows[0]["tool_calls"]
    assert call["name"] == "add"
    a, b = call["arguments"]["a"], call["arguments"]["b"]
    assert type(a) is int and type(b) is int
    assert rows[0]["response_json"]["tool_call_warnings"] == []
    assert [r["output"] for r in rows[1]["tool_results"]] == [str(a + b)]


def test_constrain_tools_option_turns_it_off(llm_home, monkeypatch):
    monkeypatch.setattr(flash_model, "TEST_LOGITS_PROCESSORS", [PushIntoACall()])
    run("-m", "flashmoe-tiny", "Add.", "--functions", ADD, "-o", "constrain_tools", "false",
        "-o", "max_tokens", "6", "-o", "thinking", "false", "-o", "seed", "0")
    [row] = json.loads(run("logs", "--json", "-n", "0"))
    assert row["tool_calls"] == []  # the random model never finishes a call on its own
