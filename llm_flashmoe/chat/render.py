"""Messages and tools -> the exact prompt text the model reads.

Two paths. A model directory that ships a chat template (every published
checkpoint) is rendered with that template through jinja2, set up the way
transformers' `apply_chat_template` sets it up, so the model sees what it was
trained on. Without one, the built-in renderer below writes the structure of
SPEC section 3 in our own words; `template/synthetic.jinja` is the same
renderer as a template, and the tests hold the two to byte-identical output.
"""

from __future__ import annotations

import json
import pathlib
from datetime import datetime
from functools import lru_cache

from ..errors import FlashMoeError
from .messages import Message, ToolSpec, messages_from_json, tools_from_json

TOOLS_HEADER = "# Tools\n\nYou have access to the following functions:\n\n<tools>"

# Also written, character for character, in template/synthetic.jinja.
TOOL_INSTRUCTIONS = (
    "\n\nTo call a function, end your reply with a block in exactly this form:\n\n"
    "<tool_call>\n<function=function_name>\n<parameter=parameter_name>\nvalue\n</parameter>\n"
    "</function>\n</tool_call>\n\n"
    "Rules for calling functions:\n"
    "- Give each argument in its own <parameter=...> block, with the value on the lines between the tags.\n"
    "- Write strings as plain text, numbers and booleans as JSON literals, objects and arrays as JSON.\n"
    "- Give every required parameter.\n"
    "- You may write your reasoning or a short note first, but the call or calls must come last: "
    "nothing may follow the final </tool_call>.\n"
    "- To make several calls, put their blocks one after another.\n"
    "- If no function fits the request, answer without calling one."
)

GENERATION_PROMPT_THINKING = "<|im_start|>assistant\n<think>\n"
# An empty thinking block tells the model to answer at once.
GENERATION_PROMPT_NO_THINKING = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def render_prompt(
    messages: list[Message],
    tools: list[ToolSpec] | tuple = (),
    *,
    thinking: bool = True,
    template: str | None = None,
) -> str:
    """The prompt for the model's next assistant turn (generation prompt included)."""
    if template is None:
        return _render_builtin(list(messages), list(tools), thinking)
    return _render_template(template, list(messages), list(tools), thinking)


# --- built-in renderer -------------------------------------------------------


def _turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def _argument_text(value) -> str:
    # Strings go in raw (the model writes them raw); everything else as JSON,
    # so that history shows objects, arrays, true/false and null as the
    # parser reads them back. (Qwen3.5's own template writes booleans and
    # None as Python's True/None; the parser accepts those too.)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _tool_call_text(name: str, arguments: dict) -> str:
    parameters = "".join(
        f"<parameter={key}>\n{_argument_text(value)}\n</parameter>\n" for key, value in arguments.items()
    )
    return f"<tool_call>\n<function={name}>\n{parameters}</function>\n</tool_call>"


def _assistant_body(message: Message, keep_reasoning: bool) -> str:
    body = ""
    if keep_reasoning:
        body = "<think>\n" + (message.reasoning or "").strip() + "\n</think>\n\n"
    content = message.content.strip()
    body += content
    for index, call in enumerate(message.tool_calls):
        if index > 0:
            body += "\n"
        elif content:
            body += "\n\n"
        body += _tool_call_text(call.name, call.arguments)
    return body


def _render_builtin(messages: list[Message], tools: list[ToolSpec], thinking: bool) -> str:
    parts = []
    # Message text is trimmed: the turn markers carry the layout.
    has_system = bool(messages) and messages[0].role == "system"
    system_text = messages[0].content.strip() if has_system else ""
    if tools:
        block = TOOLS_HEADER
        for tool in tools:
            block += "\n" + json.dumps(tool.to_openai(), ensure_ascii=False)
        block += "\n</tools>" + TOOL_INSTRUCTIONS
        if system_text:
            block += "\n\n" + system_text
        parts.append(_turn("system", block))
    elif has_system:
        parts.append(_turn("system", system_text))

    # Reasoning of earlier turns is dropped; the turns after the last user
    # message (one tool round) keep theirs so the model continues its thought.
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for index, message in enumerate(messages):
        if message.role == "system":
            if index > 0:
                parts.append(_turn("system", message.content.strip()))
        elif message.role == "user":
            parts.append(_turn("user", message.content.strip()))
        elif message.role == "assistant":
            parts.append(_turn("assistant", _assistant_body(message, keep_reasoning=index > last_user)))
        else:  # tool results: a run of them is one user turn
            if index == 0 or messages[index - 1].role != "tool":
                parts.append("<|im_start|>user")
            parts.append(f"\n<tool_response>\n{message.content.strip()}\n</tool_response>")
            if index == len(messages) - 1 or messages[index + 1].role != "tool":
                parts.append("<|im_end|>\n")
    parts.append(GENERATION_PROMPT_THINKING if thinking else GENERATION_PROMPT_NO_THINKING)
    return "".join(parts)


# --- chat templates (jinja2, as transformers runs them) -----------------------


def _template_messages(messages: list[Message]) -> list[dict]:
    """Messages in the dict form chat templates read (None-valued keys left out)."""
    converted = []
    for message in messages:
        item = {"role": message.role, "content": message.content}
        if message.reasoning is not None:
            # transformers offers reasoning under both names.
            item = {"thinking": message.reasoning, **item, "reasoning_content": message.reasoning}
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    **({"id": call.id} if call.id is not None else {}),
                    "type": "function",
                    "function": {"name": call.name, "arguments": dict(call.arguments)},
                }
                for call in message.tool_calls
            ]
        if message.role == "tool":
            if message.tool_call_id is not None:
                item["tool_call_id"] = message.tool_call_id
            if message.name is not None:
                item["name"] = message.name
        converted.append(item)
    return converted


@lru_cache(maxsize=8)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks trainable text; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Not jinja's own tojson, which escapes <, >, & for HTML: templates
        # expect plain json.dumps output (as transformers provides).
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise FlashMoeError(
            f"The chat template does not parse (line {error.lineno}: {error.message}); "
            "fix chat_template.jinja or copy it again from the checkpoint."
        ) from error


def _render_template(source: str, messages: list[Message], tools: list[ToolSpec], thinking: bool) -> str:
    import jinja2

    compiled = _compile_template(source)
    try:
        return compiled.render(
            messages=_template_messages(messages),
            tools=[tool.to_openai() for tool in tools] or None,
            documents=None,
            add_generation_prompt=True,
            enable_thinking=thinking,
            # The special tokens transformers offers templates for Qwen3.5.
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )
    except jinja2.exceptions.TemplateError as error:
        raise FlashMoeError(f"The chat template refused this conversation: {error}") from error


def load_chat_template(model_dir) -> str | None:
    """The directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    model_dir = pathlib.Path(model_dir)
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FlashMoeError(
            f"{config_file} is not valid JSON ({error}); copy it again from the checkpoint."
        ) from error
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        # Several named templates: the one named "default" is for chat.
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def render_conversation(
    model_dir, messages_json: list[dict], tools_json: list[dict], thinking: bool
) -> tuple[str, int]:
    """What `llm flashmoe render` prints: the prompt text and its length in tokens."""
    from .tokenizer import load_tokenizer

    messages = messages_from_json(messages_json)
    tools = tools_from_json(tools_json or [])
    text = render_prompt(messages, tools, thinking=thinking, template=load_chat_template(model_dir))
    return text, len(load_tokenizer(model_dir).encode(text))
