"""A neutral conversation: what was said, independent of any prompt format.

`model.py` builds these from llm's prompts and responses; `render.py` turns
them into the model's prompt text. The OpenAI-like JSON form (as used by
`llm flashmoe render` and most chat APIs) converts to and from them here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import FlashMoeError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call the assistant made; `arguments` are already typed."""

    id: str | None
    name: str
    arguments: dict


@dataclass(frozen=True)
class Message:
    """One turn. Fields beyond role/content apply to one role each:

    - assistant: `reasoning` (its thinking, or None), `tool_calls`;
    - tool: `tool_call_id` and `name` of the call this is the result of.
    """

    role: str
    content: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        # Accept lists for convenience while keeping the dataclass hashable.
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


def system(content: str) -> Message:
    return Message("system", content)


def user(content: str) -> Message:
    return Message("user", content)


def assistant(content: str = "", *, reasoning: str | None = None, tool_calls=()) -> Message:
    return Message("assistant", content, reasoning=reasoning, tool_calls=tuple(tool_calls))


def tool_result(tool_call_id: str | None, name: str | None, content: str) -> Message:
    return Message("tool", content, tool_call_id=tool_call_id, name=name)


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is a JSON schema (type object)."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict:
        """The `{"type": "function", "function": {...}}` form chat templates expect."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def _text_of(content, where: str) -> str:
    """Message content as text: a string, None, or a list of {"type": "text"} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise FlashMoeError(f"{where}: only text content is supported, got {part!r}")
        return "".join(texts)
    # Tool results are often structured; the model reads them as JSON.
    return json.dumps(content, ensure_ascii=False)


def _tool_call_from_json(data, where: str) -> ToolCall:
    if not isinstance(data, dict):
        raise FlashMoeError(f"{where}: a tool call must be an object, got {data!r}")
    function = data.get("function", data)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise FlashMoeError(f"{where}: a tool call needs a function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI sends arguments as a JSON string.
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise FlashMoeError(f"{where}: arguments of {name} are not valid JSON ({error})") from error
    if not isinstance(arguments, dict):
        raise FlashMoeError(f"{where}: arguments of {name} must be an object, got {arguments!r}")
    return ToolCall(data.get("id"), name, arguments)


def messages_from_json(items: list) -> list[Message]:
    """Messages from the OpenAI-like form: role, content, reasoning_content, tool_calls, tool_call_id."""
    if not isinstance(items, list):
        raise FlashMoeError("messages must be a JSON list of objects with a 'role'")
    messages = []
    for index, item in enumerate(items):
        where = f"message {index}"
        if not isinstance(item, dict) or item.get("role") not in ROLES:
            raise FlashMoeError(f"{where}: needs a 'role' of {', '.join(ROLES)}; got {item!r}")
        role = item["role"]
        reasoning = item.get("reasoning_content", item.get("reasoning", item.get("thinking")))
        tool_calls = tuple(
            _tool_call_from_json(call, where) for call in (item.get("tool_calls") or ())
        )
        messages.append(
            Message(
                role,
                _text_of(item.get("content"), where),
                reasoning=None if reasoning is None else str(reasoning),
                tool_calls=tool_calls if role == "assistant" else (),
                tool_call_id=item.get("tool_call_id"),
                name=item.get("name") if role == "tool" else None,
            )
        )
    return messages


def tools_from_json(items: list) -> list[ToolSpec]:
    """Tools as `{"name", "description", "parameters"}` or `{"type": "function", "function": {...}}`."""
    if not isinstance(items, list):
        raise FlashMoeError("tools must be a JSON list of objects")
    tools = []
    for index, item in enumerate(items):
        function = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise FlashMoeError(f"tool {index}: needs a 'name' (and 'description', 'parameters'); got {item!r}")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise FlashMoeError(f"tool {function['name']}: 'parameters' must be a JSON schema object")
        tools.append(ToolSpec(function["name"], function.get("description") or "", parameters))
    return tools
