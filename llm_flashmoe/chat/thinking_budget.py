"""A cap on reasoning length: after N reasoning tokens, force `</think>`.

Qwen3.5 can think for thousands of tokens; at a few tokens per second a user
may prefer a shorter thought and an answer that surely comes. The engine's
decode loop calls a `ThinkingBudget` as a logits processor: once the
reasoning has used its budget, every logit but the forced token's becomes
-inf, so greedy or sampled decoding alike picks it.
"""

from __future__ import annotations

import numpy as np

THINK_START_ID = 248068  # <think>
THINK_END_ID = 248069  # </think>
TOOL_CALL_START_ID = 248058  # <tool_call> also ends reasoning (SPEC section 3)
NEWLINE_ID = 198  # "\n"
DOUBLE_NEWLINE_ID = 271  # "\n\n"


class ThinkingBudget:
    """Logits processor: `processor(generated_ids, logits) -> logits`.

    `generated_ids` are the ids generated so far in this reply (not the
    prompt); the same growing list may be passed each step, and only the new
    ids are looked at. With `starts_in_reasoning` (thinking on: the prompt
    ends in `<think>\\n`) the budget counts from the first token; otherwise
    only if the model opens a `<think>` itself. When the budget is spent, the
    processor forces "\\n" (unless the reasoning already ends in a newline)
    and then `</think>`, the shape the model itself writes.
    """

    def __init__(
        self,
        max_reasoning_tokens: int,
        *,
        starts_in_reasoning: bool = True,
        think_end_id: int = THINK_END_ID,
        newline_id: int | None = NEWLINE_ID,
    ):
        if max_reasoning_tokens < 0:
            raise ValueError("max_reasoning_tokens must be >= 0")
        self.max_reasoning_tokens = max_reasoning_tokens
        self.starts_in_reasoning = starts_in_reasoning
        self.think_end_id = think_end_id
        self.newline_id = newline_id
        self._reset()

    def _reset(self) -> None:
        self._seen = 0
        self._in_reasoning = self.starts_in_reasoning
        self._reasoning_tokens = 0
        self._last_id: int | None = None

    def _observe(self, generated_ids) -> None:
        if len(generated_ids) < self._seen:  # a new reply: start over
            self._reset()
        for token_id in generated_ids[self._seen :]:
            if token_id in (self.think_end_id, TOOL_CALL_START_ID):
                self._in_reasoning = False
            elif token_id == THINK_START_ID and not self._in_reasoning:
                self._in_reasoning = True
                self._reasoning_tokens = 0
            elif self._in_reasoning:
                self._reasoning_tokens += 1
            self._last_id = token_id
        self._seen = len(generated_ids)

    def forced_token(self, generated_ids) -> int | None:
        """The id that must come next, or None to leave the choice to the model."""
        self._observe(generated_ids)
        if not self._in_reasoning or self._reasoning_tokens < self.max_reasoning_tokens:
            return None
        ends_in_newline = self._last_id in (NEWLINE_ID, DOUBLE_NEWLINE_ID, self.newline_id)
        if self.newline_id is not None and self._reasoning_tokens > 0 and not ends_in_newline:
            return self.newline_id
        return self.think_end_id

    def __call__(self, generated_ids, logits: np.ndarray) -> np.ndarray:
        forced = self.forced_token(generated_ids)
        if forced is None:
            return logits
        masked = np.full_like(logits, -np.inf)
        # 0 rather than the model's logit: the forced id must win even if an
        # earlier processor had masked it.
        masked[..., forced] = 0.0
        return masked
