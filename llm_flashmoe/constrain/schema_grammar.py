"""A JSON schema (llm's `prompt.schema`, `--schema-multi` included: llm has
already wrapped that into {"items": [...]}) -> a Lark grammar for the answer.

The answer is what follows reasoning: after `</think>`, or from the first
token with thinking off. It may open with up to four spaces or newlines (the
model writes "</think>\\n\\n"), then the JSON value; only the end-of-turn token
may follow. When tools are offered too, the answer may instead be one or more
tool calls, so a model can still call tools before it answers.
"""

from __future__ import annotations

import json

from ..errors import FlashMoeError
from .tool_grammar import json_rule, tool_call_rules


def check_schema(schema) -> dict:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as error:
            raise FlashMoeError(f"the schema is not valid JSON ({error}).") from error
    if not isinstance(schema, dict):
        raise FlashMoeError(f"a JSON schema must be a JSON object, not {type(schema).__name__}.")
    return schema


def answer_grammar(schema, tools=()) -> str:
    schema = check_schema(schema)
    body = "answer_json"
    rules = ["answer_json: " + json_rule(schema)]
    if tools:
        body = '(answer_json | tc ("\\n" tc)*)'
        rules.append(tool_call_rules(tools, "tc"))
    return "\n".join([f"start: LEAD? {body}", "LEAD: /[ \\n]{1,4}/"] + rules) + "\n"
