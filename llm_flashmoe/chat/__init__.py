"""The chat layer: text <-> tokens, conversations -> prompt, output -> events.

Plain Python, independent of the engine. The data path through it:
`messages` (a neutral conversation) -> `render` (prompt text, via the
model's chat template or our built-in one) -> `tokenizer` (ids) -> engine
-> `tokenizer.StreamDecoder` (text pieces) -> `parse` (reasoning, answer,
tool calls). `thinking_budget` caps reasoning inside the decode loop, and
`vocab` writes the real Qwen3.5 tokenizer files for synthetic models.

Importing this package stays cheap: `tokenizers`, `jinja2` and `numpy` are
imported only by the functions that need them.
"""

from .messages import Message, ToolCall, ToolSpec, messages_from_json, tools_from_json
from .parse import AnswerText, OutputParser, ReasoningText, ToolCallEvent
from .render import load_chat_template, render_conversation, render_prompt
from .tokenizer import ChatTokenizer, StreamDecoder, load_tokenizer

__all__ = [
    "AnswerText",
    "ChatTokenizer",
    "Message",
    "OutputParser",
    "ReasoningText",
    "StreamDecoder",
    "ToolCall",
    "ToolCallEvent",
    "ToolSpec",
    "load_chat_template",
    "load_tokenizer",
    "messages_from_json",
    "render_conversation",
    "render_prompt",
    "tools_from_json",
]
