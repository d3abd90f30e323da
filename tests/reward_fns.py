"""Reward functions in TRL's convention, for tests/test_reward_funcs.py (named `reward_fns:<name>`
or `tests/reward_fns.py:<name>`)."""

from __future__ import annotations

import os

CALLS: list[dict] = []
"""Keyword columns each `spy` call received (tests read them)."""


def short_answer(prompts, completions, **kwargs):
    """1 for a CoT of at most 120 characters, else 0."""
    return [1.0 if len(c) <= 120 else 0.0 for c in completions]


def exact_gold(prompts, completions, answer, extracted, **kwargs):
    """1 / 0 on the grader's answer against the gold one; None where no answer was read."""
    return [None if e is None else float(e == a) for e, a in zip(extracted, answer)]


def spy(prompts, completions, **kwargs):
    CALLS.append({"prompts": list(prompts), "completions": list(completions), **kwargs})
    return [0.5] * len(completions)


def boom_on_id(prompts, completions, id, **kwargs):
    """Raises ZeroDivisionError on the row whose id is $REWARD_FNS_BOOM_ID."""
    return [1 / 0 if i == os.environ.get("REWARD_FNS_BOOM_ID") else 1.0 for i in id]


def wrong_length(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def not_a_number(prompts, completions, **kwargs):
    return [1.0] + ["high"] + [1.0] * (len(completions) - 2)


def not_finite(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def no_kwargs(prompts, completions):
    return [1.0] * len(completions)


def returns_one_number(prompts, completions, **kwargs):
    return 1.0
