"""Offered tools -> a Lark grammar for one tool call in SPEC section 3's XML form:

    <tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>

NAME is one of the tools; parameters come in the order of the tool's schema,
the required ones always, the others optionally, each at most once. Values
follow `chat/parse.py`'s typing: a string (or untyped) value is raw text that
may not contain `</parameter>`; enums and consts are their literal spellings;
booleans `true`/`false`; every other type (integer, number, null, object,
array, unions of them) is JSON under the parameter's own sub-schema.
"""

from __future__ import annotations

import json
import re

from ..chat.parse import schema_types
from ..errors import FlashMoeError

TOOL_CALL_START_ID = 248058  # <tool_call>
TOOL_CALL_END_ID = 248059  # </tool_call>

# Kinds of parameter value, as the closing policy (closing.py) needs them.
RAW, LITERAL, JSON = "raw", "literal", "json"

_BAD_NAME = re.compile(r"[>\n<]")

# A raw value runs lazily up to the first "\n</parameter>" and never contains
# "</parameter>" before it, so the output parser ends it at the same place.
_RAW_VALUE_RULES = r"""
raw_value[lazy]: RAW_VALUE
RAW_VALUE: /(?s:.*)\n<\/parameter>/ & ~/(?s:.*)<\/parameter>(?s:.+)/
"""


def value_kind(schema) -> str:
    """RAW, LITERAL or JSON: how a parameter with this sub-schema is written."""
    if not isinstance(schema, dict):
        return RAW
    if "enum" in schema or "const" in schema:
        return LITERAL
    types = schema_types(schema)
    if not types or "string" in types:
        return RAW
    if types == ["boolean"]:
        return LITERAL
    return JSON


# JSON whitespace: one space, or a newline and indentation, between two tokens
# of JSON; never unbounded runs (a random model would fill its budget with them).
JSON_WHITESPACE = r"[ ]?|\n[ \t]{0,32}"


def json_rule(schema: dict) -> str:
    """`%json {...}` for a (sub-)schema, with our whitespace unless it sets its own."""
    schema = {k: v for k, v in schema.items() if k not in ("description", "title")}
    schema.setdefault("x-guidance", {"whitespace_pattern": JSON_WHITESPACE})
    return "%json " + json.dumps(schema)


def _literal(text: str) -> str:
    """A Lark string literal for `text` (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _value_expression(schema) -> str:
    """The Lark expression for one value, up to and including "\\n</parameter>"."""
    kind = value_kind(schema)
    if kind == RAW:
        return "raw_value"
    end = ' "\\n</parameter>"'
    if kind == LITERAL:
        if "const" in schema:
            options = [schema["const"]]
        elif "enum" in schema:
            options = list(schema["enum"])
        else:
            options = [True, False]
        # Strings are written raw; everything else as JSON (parse.py reads both).
        spellings = dict.fromkeys(o if isinstance(o, str) else json.dumps(o) for o in options)
        if not spellings:
            raise FlashMoeError("a tool parameter has an empty enum: no value could be written.")
        return "(" + " | ".join(_literal(s) for s in spellings) + ")" + end
    return json_rule(schema) + end


def tool_call_rules(tools, prefix: str = "tc") -> str:
    """Lark rules defining the nonterminal `{prefix}` (a whole call, from
    <tool_call> through </tool_call>) for the offered `tools` (`ToolSpec`s)."""
    if not tools:
        raise ValueError("no tools to call")
    lines = []
    functions = []
    for t, tool in enumerate(tools):
        if _BAD_NAME.search(tool.name):
            raise FlashMoeError(f"tool name {tool.name!r} contains '<', '>' or a newline; rename the tool.")
        parameters = tool.parameters if isinstance(tool.parameters, dict) else {}
        properties = parameters.get("properties") or {}
        required = set(parameters.get("required") or [])
        unknown = required - set(properties)
        if unknown:
            raise FlashMoeError(
                f"tool {tool.name!r} requires {', '.join(sorted(unknown))} but its schema does not "
                "describe them: add them to 'properties'."
            )
        function = f"{prefix}_f{t}"
        items = []
        for p, (name, sub) in enumerate(properties.items()):
            if _BAD_NAME.search(name):
                raise FlashMoeError(
                    f"parameter {name!r} of tool {tool.name!r} contains '<', '>' or a newline; rename it."
                )
            rule = f"{function}_p{p}"
            lines.append(f'{rule}: {_literal(f"<parameter={name}>" + chr(10))} {_value_expression(sub)} "\\n"')
            items.append(rule if name in required else rule + "?")
        lines.append(f"{function}: {_literal(tool.name + '>' + chr(10))} {' '.join(items)}".rstrip())
        functions.append(function)
    head = (
        f'{prefix}: <[{TOOL_CALL_START_ID}]> "\\n<function=" ({" | ".join(functions)}) '
        f'"</function>\\n" <[{TOOL_CALL_END_ID}]>'
    )
    return "\n".join([head] + lines) + "\n" + _RAW_VALUE_RULES


def tool_call_grammar(tools) -> str:
    """A grammar for exactly one call (the lazy trigger <tool_call> included)."""
    return "start: tc\n" + tool_call_rules(tools, "tc")
