"""The model's output text -> reasoning, answer and tool-call events, as it streams.

Feed decoded text pieces in order (`feed`), then call `finish` once at the
end of generation. Pieces may cut tags anywhere (`</thi` + `nk>`): text that
could still be the start of a tag is held back until the next piece decides.

What comes out (SPEC section 3):
- `ReasoningText` before `</think>`; the output starts in reasoning when the
  prompt ended with `<think>\\n` (thinking on), in the answer otherwise.
- `AnswerText` after it. Whitespace at the start and end of each section is
  dropped (the template puts its own around them), and whitespace is held
  back until the next word arrives, so pieces never end with a dangling
  newline that turns out to sit before a tag.
- `ToolCallEvent` for each `<tool_call>...</tool_call>` block. A `<tool_call>`
  before `</think>` ends the reasoning. Arguments are typed from the tool's
  JSON schema; text after a call becomes answer text again.

Malformed output never raises. What it becomes:
- No tools were offered: tool-call markup is plain text in its section.
- Unknown function name: a `ToolCallEvent` with a warning (the caller can
  tell the model, which usually corrects itself in the next round).
- A value that doesn't parse as its schema type, a parameter the schema
  doesn't name, a missing `</parameter>`, `</function>` or `</tool_call>`,
  stray text inside the block: the call is still made, with the raw string
  for that value and a warning saying what was wrong.
- A value ends at the first `</parameter>` followed (after whitespace) by
  another `<parameter=` or the end of the call, so values may quote XML and
  even this format. The price: when a `</parameter>` is missing but a later
  one exists, the two values run together (without a warning).
- A call cut off by the end of generation (neither `</function>` nor
  `</tool_call>` came) or a block without `<function=NAME>`: answer text
  holding the raw markup, since running half a call could do harm.
- `<|im_end|>` / `<|endoftext|>` in the text end the output; a stray
  `</think>` in the answer is dropped; `<think>` before any answer text
  (thinking off, but the model thinks anyway) switches to reasoning.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .messages import ToolSpec


@dataclass(frozen=True)
class ReasoningText:
    text: str


@dataclass(frozen=True)
class AnswerText:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    name: str
    arguments: dict
    raw: str  # the block as the model wrote it, tags included
    warnings: list[str] = field(default_factory=list)


Event = ReasoningText | AnswerText | ToolCallEvent

THINK_START = "<think>"
THINK_END = "</think>"
CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
END_OF_OUTPUT = ("<|im_end|>", "<|endoftext|>")

_FUNCTION_TAG = re.compile(r"<function=([^>\n]*)>")
_PARAMETER_TAG = re.compile(r"<parameter=([^>\n]*)>")
_PARAMETER_END = "</parameter>"
_FUNCTION_END = "</function>"

_REASONING, _ANSWER, _CALL, _DONE = "reasoning", "answer", "call", "done"


class OutputParser:
    """Streaming splitter of model output into `Event`s (see module docstring)."""

    def __init__(self, tools=(), *, starts_in_reasoning: bool = True):
        self._tools = {tool.name: tool for tool in tools}
        self._mode = _REASONING if starts_in_reasoning else _ANSWER
        self._buffer = ""
        self._section_start = True  # leading whitespace of a section is dropped
        self._answer_has_text = False
        self._call_scanned = 0  # how much of the buffer a pending call has searched
        self._events: list[Event] = []

    def feed(self, piece: str) -> list[Event]:
        if self._mode != _DONE:
            self._buffer += piece
            self._advance(final=False)
        return self._take_events()

    def finish(self) -> list[Event]:
        if self._mode != _DONE:
            self._advance(final=True)
            self._mode = _DONE
        return self._take_events()

    # --- scanning ---

    def _tags(self) -> tuple[str, ...]:
        # Without tools, tool-call markup is plain text (see module docstring).
        tags = END_OF_OUTPUT + (THINK_START, THINK_END)
        return tags + (CALL_START,) if self._tools else tags

    def _advance(self, final: bool) -> None:
        while self._mode != _DONE:
            if self._mode == _CALL:
                if not self._advance_call(final):
                    return
                continue
            tags = self._tags()
            position, tag = _first_tag(self._buffer, tags)
            if tag is None:
                if final:
                    self._emit_text(self._buffer.rstrip())
                    self._buffer = ""
                else:
                    cut = _safe_cut(self._buffer, tags)
                    self._emit_text(self._buffer[:cut])
                    self._buffer = self._buffer[cut:]
                return
            before = self._buffer[:position]
            self._buffer = self._buffer[position + len(tag) :]
            self._on_tag(before, tag)

    def _on_tag(self, before: str, tag: str) -> None:
        if tag in END_OF_OUTPUT:
            self._emit_text(before.rstrip())
            self._mode = _DONE
        elif tag == CALL_START:
            self._emit_text(before.rstrip())
            self._mode = _CALL
        elif tag == THINK_END:
            self._emit_text(before.rstrip())
            if self._mode == _REASONING:
                self._start_section(_ANSWER)
            # A stray </think> in the answer is dropped.
        elif tag == THINK_START:
            if self._mode == _ANSWER and not self._answer_has_text and not before.strip():
                self._start_section(_REASONING)
            elif self._mode == _ANSWER:
                self._emit_text(before + tag)  # mid-answer it is just text
            else:
                self._emit_text(before)  # a repeated <think> inside reasoning

    def _advance_call(self, final: bool) -> bool:
        """Consume one call block if it is complete; False when more text is needed."""
        # Long calls (a whole file as a value) arrive in many pieces: scan only
        # the new text, plus enough of the old to catch a tag cut in two.
        start = max(0, self._call_scanned - len("<|endoftext|>"))
        end, end_tag = _first_tag(self._buffer, (CALL_END, CALL_START) + END_OF_OUTPUT, start)
        if end_tag is None and not final:
            self._call_scanned = len(self._buffer)
            return False
        self._call_scanned = 0
        if end_tag is None:
            body, rest, closed = self._buffer, "", False
        elif end_tag == CALL_END:
            body, rest, closed = self._buffer[:end], self._buffer[end + len(CALL_END) :], True
        else:
            # A new <tool_call> or the end of output before </tool_call>.
            body, rest, closed = self._buffer[:end], self._buffer[end:], False
        self._buffer = rest
        raw = CALL_START + body + (CALL_END if closed else "")
        event = parse_call_block(body, raw, self._tools, closed_by_tag=closed)
        # Whatever follows a call is answer text, in a fresh section.
        self._start_section(_ANSWER)
        if event is None:
            self._emit_text(raw.rstrip())
            self._section_start = True
        else:
            self._events.append(event)
        return True

    # --- output ---

    def _start_section(self, mode: str) -> None:
        self._mode = mode
        self._section_start = True

    def _emit_text(self, text: str) -> None:
        if self._section_start:
            text = text.lstrip()
        if not text:
            return
        self._section_start = False
        kind = ReasoningText if self._mode == _REASONING else AnswerText
        if kind is AnswerText:
            self._answer_has_text = True
        if self._events and type(self._events[-1]) is kind:
            self._events[-1] = kind(self._events[-1].text + text)
        else:
            self._events.append(kind(text))

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def _first_tag(text: str, tags, start: int = 0) -> tuple[int, str | None]:
    best, best_tag = len(text), None
    for tag in tags:
        position = text.find(tag, start, best + len(tag))
        if position != -1 and position < best:
            best, best_tag = position, tag
    return best, best_tag


def _safe_cut(text: str, tags) -> int:
    """How much of `text` can be emitted now: not a possible tag start, not trailing whitespace."""
    cut = len(text)
    for tag in tags:
        for length in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:length]):
                cut = min(cut, len(text) - length)
                break
    while cut > 0 and text[cut - 1].isspace():
        cut -= 1
    return cut


# --- one call block ---------------------------------------------------------


def parse_call_block(body: str, raw: str, tools: dict, *, closed_by_tag: bool) -> ToolCallEvent | None:
    """Parse what sits between <tool_call> and </tool_call>; None if it is not a call."""
    warnings: list[str] = []
    function = _FUNCTION_TAG.search(body)
    if function is None:
        return None
    name = function.group(1).strip()
    if body[: function.start()].strip():
        warnings.append("text before <function=...> was ignored")
    rest = body[function.end() :]
    function_end = rest.rfind(_FUNCTION_END)
    if function_end == -1:
        if not closed_by_tag:
            return None  # cut off mid-call
        warnings.append("missing </function>")
        parameters_text = rest
    else:
        parameters_text = rest[:function_end]
        if rest[function_end + len(_FUNCTION_END) :].strip():
            warnings.append("text after </function> was ignored")
    if not closed_by_tag:
        warnings.append("missing </tool_call>")

    tool: ToolSpec | None = tools.get(name)
    if tool is None:
        warnings.append(f"unknown tool {name!r}; offered: {', '.join(sorted(tools)) or 'none'}")
    properties = (tool.parameters.get("properties") or {}) if tool else {}

    arguments: dict = {}
    for key, value in _raw_parameters(parameters_text, warnings):
        if key in arguments:
            warnings.append(f"parameter {key!r} given twice; the last value is used")
        if tool is None:
            arguments[key] = value
        elif key not in properties:
            warnings.append(f"parameter {key!r} is not in the schema of {name}; kept as text")
            arguments[key] = value
        else:
            typed, problem = typed_value(value, properties[key])
            if problem:
                warnings.append(f"parameter {key!r}: {problem}; kept as text")
            arguments[key] = typed
    if tool is not None:
        missing = [key for key in tool.parameters.get("required", []) if key not in arguments]
        if missing:
            warnings.append(f"missing required parameter(s): {', '.join(missing)}")
    return ToolCallEvent(name, arguments, raw, warnings)


def _raw_parameters(text: str, warnings: list[str]):
    """(name, raw value) pairs. A value ends at the first </parameter> that is
    followed only by whitespace and then another <parameter=...> or the end,
    so values may themselves hold XML-like text, even '</parameter>'."""
    position = 0
    while True:
        opening = _PARAMETER_TAG.search(text, position)
        if opening is None:
            if text[position:].strip():
                warnings.append("text outside <parameter> blocks was ignored")
            return
        if text[position : opening.start()].strip():
            warnings.append("text outside <parameter> blocks was ignored")
        start = opening.end()
        end = _parameter_end(text, start)
        if end is None:
            following = _PARAMETER_TAG.search(text, start)
            end = following.start() if following else len(text)
            position = end
            warnings.append(f"missing </parameter> after {opening.group(1).strip()!r}")
        else:
            position = end + len(_PARAMETER_END)
        yield opening.group(1).strip(), _strip_one_newline(text[start:end])


def _parameter_end(text: str, start: int) -> int | None:
    search_from = start
    while True:
        end = text.find(_PARAMETER_END, search_from)
        if end == -1:
            return None
        after = text[end + len(_PARAMETER_END) :].lstrip()
        if not after or after.startswith("<parameter="):
            return end
        search_from = end + 1


def _strip_one_newline(value: str) -> str:
    # The format puts the value on its own lines; only those newlines go.
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def schema_types(schema: dict) -> list[str]:
    """The JSON types a schema allows (through anyOf/oneOf too)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    types = []
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        if isinstance(option, dict):
            types += schema_types(option)
    return types


def typed_value(raw: str, schema: dict):
    """(value, problem): `raw` converted to the schema's type, or (raw, why not)."""
    types = schema_types(schema if isinstance(schema, dict) else {})
    text = raw.strip()
    if not types:
        # No usable type: JSON if it reads as JSON, else the text itself.
        try:
            return json.loads(text), None
        except ValueError:
            return raw, None
    if "null" in types and text in ("null", "None"):
        return None, None
    for kind in types:
        if kind == "string":
            continue
        converted = _convert(text, kind)
        if converted is not _NO_VALUE:
            return converted, None
    if "string" in types:
        return raw, None
    return raw, f"{text[:40]!r} is not {' or '.join(types)}"


_NO_VALUE = object()


def _convert(text: str, kind: str):
    if kind == "boolean":
        lowered = text.lower()
        return True if lowered == "true" else False if lowered == "false" else _NO_VALUE
    try:
        value = json.loads(text)
    except ValueError:
        return _NO_VALUE
    if kind == "integer":
        if isinstance(value, bool):
            return _NO_VALUE
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _NO_VALUE
    if kind == "number":
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO_VALUE
    if kind == "object":
        return value if isinstance(value, dict) else _NO_VALUE
    if kind == "array":
        return value if isinstance(value, list) else _NO_VALUE
    if kind == "null":
        return value if value is None else _NO_VALUE
    return _NO_VALUE
