"""The thinking budget forces "\n</think>" once reasoning has used N tokens."""

from __future__ import annotations

import numpy as np

from llm_flashmoe.chat.thinking_budget import ThinkingBudget

THINK, THINK_END, TOOL_CALL, NEWLINE = 248068, 248069, 248058, 198
WORD = 1814  # " world"


def forced_sequence(budget: ThinkingBudget, steps: int, model_choice=WORD) -> list[int]:
    """Run a fake decode loop: the model always wants `model_choice`."""
    generated: list[int] = []
    for _ in range(steps):
        logits = np.zeros(248320, dtype=np.float32)
        logits[model_choice] = 5.0
        generated.append(int(np.argmax(budget(generated, logits))))
    return generated


def test_forces_newline_then_think_end_after_budget():
    generated = forced_sequence(ThinkingBudget(3), 7)
    assert generated == [WORD, WORD, WORD, NEWLINE, THINK_END, WORD, WORD]


def test_no_extra_newline_when_reasoning_ends_in_one():
    generated = forced_sequence(ThinkingBudget(2), 4, model_choice=NEWLINE)
    assert generated == [NEWLINE, NEWLINE, THINK_END, NEWLINE]


def test_model_closing_think_itself_is_left_alone():
    budget = ThinkingBudget(3)
    assert budget.forced_token([WORD, THINK_END, WORD, WORD, WORD]) is None
    # A tool call also ends reasoning.
    assert ThinkingBudget(2).forced_token([WORD, TOOL_CALL, WORD, WORD]) is None


def test_thinking_off_counts_only_after_a_think_tag():
    budget = ThinkingBudget(2, starts_in_reasoning=False)
    assert budget.forced_token([WORD, WORD, WORD]) is None
    assert budget.forced_token([WORD, WORD, WORD, THINK, WORD]) is None
    assert budget.forced_token([WORD, WORD, WORD, THINK, WORD, WORD]) == NEWLINE


def test_zero_budget_closes_at_once_and_state_resets_for_a_new_reply():
    budget = ThinkingBudget(0)
    assert budget.forced_token([]) == THINK_END
    budget = ThinkingBudget(1)
    assert budget.forced_token([WORD, WORD]) == NEWLINE
    assert budget.forced_token([]) is None  # shorter list: a new reply


def test_masks_all_but_the_forced_id_and_keeps_batch_shape():
    budget = ThinkingBudget(0)
    logits = np.random.default_rng(0).standard_normal((1, 248320)).astype(np.float32)
    out = budget([], logits)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert np.argmax(out[0]) == THINK_END and np.isinf(out).sum() == 248320 - 1
    untouched = ThinkingBudget(5)([], logits)
    assert untouched is logits
