"""ReFT's reward as a plain function of a grader's verdict, and its settings as one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from reftune.types import Graded


@dataclass(frozen=True)
class RewardSpec:
    """The sequence reward of one sampled CoT (the paper: 1 / 0.1 / 0)."""

    correct: float = 1.0
    """The answer is right."""
    wrong: float = 0.1
    """An answer was extracted but is wrong (partial reward for a well-formed CoT)."""
    none: float = 0.0
    """Nothing usable was extracted (no answer line, program error, timeout...)."""


def correctness_score(graded: Graded, spec: RewardSpec = RewardSpec()) -> float:
    """ReFT's reward for one graded CoT."""
    if graded.correct:
        return spec.correct
    return spec.wrong if graded.answer is not None else spec.none
