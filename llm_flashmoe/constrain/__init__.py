"""Constrained decoding: tool calls and schema answers valid by construction.

Data path: offered tools / llm's JSON schema -> Lark grammars
(`tool_grammar`, `schema_grammar`) -> llguidance matchers (`grammar`) ->
`ConstrainedDecoding`, a logits processor the decode loop runs each step
(`processor`), which masks tokens that would break the structure and, near
the end of `max_tokens`, closes it (`closing`). See DESIGN.md for why
llguidance and how the budget is kept.

Importing this package is cheap; llguidance loads when a processor is built.
"""

from .processor import ConstrainedDecoding, constraint_processor

__all__ = ["ConstrainedDecoding", "constraint_processor"]
