"""Finishing a constrained structure before `max_tokens` runs out.

A grammar says what may come next, not how soon it can end: a random or
rambling model can keep a string open forever. So the processor asks, each
step near the end of the budget, how many tokens a deterministic *closing
policy* needs from here (it plays the policy out on a copy of the matcher),
and once the budget left equals that, it forces the policy's tokens. The
structure then ends exactly on time; what the model wrote stays, with the
current value cut short.

The policy, per step, takes the first allowed of:
1. an ending special token (`</tool_call>`, end of turn);
2. the longest token that continues the current context's closing text
   (`\\n</parameter>\\n` inside a parameter value, `</function>\\n` between
   parameters), or, inside JSON, the shortest way out: `"` in a string, the
   bracket that closes the innermost container, `,` (a required key or item
   follows), `"`, `0`;
3. the grammar's forced token, else the lowest allowed id (a single
   printable byte: ids 0-93 are `!`..`~`).
Where the schema demands more (a required key, an enum, an object value),
steps 3 writes the shortest thing the grammar allows.
"""

from __future__ import annotations

import re

from .tool_grammar import JSON, LITERAL, RAW, TOOL_CALL_END_ID, TOOL_CALL_START_ID, value_kind

_STRUCTURAL = re.compile(r'["\\{}\[\],:<>\n]')
_TAG = re.compile(r"<(function|parameter)=([^>\n]*)>$")
_PARAMETER_END = "\n</parameter>"
_AFTER_VALUE = "\n</parameter>\n"
_AFTER_PARAMETERS = "</function>\n"


class JsonScanner:
    """Where we are in a JSON text, fed one character at a time."""

    __slots__ = ("stack", "in_string", "escape", "hex_left", "started", "done")

    def __init__(self):
        self.stack: list[str] = []
        self.in_string = False
        self.escape = False
        self.hex_left = 0
        self.started = False
        self.done = False  # a whole value has been written (a number may still grow)

    def copy(self) -> "JsonScanner":
        other = JsonScanner()
        other.stack = list(self.stack)
        other.in_string, other.escape, other.hex_left = self.in_string, self.escape, self.hex_left
        other.started, other.done = self.started, self.done
        return other

    def feed(self, text: str) -> None:
        for c in text:
            if self.in_string:
                if self.hex_left:
                    self.hex_left -= 1
                elif self.escape:
                    self.escape = False
                    self.hex_left = 4 if c == "u" else 0
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    self.done = not self.stack
            elif c == '"':
                self.in_string = self.started = True
            elif c in "{[":
                self.stack.append(c)
                self.started = True
            elif c in "}]":
                if self.stack:
                    self.stack.pop()
                self.done = not self.stack
            elif not c.isspace():
                self.started = True
                self.done = not self.stack and c not in ",:"

    def preferences(self) -> list[str]:
        """Texts that lead out of the JSON value soonest, best first."""
        if self.in_string:
            return ["0"] if self.hex_left else ["n"] if self.escape else ['"']
        if self.stack:
            return ["}" if self.stack[-1] == "{" else "]", ",", '"', "0"]
        return ['"', "0"]


class OutputScanner:
    """The closing context of a constrained region: JSON (the answer) or a tool call."""

    def __init__(self, tools=(), *, in_call: bool = False):
        self.tools = {tool.name: tool for tool in tools}
        self.in_call = in_call
        self.json = JsonScanner()
        self.tail = ""              # the last characters written, for tag and closing-text matching
        self.function = None        # the call's function, once named
        self.value: str | None = None  # RAW / LITERAL / JSON while inside a parameter value
        self._skip_newline = False  # the "\n" right after <parameter=P>

    def copy(self) -> "OutputScanner":
        other = OutputScanner.__new__(OutputScanner)
        other.tools, other.in_call, other.json = self.tools, self.in_call, self.json.copy()
        other.tail, other.function, other.value = self.tail, self.function, self.value
        other._skip_newline = self._skip_newline
        return other

    def feed(self, token_id: int, text: str) -> None:
        if token_id == TOOL_CALL_START_ID:
            self.in_call, self.function, self.value, self.tail = True, None, None, ""
            return
        if token_id == TOOL_CALL_END_ID:
            self.in_call, self.tail = False, ""
            return
        if not self.in_call:
            self.json.feed(text)
            return
        for c in text:
            self.tail = (self.tail + c)[-64:]
            if self.value is None:
                if c == ">":
                    self._on_tag()
            elif self._skip_newline:
                self._skip_newline = False
            elif self.tail.endswith(_PARAMETER_END):
                self.value = None
            elif self.value == JSON:
                self.json.feed(c)

    def _on_tag(self) -> None:
        match = _TAG.search(self.tail)
        if match is None:
            return
        kind, name = match.groups()
        if kind == "function":
            self.function = self.tools.get(name)
            return
        properties = (self.function.parameters.get("properties") or {}) if self.function else {}
        self.value = value_kind(properties.get(name, {}))
        self.json = JsonScanner()
        self._skip_newline = True

    def in_free_text(self) -> bool:
        """Inside a JSON string or a raw parameter value, where plain text changes no structure."""
        if not self.in_call:
            return self.json.in_string and not self.json.escape and not self.json.hex_left
        if self.value == RAW:
            # Not when the tail could be the start of "\n</parameter>".
            return not self._skip_newline and _closing_texts(self.tail, _PARAMETER_END)[0] == _PARAMETER_END
        return self.value == JSON and self.json.in_string and not self.json.escape and not self.json.hex_left

    def preferences(self) -> list[str]:
        if not self.in_call:
            return self.json.preferences()
        if self.value is None:
            return _closing_texts(self.tail, _AFTER_PARAMETERS)
        if self.value == JSON and not self.json.done:
            return self.json.preferences()
        if self.value in (RAW, LITERAL, JSON):
            return _closing_texts(self.tail, _AFTER_VALUE)
        return []


def plain_text(raw: bytes) -> bool:
    """Bytes that, inside free text, leave the way out as long as it was: whole
    UTF-8 characters and nothing that quotes, escapes, nests or tags."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text) and _STRUCTURAL.search(text) is None


def _closing_texts(tail: str, target: str) -> list[str]:
    """Prefixes (longest first) of what is left of `target` after what `tail` already wrote."""
    written = 0
    for k in range(min(len(target) - 1, len(tail)), 0, -1):
        if tail.endswith(target[:k]):
            written = k
            break
    rest = target[written:]
    return [rest[:n] for n in range(len(rest), 0, -1)]


def closing_token(matcher, scanner: OutputScanner, mask, vocabulary) -> int | None:
    """The policy's next token in the matcher's current state (None: nothing is allowed).

    Candidates are checked one by one (microseconds); a whole mask (up to a
    millisecond) is computed only when none fits and the grammar forces nothing.
    """
    for token_id in (TOOL_CALL_END_ID,) + vocabulary.eos_ids:
        if matcher.validate_tokens([token_id]):
            return token_id
    for text in scanner.preferences():
        token_id = vocabulary.id_of(text)
        if token_id is not None and matcher.validate_tokens([token_id]):
            return token_id
    forced = matcher.compute_ff_tokens()
    if forced:
        return forced[0]
    return mask.fill(matcher).first_allowed()


def closing_plan(matcher, scanner: OutputScanner, mask, vocabulary, limit: int) -> list[int] | None:
    """The tokens the policy writes from here to the end of the structure (None: not within `limit`)."""
    matcher, scanner = matcher.deep_copy(), scanner.copy()
    plan: list[int] = []
    while len(plan) < limit:
        if matcher.is_stopped():
            return plan
        token_id = closing_token(matcher, scanner, mask, vocabulary)
        if token_id is None or not matcher.consume_token(token_id):
            return None
        plan.append(token_id)
        scanner.feed(token_id, vocabulary.text_of(token_id))
    return None
