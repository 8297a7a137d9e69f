"""Golden prompts (SPEC section 3), from the built-in renderer and from the
synthetic jinja template, checked as text and token for token."""

from __future__ import annotations

import json

import pytest

from chat_helpers import model_dir, tiktoken_ids, tokenizer
from llm_flashmoe.chat import vocab
from llm_flashmoe.chat.messages import (
    Message,
    ToolCall,
    ToolSpec,
    assistant,
    messages_from_json,
    system,
    tool_result,
    tools_from_json,
    user,
)
from llm_flashmoe.chat.render import (
    TOOL_INSTRUCTIONS,
    load_chat_template,
    render_conversation,
    render_prompt,
)
from llm_flashmoe.errors import FlashMoeError

IM_START, IM_END = 248045, 248046
CALL, CALL_END = 248058, 248059
RESPONSE, RESPONSE_END = 248066, 248067
THINK, THINK_END = 248068, 248069

WEATHER = ToolSpec(
    "get_weather",
    "Current weather for a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
BOOK = ToolSpec(
    "book_flight",
    "Book a flight.",
    {
        "type": "object",
        "properties": {
            "passenger": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name"],
            },
            "legs": {
                "type": "array",
                "items": {"type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
            },
        },
        "required": ["passenger", "legs"],
    },
)

# Written out here independently of render.py (test_instructions_match pins both).
INSTRUCTIONS = """

To call a function, end your reply with a block in exactly this form:

<tool_call>
<function=function_name>
<parameter=parameter_name>
value
</parameter>
</function>
</tool_call>

Rules for calling functions:
- Give each argument in its own <parameter=...> block, with the value on the lines between the tags.
- Write strings as plain text, numbers and booleans as JSON literals, objects and arrays as JSON.
- Give every required parameter.
- You may write your reasoning or a short note first, but the call or calls must come last: nothing may follow the final </tool_call>.
- To make several calls, put their blocks one after another.
- If no function fits the request, answer without calling one."""

# The tools block: header, then one {"type": "function", "function": ...} JSON
# object per line in the order given, json.dumps style (", " and ": ").
TOOLS_BLOCK = (
    "# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    '{"type": "function", "function": {"name": "book_flight", "description": "Book a flight.", '
    '"parameters": {"type": "object", "properties": {"passenger": {"type": "object", "properties": '
    '{"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}, "legs": '
    '{"type": "array", "items": {"type": "object", "properties": {"from": {"type": "string"}, '
    '"to": {"type": "string"}}}}}, "required": ["passenger", "legs"]}}}\n'
    "</tools>" + INSTRUCTIONS
)

# Each case: messages, tools, thinking, expected text, and the control tokens
# the expected text must hold, in order (the token-level skeleton).
GOLDEN = {
    "plain_chat": (
        [user("Hello!")],
        [],
        True,
        # One user turn; thinking on, so the prompt opens the assistant turn
        # and its <think> block: the model's first tokens are reasoning.
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
        [IM_START, IM_END, IM_START, THINK],
    ),
    "system_prompt": (
        [system("You are terse."), user("Hi")],
        [],
        True,
        # Without tools the system prompt is its own turn, unchanged.
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
        [IM_START, IM_END, IM_START, IM_END, IM_START, THINK],
    ),
    "thinking_off": (
        [user("Hi")],
        [],
        False,
        # Thinking off: an empty, closed think block, then a blank line; the
        # model starts directly with its answer.
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        [IM_START, IM_END, IM_START, THINK, THINK_END],
    ),
    "two_tools": (
        [system("You are a travel agent."), user("Book me to Paris.")],
        [WEATHER, BOOK],
        True,
        # With tools the system turn starts with the tools block and the
        # instructions (whose example <tool_call> tags are control tokens);
        # the user's system prompt follows after a blank line. Nested object
        # schemas are written as they are, on one line per tool.
        "<|im_start|>system\n" + TOOLS_BLOCK + "\n\nYou are a travel agent.<|im_end|>\n"
        "<|im_start|>user\nBook me to Paris.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
        # The instructions name <tool_call> once and </tool_call> twice.
        [IM_START, CALL, CALL_END, CALL_END, IM_END, IM_START, IM_END, IM_START, THINK],
    ),
    "tool_round": (
        [
            user("Weather in Paris, and fly Ada there?"),
            assistant(
                "",
                reasoning="\nTwo tools needed.\n",
                tool_calls=[
                    ToolCall("c1", "get_weather", {"city": "Paris"}),
                    ToolCall("c2", "book_flight", {"passenger": {"name": "Ada", "age": 36},
                                                   "legs": [{"from": "LHR", "to": "CDG"}]}),
                ],
            ),
            tool_result("c1", "get_weather", "18°C, sunny"),
            tool_result("c2", "book_flight", '{"confirmation": "XK42"}'),
        ],
        [WEATHER, BOOK],
        True,
        # No user system prompt: the system turn is the tools block alone.
        "<|im_start|>system\n" + TOOLS_BLOCK + "<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris, and fly Ada there?<|im_end|>\n"
        # This assistant turn comes after the last user message (we are inside
        # its tool round), so its reasoning stays, trimmed, in a think block.
        # No text, so the first call follows the think block directly; the
        # second call starts on the next line. The string stays raw; the
        # object and the array are written as JSON.
        "<|im_start|>assistant\n<think>\nTwo tools needed.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=book_flight>\n"
        '<parameter=passenger>\n{"name": "Ada", "age": 36}\n</parameter>\n'
        '<parameter=legs>\n[{"from": "LHR", "to": "CDG"}]\n</parameter>\n'
        "</function>\n</tool_call><|im_end|>\n"
        # Both results go back in one user turn, one block each, in call order.
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response>\n"
        '<tool_response>\n{"confirmation": "XK42"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n",
        [IM_START, CALL, CALL_END, CALL_END, IM_END, IM_START, IM_END,
         IM_START, THINK, THINK_END, CALL, CALL_END, CALL, CALL_END, IM_END,
         IM_START, RESPONSE, RESPONSE_END, RESPONSE, RESPONSE_END, IM_END, IM_START, THINK],
    ),
    "three_turns": (
        [
            user("What is 2+2?"),
            assistant("4", reasoning="Simple addition."),
            user("Times 3?"),
            assistant("  12\n", reasoning="4*3=12."),
            user("Thanks!"),
        ],
        [],
        True,
        # Both assistant turns precede the last user message, so their
        # reasoning is dropped: only the (trimmed) answers remain, with no
        # think block at all.
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nTimes 3?<|im_end|>\n"
        "<|im_start|>assistant\n12<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
        [IM_START, IM_END, IM_START, IM_END, IM_START, IM_END, IM_START, IM_END, IM_START, IM_END, IM_START, THINK],
    ),
}


def synthetic_template() -> str:
    return vocab.synthetic_chat_template()


@pytest.mark.parametrize("case", GOLDEN)
@pytest.mark.parametrize("path", ["builtin", "jinja"])
def test_golden_prompt(case, path):
    messages, tools, thinking, expected, skeleton = GOLDEN[case]
    template = synthetic_template() if path == "jinja" else None
    rendered = render_prompt(messages, tools, thinking=thinking, template=template)
    assert rendered == expected
    ids = tokenizer().encode(rendered)
    assert ids == tiktoken_ids(expected)
    assert [i for i in ids if i >= vocab.FIRST_SPECIAL_TOKEN_ID] == skeleton


def test_instructions_match():
    assert TOOL_INSTRUCTIONS == INSTRUCTIONS
    assert "'" + INSTRUCTIONS.replace("\n", "\\n") + "'" in synthetic_template()


def _openai_form(messages: list[Message]) -> list[dict]:
    """The conversation as a caller of transformers would write it."""
    out = []
    for message in messages:
        item = {"role": message.role, "content": message.content}
        if message.reasoning is not None:
            item["reasoning_content"] = message.reasoning
        if message.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


@pytest.mark.parametrize("case", GOLDEN)
def test_jinja_path_equals_transformers(case):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages, tools, thinking, expected, _ = GOLDEN[case]
    rendered, _ = render_jinja_template(
        conversations=[_openai_form(messages)],
        tools=[tool.to_openai() for tool in tools] or None,
        chat_template=synthetic_template(),
        add_generation_prompt=True,
        enable_thinking=thinking,
    )
    assert rendered[0] == expected


def test_template_features_like_transformers():
    # tojson must not HTML-escape, and must accept transformers' options;
    # raise_exception and loop controls must exist.
    template = (
        "{{ messages[0].content | tojson }}|{{ {'a': 1} | tojson(indent=1) }}|"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}x{% endfor %}"
        "{% if tools is none %}none{% endif %}{{ enable_thinking }}"
    )
    text = render_prompt([user("<b>&é</b>"), user("x")], thinking=False, template=template)
    assert text == '"<b>&é</b>"|{\n "a": 1\n}|xnoneFalse'
    with pytest.raises(FlashMoeError, match="refused.*no system"):
        render_prompt([user("hi")], template="{{ raise_exception('no system') }}")
    with pytest.raises(FlashMoeError, match="does not parse"):
        render_prompt([user("hi")], template="{% if %}")


def test_tool_message_reasoning_roundtrip_keys_match_transformers_aliases():
    from llm_flashmoe.chat.render import _template_messages

    converted = _template_messages([assistant("a", reasoning="r")])
    assert converted == [{"thinking": "r", "role": "assistant", "content": "a", "reasoning_content": "r"}]


def test_message_text_is_trimmed():
    # Like Qwen3.5's own template: layout comes from the turn markers, so
    # stray whitespace around a message's text is dropped (an all-blank
    # system prompt adds nothing after the tools block).
    messages = [system("  \n"), user("\n  Hi  \n"), assistant(" a "), user(" b"),
                assistant("", tool_calls=[ToolCall(None, "get_weather", {"city": "X"})]),
                tool_result(None, "get_weather", "\n  r  \n")]
    for template in (None, synthetic_template()):
        text = render_prompt(messages, [WEATHER], template=template)
        assert text.startswith("<|im_start|>system\n# Tools")
        assert "one.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n" in text
        assert "<|im_start|>user\n<tool_response>\nr\n</tool_response><|im_end|>\n" in text
        assert render_prompt([system(" s "), user("u")], template=template).startswith("<|im_start|>system\ns<|im_end|>")


def test_consecutive_tool_results_are_one_user_turn_even_without_assistant_before():
    text = render_prompt([tool_result("1", "f", "a"), tool_result("2", "f", "b"), user("ok")])
    assert text.startswith(
        "<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response><|im_end|>\n"
    )
    assert text == render_prompt([tool_result("1", "f", "a"), tool_result("2", "f", "b"), user("ok")],
                                 template=synthetic_template())


def test_assistant_text_then_call_and_typed_history_values():
    # Text before a call is separated by a blank line; numbers, booleans and
    # null are written as JSON so the parser reads them back typed.
    message = assistant("Checking.", tool_calls=[ToolCall(None, "f", {"n": 3, "x": 2.5, "b": False, "z": None})])
    for template in (None, synthetic_template()):
        text = render_prompt([user("q"), message], template=template)
        assert ("Checking.\n\n<tool_call>\n<function=f>\n<parameter=n>\n3\n</parameter>\n"
                "<parameter=x>\n2.5\n</parameter>\n<parameter=b>\nfalse\n</parameter>\n"
                "<parameter=z>\nnull\n</parameter>\n</function>\n</tool_call><|im_end|>") in text


# --- model directories and the render command -----------------------------------------


def test_load_chat_template(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert load_chat_template(tmp_path) == "A"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"
    assert load_chat_template(model_dir()) == synthetic_template()


def test_load_chat_template_corrupt_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FlashMoeError, match="tokenizer_config.json is not valid JSON"):
        load_chat_template(tmp_path)


def test_render_conversation_from_openai_json():
    messages_json = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris, "},
                                     {"type": "text", "text": "and fly Ada there?"}]},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "\nTwo tools needed.\n",
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function",
                 "function": {"name": "book_flight", "arguments": {"passenger": {"name": "Ada", "age": 36},
                                                                   "legs": [{"from": "LHR", "to": "CDG"}]}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18°C, sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": {"confirmation": "XK42"}},
    ]
    tools_json = [WEATHER.to_openai(), {"name": BOOK.name, "description": BOOK.description,
                                        "parameters": BOOK.parameters}]
    text, token_count = render_conversation(model_dir(), messages_json, tools_json, thinking=True)
    assert text == GOLDEN["tool_round"][3]
    assert token_count == len(tiktoken_ids(text))


def test_render_conversation_without_template_uses_builtin(tmp_path):
    vocab.write_tokenizer_files(tmp_path, chat_template=False)
    text, count = render_conversation(tmp_path, [{"role": "user", "content": "Hi"}], [], thinking=False)
    assert text == GOLDEN["thinking_off"][3]
    assert count == len(tokenizer().encode(text))


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"content": "no role"}], "needs a 'role'"),
        ([{"role": "robot", "content": "x"}], "needs a 'role'"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
        ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "function name"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text content"),
        ("not a list", "JSON list"),
    ],
)
def test_bad_messages_json(bad, message):
    with pytest.raises(FlashMoeError, match=message):
        messages_from_json(bad)


def test_bad_tools_json():
    with pytest.raises(FlashMoeError, match="needs a 'name'"):
        tools_from_json([{"description": "x"}])
    assert tools_from_json([{"name": "f"}])[0].parameters == {"type": "object", "properties": {}}
