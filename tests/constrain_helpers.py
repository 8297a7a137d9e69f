"""Shared pieces of the constrained-decoding tests: schemas, tools, a fake
model with no idea of JSON (random logits over the full 248,320-wide
vocabulary), and checks through the chat layer's own output parser."""

from __future__ import annotations

import json

import numpy as np

from llm_flashmoe.chat import OutputParser, ToolCallEvent, ToolSpec
from llm_flashmoe.engine.sampling import Sampler, SamplingParams

VOCAB = 248320
TOOL_CALL = 248058
EOS_IDS = (248046, 248044)

# Nested objects, arrays, enums and integers (issue 8, acceptance 1).
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tier": {"enum": ["gold", "silver", "bronze"]},
                "age": {"type": "integer", "minimum": 0},
            },
            "required": ["name", "tier"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "tags": {"type": "array", "items": {"enum": ["new", "sale", "gift"]}},
                },
                "required": ["sku", "quantity"],
            },
        },
        "priority": {"type": "integer"},
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "priority"],
}

# Two tools whose parameters cover every value kind of SPEC section 3.
TOOLS = [
    ToolSpec(
        "get_weather",
        "Weather for a city",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
        },
    ),
    ToolSpec(
        "book_table",
        "Reserve a table",
        {
            "type": "object",
            "properties": {
                "guests": {"type": "integer"},
                "price_limit": {"type": "number"},
                "outdoor": {"type": "boolean"},
                "names": {"type": "array", "items": {"type": "string"}},
                "contact": {
                    "type": "object",
                    "properties": {"phone": {"type": "string"}, "sms": {"type": "boolean"}},
                    "required": ["phone"],
                },
                "note": {"type": ["string", "null"]},
            },
            "required": ["guests", "outdoor", "contact"],
        },
    ),
]


class RandomModel:
    """Logits like an untrained model's: noise over the whole vocabulary.
    A few precomputed rows, rolled by a random offset each step, keep it cheap."""

    def __init__(self, seed: int, rows: int = 4, scale: float = 3.0):
        self.rng = np.random.default_rng(seed)
        self.rows = (self.rng.standard_normal((rows, VOCAB)) * scale).astype(np.float32)

    def __call__(self) -> np.ndarray:
        row = self.rows[self.rng.integers(len(self.rows))]
        return np.roll(row, int(self.rng.integers(VOCAB)))


def force_tool_call(generated, logits):
    """The test's push into a call: only the opening <tool_call> may come first."""
    if generated:
        return logits
    forced = np.full_like(logits, -np.inf)
    forced[TOOL_CALL] = 0.0
    return forced


def sample(model, processors, *, max_tokens: int, params=None) -> list[int]:
    """The engine's decode loop, minus the model: processors, sampler, stop tokens.

    Greedy by default: over fresh random logits the best allowed token is a
    random one, and argmax costs a tenth of a top-k draw over 248k logits.
    """
    sampler = Sampler(params or SamplingParams(temperature=0))
    out: list[int] = []
    while len(out) < max_tokens:
        row = model()
        for processor in processors:
            row = processor(out, row)
        token = sampler(row)
        if token in EOS_IDS:
            break
        out.append(token)
    return out


def parse(tokenizer, ids, tools=(), *, starts_in_reasoning=False):
    parser = OutputParser(tools, starts_in_reasoning=starts_in_reasoning)
    return parser.feed(tokenizer.decode(ids)) + parser.finish()


def check_tool_calls(events, tools=TOOLS) -> list[ToolCallEvent]:
    """Every event a clean call of an offered tool whose typed arguments validate."""
    import jsonschema

    by_name = {tool.name: tool for tool in tools}
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    assert calls, f"no tool call in {events!r}"
    for call in calls:
        assert call.name in by_name, call
        assert not call.warnings, call
        jsonschema.validate(call.arguments, by_name[call.name].parameters)
    return calls


def answer_json(events) -> object:
    from llm_flashmoe.chat import AnswerText

    text = "".join(e.text for e in events if isinstance(e, AnswerText))
    return json.loads(text)
