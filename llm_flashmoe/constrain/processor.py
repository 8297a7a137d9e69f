"""The logits processor that keeps tool calls and schema answers valid.

`ConstrainedDecoding(tokenizer, tools=..., schema=..., max_tokens=...)` is
called by the decode loop like any processor (`generated_ids, logits ->
logits`). It is idle, and free, while the model reasons or writes free text;
a grammar takes over:
- when the model writes `<tool_call>` (with tools offered): one call in
  SPEC section 3's form, then free text again (several calls follow each
  other this way);
- when the answer starts (after `</think>`, or at once with thinking off) and
  a schema is set: the JSON answer, or tool calls when tools are offered.
Near the end of `max_tokens` it forces the structure shut (closing.py), and
it keeps a call or answer from starting when too few tokens remain to finish.
"""

from __future__ import annotations

import numpy as np

from .closing import OutputScanner, closing_plan, closing_token, plain_text
from .grammar import TokenMask, force, grammar_vocabulary
from .schema_grammar import answer_grammar
from .tool_grammar import TOOL_CALL_START_ID, tool_call_grammar

THINK_END_ID = 248069  # </think>
NEWLINE_ID = 198

# Budget keeping (closing.py): the closing plan is recomputed every step once
# the budget left is within `_REPLAN_SLACK` of its length (one token can open
# a structure that needs many more to close), else every `_REPLAN_EVERY`
# steps. Within `_CHECK_SLACK` of it, the model's `_CHECKED` best tokens are
# each checked (is the end still reachable after it?) and only those that
# pass may be sampled.
_REPLAN_SLACK = 64
_REPLAN_EVERY = 8
_CHECK_SLACK = 24
_CHECKED = 8
_PLAN_LIMIT = 1024


class ConstrainedDecoding:
    """Logits processor: `processor(generated_ids, logits) -> logits`.

    `generated_ids` are this reply's ids so far (a shorter list than last
    time means a new reply). `max_tokens` is the generation's budget (None:
    no forced closing); `starts_in_reasoning` as for the prompt (thinking on).
    """

    def __init__(
        self,
        tokenizer,
        *,
        tools=(),
        schema=None,
        max_tokens: int | None = None,
        starts_in_reasoning: bool = True,
        constrain_tools: bool = True,
    ):
        self.vocabulary = grammar_vocabulary(tokenizer)
        self.tools = tuple(tools) if constrain_tools else ()
        self.max_tokens = max_tokens
        self.starts_in_reasoning = starts_in_reasoning
        self.mask = TokenMask(self.vocabulary.size)
        self._call_grammar = self._answer_grammar = None
        if self.tools:
            self._call_grammar = self.vocabulary.matcher(tool_call_grammar(self.tools), "the tools' parameters")
        if schema is not None:
            self._answer_grammar = self.vocabulary.matcher(answer_grammar(schema, self.tools), "the schema")
        self._shortest: dict[str, int] = {}
        self._reset()

    # --- state ---

    def _reset(self) -> None:
        self._seen = 0
        self._in_reasoning = self.starts_in_reasoning
        self._answered = False
        self._answer_complete = False  # the JSON is whole: only the end of turn may follow
        self.matcher = None      # the grammar in force, or None while free
        self.scanner = None
        self.active = None       # "call" or "answer": which grammar is in force
        self._plan_length = 0
        self._plan: list[int] | None = None     # the latest closing plan
        self._closing: list[int] = []           # what is left of the plan being forced
        self._planned_at = -_REPLAN_EVERY
        if self._answer_grammar is not None and not self._in_reasoning:
            self._start("answer")

    def _start(self, which: str) -> None:
        grammar = self._call_grammar if which == "call" else self._answer_grammar
        self.matcher, self.scanner, self.active = grammar.deep_copy(), OutputScanner(self.tools), which
        self._planned_at = -_REPLAN_EVERY

    def _observe(self, generated_ids) -> None:
        if len(generated_ids) < self._seen:
            self._reset()
        for token_id in generated_ids[self._seen :]:
            token_id = int(token_id)
            if self.matcher is not None:
                self._advance(token_id)
            elif token_id == TOOL_CALL_START_ID and self._call_grammar is not None:
                self._in_reasoning = False  # a call ends reasoning (SPEC section 3)
                self._start("call")
                self._advance(token_id)
            elif token_id == THINK_END_ID and self._in_reasoning:
                self._in_reasoning = False
                if self._answer_grammar is not None and not self._answered:
                    self._start("answer")
        self._seen = len(generated_ids)

    def _advance(self, token_id: int) -> None:
        # While closing, the forced plan is followed token by token.
        if self._closing and self._closing[0] == token_id:
            self._closing.pop(0)
        else:
            self._closing = []
        if self.active == "answer":
            self._answered = True  # even if it breaks below: one answer per reply
        if not self.matcher.consume_token(token_id):
            # Only a processor running after this one can force a token the
            # grammar refused; the structure is lost, so stop constraining it.
            self.matcher = self.active = None
            return
        self.scanner.feed(token_id, self.vocabulary.text_of(token_id))
        if self.matcher.is_stopped():
            # A call is over: free text again. An answer whose JSON can take
            # no more bytes stops before the end-of-turn token is written.
            self._answer_complete = self.active == "answer" and token_id not in self.vocabulary.eos_ids
            self.matcher = self.active = None

    # --- budget ---

    def shortest(self, which: str) -> int:
        """Tokens the closing policy needs for a whole call ("call") or answer ("answer")."""
        if which not in self._shortest:
            grammar = self._call_grammar if which == "call" else self._answer_grammar
            matcher, scanner = grammar.deep_copy(), OutputScanner(self.tools)
            n = 0
            if which == "call":
                matcher.consume_token(TOOL_CALL_START_ID)
                scanner.feed(TOOL_CALL_START_ID, "")
                n = 1
            plan = closing_plan(matcher, scanner, self.mask, self.vocabulary, _PLAN_LIMIT)
            self._shortest[which] = n + (len(plan) if plan is not None else _PLAN_LIMIT)
        return self._shortest[which]

    def _plan_length_now(self, left: int, step: int) -> int:
        if left <= self._plan_length + _REPLAN_SLACK or step - self._planned_at >= _REPLAN_EVERY:
            self._plan = closing_plan(self.matcher, self.scanner, self.mask, self.vocabulary, _PLAN_LIMIT)
            self._plan_length = len(self._plan) if self._plan is not None else _PLAN_LIMIT
            self._planned_at = step
        return self._plan_length

    def _reachable_after(self, token_id: int, left: int) -> bool:
        """Can the structure still end within `left` tokens if `token_id` comes next?"""
        matcher, scanner = self.matcher.deep_copy(), self.scanner.copy()
        if not matcher.consume_token(token_id):
            return False
        scanner.feed(token_id, self.vocabulary.text_of(token_id))
        if matcher.is_stopped():
            return True
        plan = closing_plan(matcher, scanner, self.mask, self.vocabulary, left)
        return plan is not None and len(plan) <= left - 1

    def _keep_reachable(self, masked: np.ndarray, left: int) -> np.ndarray | None:
        """`masked` reduced to its best tokens after which the end stays reachable."""
        row = masked.reshape(-1)
        best = np.argpartition(-row, _CHECKED)[:_CHECKED]
        best = best[np.isfinite(row[best])]
        in_text = self.scanner.in_free_text() and left - 1 >= self._plan_length
        token_bytes = self.vocabulary.tokenizer.token_bytes
        keep = [
            int(t) for t in best
            if (in_text and plain_text(token_bytes(int(t)))) or self._reachable_after(int(t), left)
        ]
        if not keep:
            return None
        out = np.full_like(masked, -np.inf)
        out[..., keep] = masked[..., keep]
        return out

    # --- the processor ---

    def __call__(self, generated_ids, logits: np.ndarray) -> np.ndarray:
        self._observe(generated_ids)
        step = len(generated_ids)
        left = None if self.max_tokens is None else self.max_tokens - step  # this step included
        if self._answer_complete:
            return force(logits, self.vocabulary.eos_ids[0])
        if self.matcher is None:
            return self._free(logits, left)
        if self._closing:
            return force(logits, self._closing[0])
        plan_length = None if left is None else self._plan_length_now(left, step)
        if plan_length is not None and left <= plan_length:
            if self._plan:
                # The policy is deterministic: its plan is what it would force step by step.
                self._closing = list(self._plan)
                return force(logits, self._closing[0])
            return self._close(logits)
        self.mask.fill(self.matcher)
        if self.mask.first_allowed() is None:
            self.matcher = self.active = None  # no way on: leave the model free rather than stuck
            return logits
        masked = self.mask.apply(logits)
        if plan_length is not None and left <= plan_length + _CHECK_SLACK:
            masked = self._keep_reachable(masked, left)
            if masked is None:
                return self._close(logits)
        return masked

    def _close(self, logits: np.ndarray) -> np.ndarray:
        token_id = closing_token(self.matcher, self.scanner, self.mask, self.vocabulary)
        return logits if token_id is None else force(logits, token_id)

    def _free(self, logits: np.ndarray, left: int | None) -> np.ndarray:
        if left is None:
            return logits
        if self._in_reasoning and self._answer_grammar is not None and not self._answered:
            # Leave room to answer: close reasoning ("\n" then </think>) in time.
            if left <= self.shortest("answer") + 2:
                return force(logits, NEWLINE_ID if left == self.shortest("answer") + 2 else THINK_END_ID)
        if self._call_grammar is not None and left <= self.shortest("call"):
            if np.isfinite(logits[..., TOOL_CALL_START_ID]).any():
                logits = logits.copy()
                logits[..., TOOL_CALL_START_ID] = -np.inf  # a call begun now could not end
        return logits


def constraint_processor(tokenizer, *, tools=(), schema=None, max_tokens=None,
                         starts_in_reasoning=True, constrain_tools=True):
    """A `ConstrainedDecoding`, or None when there is nothing to constrain."""
    if schema is None and not (tools and constrain_tools):
        return None
    return ConstrainedDecoding(tokenizer, tools=tools, schema=schema, max_tokens=max_tokens,
                               starts_in_reasoning=starts_in_reasoning, constrain_tools=constrain_tools)
