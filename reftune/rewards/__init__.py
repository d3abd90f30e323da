"""Rewards: reading answers, grading CoTs against gold answers, and the score that PPO optimises.

Owns: `answers.py` (numbers, letters, the answer line, tolerance, voting keys), `programs.py`
(P-CoT clean-up, instrumentation, execution through `reftune.sandbox`), `grading.py`
(`grade_batch`: a CoT + its example -> `Graded`), `score.py` (`RewardSpec`, `correctness_score`).
May import: `reftune.types` and `reftune.sandbox` only; no torch.
"""

from reftune.rewards.answers import (TOLERANCE, answer_key, is_correct, normalize_number, option_value,
                                     parse_choice)
from reftune.rewards.grading import extract_answer, extract_answers, grade_batch, match_option
from reftune.rewards.programs import clean_program
from reftune.rewards.score import RewardSpec, correctness_score

__all__ = ["TOLERANCE", "RewardSpec", "answer_key", "clean_program", "correctness_score", "extract_answer",
           "extract_answers", "grade_batch", "is_correct", "match_option", "normalize_number", "option_value",
           "parse_choice"]
