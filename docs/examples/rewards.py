"""Reward functions for docs/trl-ppo-migration.md, in TRL's convention: each gets the prompts, the
completions and the dataset's columns as keyword lists, and returns one float (or None) per row.

    reftune train ... reward_funcs='[correctness,docs/examples/rewards.py:brevity]' reward_weights='[1.0,0.2]'
"""

from __future__ import annotations


def _text(completion) -> str:
    """A completion as text: plain prompts give text, chat prompts [{"role": "assistant", ...}]."""
    return completion[0]["content"] if isinstance(completion, list) else completion


def brevity(prompts, completions, **kwargs) -> list[float]:
    """1 for an empty CoT down to 0 at 400 characters: a small push towards short answers."""
    return [max(0.0, 1.0 - len(_text(c)) / 400) for c in completions]


def matches_gold(prompts, completions, answer, extracted, **kwargs) -> list[float | None]:
    """1 / 0 on the grader's answer against the gold one; None (no score) where none was read."""
    return [None if got is None else float(got == gold) for got, gold in zip(extracted, answer)]


def missing_eos_penalty(prompts, completions, ended, **kwargs) -> list[float]:
    """TRL's `missing_eos_penalty` as a reward: -1 for a CoT cut at max_new_tokens, else 0."""
    return [0.0 if e else -1.0 for e in ended]
