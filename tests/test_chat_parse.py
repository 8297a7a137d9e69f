"""The streaming output parser: golden model outputs give the same events
however the text is cut into pieces; malformed output never raises."""

from __future__ import annotations

import random

import pytest

from llm_flashmoe.chat.messages import ToolCall, ToolSpec, assistant, user
from llm_flashmoe.chat.parse import AnswerText, OutputParser, ReasoningText, ToolCallEvent, typed_value
from llm_flashmoe.chat.render import render_prompt

WEATHER = ToolSpec("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}},
                                               "required": ["city"]})
BOOK = ToolSpec("book_flight", "Book.", {"type": "object", "properties": {
    "passenger": {"type": "object"}, "legs": {"type": "array"}}, "required": ["passenger", "legs"]})
WRITE = ToolSpec("write_file", "Write a file.", {"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "integer"}}})
ALARM = ToolSpec("set_alarm", "Set an alarm.", {"type": "object", "properties": {
    "hour": {"type": "integer"}, "volume": {"type": "number"}, "repeat": {"type": "boolean"},
    "days": {"type": "array", "items": {"type": "string"}}, "label": {"type": ["string", "null"]},
    "snooze": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}})
TOOLS = [WEATHER, BOOK, WRITE, ALARM]


def call_block(name: str, *parameters: tuple[str, str]) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


PARIS = call_block("get_weather", ("city", "Paris"))
BOOKING = call_block("book_flight", ("passenger", '{"name": "Ada", "age": 36}'), ("legs", '[{"from": "LHR", "to": "CDG"}]'))
HTML = '\n<html>\n  <body a="1">x < y && y > z</body>\n<parameter=fake>\n</parameter> not the end\n</html>\n'
WRITING = call_block("write_file", ("path", "/tmp/a b.html"), ("content", HTML), ("mode", "420"))
ALARMING = call_block("set_alarm", ("hour", "7"), ("volume", "0.5"), ("repeat", "true"),
                      ("days", '["mon", "tue"]'), ("label", "null"), ("snooze", "10"))

# (model output as it follows the generation prompt, starts in reasoning?, expected events)
GOLDEN = {
    "answer_only": (
        # Thinking on: the output starts inside <think>; the newline before
        # </think> and the blank line after it belong to the format, not the text.
        "The user greets me.\n\nI should reply briefly.\n</think>\n\nHello! How can I help?",
        True,
        [ReasoningText("The user greets me.\n\nI should reply briefly."), AnswerText("Hello! How can I help?")],
    ),
    "one_call": (
        "Need the weather.\n</think>\n\n" + PARIS,
        True,
        [ReasoningText("Need the weather."), ToolCallEvent("get_weather", {"city": "Paris"}, PARIS, [])],
    ),
    "text_then_two_calls": (
        # Objects and arrays come back parsed from their JSON.
        "Two things.\n</think>\n\nLet me check both.\n\n" + PARIS + "\n" + BOOKING,
        True,
        [
            ReasoningText("Two things."),
            AnswerText("Let me check both."),
            ToolCallEvent("get_weather", {"city": "Paris"}, PARIS, []),
            ToolCallEvent("book_flight", {"passenger": {"name": "Ada", "age": 36},
                                          "legs": [{"from": "LHR", "to": "CDG"}]}, BOOKING, []),
        ],
    ),
    "call_before_think_end": (
        # <tool_call> inside reasoning ends the reasoning (SPEC section 3).
        "I will look it up.\n" + PARIS.replace("Paris", "São Paulo"),
        True,
        [ReasoningText("I will look it up."),
         ToolCallEvent("get_weather", {"city": "São Paulo"}, PARIS.replace("Paris", "São Paulo"), [])],
    ),
    "tricky_values": (
        # A string value keeps everything between the newline after its tag
        # and the one before its closing tag: blank lines, angle brackets,
        # XML, even a '</parameter>' not followed by another parameter.
        "Writing it.\n</think>\n\n" + WRITING + "\n\nDone?",
        True,
        [ReasoningText("Writing it."),
         ToolCallEvent("write_file", {"path": "/tmp/a b.html", "content": HTML, "mode": 420}, WRITING, []),
         AnswerText("Done?")],
    ),
    "thinking_off_typed": (
        # Thinking off: the output starts in the answer. Values are typed from
        # the schema: integer, number, boolean, array, nullable string, anyOf.
        "Sure.\n\n" + ALARMING,
        False,
        [AnswerText("Sure."),
         ToolCallEvent("set_alarm", {"hour": 7, "volume": 0.5, "repeat": True, "days": ["mon", "tue"],
                                     "label": None, "snooze": 10}, ALARMING, [])],
    ),
}


def merged(events):
    """Adjacent text events of one kind joined: how the text was cut is not an event."""
    out = []
    for event in events:
        if out and type(event) is type(out[-1]) and isinstance(event, (ReasoningText, AnswerText)):
            out[-1] = type(event)(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def parse_pieces(pieces, tools=TOOLS, starts_in_reasoning=True):
    parser = OutputParser(tools, starts_in_reasoning=starts_in_reasoning)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return merged(events + parser.finish())


@pytest.mark.parametrize("case", GOLDEN)
def test_golden_output_whole(case):
    text, in_reasoning, expected = GOLDEN[case]
    assert parse_pieces([text], starts_in_reasoning=in_reasoning) == expected


@pytest.mark.parametrize("case", GOLDEN)
def test_golden_output_split_everywhere(case):
    text, in_reasoning, expected = GOLDEN[case]
    for cut in range(len(text) + 1):
        assert parse_pieces([text[:cut], text[cut:]], starts_in_reasoning=in_reasoning) == expected, cut
    assert parse_pieces(list(text), starts_in_reasoning=in_reasoning) == expected
    rng = random.Random(case)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), 4))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert parse_pieces(pieces, starts_in_reasoning=in_reasoning) == expected


def test_rendered_history_parses_back_to_the_message():
    # What the renderer writes for an assistant turn is what the parser reads.
    message = assistant(
        "Checking.",
        reasoning="Think first.",
        tool_calls=[ToolCall(None, "set_alarm", {"hour": 7, "repeat": False, "days": ["sat"], "label": None}),
                    ToolCall(None, "write_file", {"path": "x", "content": HTML})],
    )
    prompt = render_prompt([user("q"), message], TOOLS)
    turn = prompt.split("<|im_start|>assistant\n<think>\n")[1].split("<|im_end|>")[0]
    events = parse_pieces([turn])
    assert events[:2] == [ReasoningText("Think first."), AnswerText("Checking.")]
    assert [(e.name, e.arguments, e.warnings) for e in events[2:]] == [
        (call.name, call.arguments, []) for call in message.tool_calls]


def test_reasoning_is_streamed_before_the_end():
    parser = OutputParser(TOOLS)
    assert parser.feed("Step one") == [ReasoningText("Step one")]
    # Whitespace waits for the next word (it may precede </think>).
    assert parser.feed(".\n") == [ReasoningText(".")]
    assert parser.feed("Step two</") == [ReasoningText("\nStep two")]
    assert parser.feed("think>\n\nAn") == [AnswerText("An")]


# --- malformed output ---------------------------------------------------------------


def test_unknown_function_is_a_call_with_a_warning():
    block = call_block("get_wether", ("city", "Paris"))
    (event,) = parse_pieces([block], starts_in_reasoning=False)
    assert event.name == "get_wether" and event.arguments == {"city": "Paris"}
    assert "unknown tool 'get_wether'" in event.warnings[0]


def test_without_tools_call_markup_is_text():
    assert parse_pieces(["x</think>" + PARIS], tools=()) == [ReasoningText("x"), AnswerText(PARIS)]


def test_call_cut_off_by_end_of_generation_is_text():
    cut = PARIS[: PARIS.index("</parameter>")]
    assert parse_pieces(["a</think>b " + cut]) == [ReasoningText("a"), AnswerText("b" + cut.rstrip())]


def test_missing_tool_call_end_still_calls():
    block = PARIS[: -len("</tool_call>")]
    (event,) = parse_pieces([block + "<|im_end|>"], starts_in_reasoning=False)
    assert event.arguments == {"city": "Paris"} and event.warnings == ["missing </tool_call>"]
    (event,) = parse_pieces([block], starts_in_reasoning=False)
    assert event.warnings == ["missing </tool_call>"]


def test_missing_function_end_but_closed_call():
    block = PARIS.replace("</function>\n", "")
    (event,) = parse_pieces([block], starts_in_reasoning=False)
    assert event.arguments == {"city": "Paris"} and event.warnings == ["missing </function>"]


def test_next_call_without_closing_the_first():
    first = PARIS[: -len("</tool_call>")]
    events = parse_pieces([first + "\n" + BOOKING], starts_in_reasoning=False)
    assert [e.name for e in events] == ["get_weather", "book_flight"]
    assert events[0].warnings == ["missing </tool_call>"] and events[1].warnings == []


def test_value_of_the_wrong_type_is_kept_as_text_with_a_warning():
    block = call_block("set_alarm", ("hour", "seven"), ("repeat", "yes"), ("days", "[mon"))
    (event,) = parse_pieces([block], starts_in_reasoning=False)
    assert event.arguments == {"hour": "seven", "repeat": "yes", "days": "[mon"}
    assert len(event.warnings) == 3 and "'seven' is not integer" in event.warnings[0]


def test_missing_parameter_end():
    # The last value runs to </function>.
    block = "<tool_call>\n<function=write_file>\n<parameter=mode>\n7\n<parameter=path>\na.txt\n</function>\n</tool_call>"
    (event,) = parse_pieces([block], starts_in_reasoning=False)
    assert event.arguments == {"mode": 7, "path": "a.txt"}
    assert event.warnings == ["missing </parameter> after 'mode'", "missing </parameter> after 'path'"]
    # Inside a value, '<parameter=' is only text until a '</parameter>' closes
    # the value: values may quote this very format.
    block = "<tool_call>\n<function=write_file>\n<parameter=content>\na\n<parameter=path>\nb\n</parameter>\n</function>\n</tool_call>"
    (event,) = parse_pieces([block], starts_in_reasoning=False)
    assert event.arguments == {"content": "a\n<parameter=path>\nb"} and event.warnings == []


def test_unknown_and_missing_parameters():
    block = call_block("get_weather", ("town", "Paris"))
    (event,) = parse_pieces([block], starts_in_reasoning=False)
    assert event.arguments == {"town": "Paris"}
    assert event.warnings == ["parameter 'town' is not in the schema of get_weather; kept as text",
                              "missing required parameter(s): city"]


def test_block_without_function_is_text():
    assert parse_pieces(["<tool_call>\nget_weather(Paris)\n</tool_call>"], starts_in_reasoning=False) == [
        AnswerText("<tool_call>\nget_weather(Paris)\n</tool_call>")]


def test_end_of_turn_token_ends_the_output():
    assert parse_pieces(["Hi<|im_end|>ignored"], starts_in_reasoning=False) == [AnswerText("Hi")]
    assert parse_pieces(["r</think>a<|endoftext|>"]) == [ReasoningText("r"), AnswerText("a")]


def test_think_tags_in_unexpected_places():
    # Thinking off but the model thinks anyway: <think> first switches to reasoning.
    assert parse_pieces(["<think>\nhmm\n</think>\n\nok"], starts_in_reasoning=False) == [
        ReasoningText("hmm"), AnswerText("ok")]
    # A stray </think> in the answer is dropped; <think> mid-answer is text.
    assert parse_pieces(["a</think>b</think>c <think>"]) == [ReasoningText("a"), AnswerText("bc <think>")]
    # A repeated <think> at the start of reasoning is dropped.
    assert parse_pieces(["<think>\nr</think>a"]) == [ReasoningText("r"), AnswerText("a")]


def test_nothing_at_all():
    assert parse_pieces([]) == []
    assert parse_pieces(["\n\n</think>\n\n"]) == []


def test_typed_value_rules():
    assert typed_value("  42 ", {"type": "integer"}) == (42, None)
    assert typed_value("42.0", {"type": "integer"}) == (42, None)
    assert typed_value("4.5", {"type": "integer"})[1]
    assert typed_value("True", {"type": "boolean"}) == (True, None)
    assert typed_value(" x ", {"type": "string"}) == (" x ", None)
    assert typed_value("None", {"type": ["integer", "null"]}) == (None, None)
    assert typed_value('{"a": 1}', {}) == ({"a": 1}, None)
    assert typed_value("plain", {}) == ("plain", None)
    assert typed_value("12", {"type": ["string", "integer"]}) == (12, None)
