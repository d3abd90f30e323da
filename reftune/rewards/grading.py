"""Answer extraction and grading: the paper's reward, with fewer ways to fool it.

- N-CoT (`nl`): the answer is the text after the LAST "Therefore, the answer is" (colon optional),
  read as a number or an option letter.
- P-CoT (`program`): the program is cleaned (junk after the code dropped, blank lines inside the
  function and top-level helpers kept) and run in `reftune.sandbox`; the answer is `solution()`.
- Numbers are correct when |pred - gold| <= 1e-2 (the paper's rule); letters compare exactly.

The RL reward is 1 / 0.1 / 0 for correct / answered but wrong / no usable answer, so
`Graded.answer` is None whenever the answer is unusable, with `Graded.reason` saying why.
No torch here: data loading and evaluation import this module (the sandbox's workers import nothing of reftune).
"""

from __future__ import annotations

import ast
from typing import Sequence

from reftune.rewards.answers import (LETTERS, OPTION_REL_TOL, TOLERANCE, answer_segment, extract_nl, is_correct,
                                     option_value, parse_choice)
from reftune.rewards.formats import extract_final
from reftune.rewards.programs import clean_program, instrument, program_values, value_to_answer
from reftune.types import Example, Graded


# ---------------------------------------------------------------- extraction

def extract_answer(completion: str, style: str) -> str | None:
    """The normalised answer of one completion. style: nl | program | choice (see module doc).
    `choice` reads a letter after the answer marker, or from the text itself ("Answer: c")."""
    return extract_answers([completion], style)[0]


def extract_answers(completions: list[str], style: str, timeout: float = 2.0,
                    memory_mb: int = 512) -> list[str | None]:
    """Batch `extract_answer`; programs run in one sandbox call."""
    if style == "nl":
        return [extract_nl(c, "number")[0] for c in completions]
    if style == "choice":
        return [parse_choice(seg if (seg := answer_segment(c)) is not None else c) for c in completions]
    if style == "program":
        runs = program_values([clean_program(c) for c in completions], timeout, memory_mb)
        return [value_to_answer(v, r)[0] for v, r in runs]
    raise ValueError(f"style must be nl, program or choice, got {style!r}")


# ---------------------------------------------------------------- grading (the reward)

def _close(value: float, option: float) -> bool:
    return abs(value - option) <= max(TOLERANCE, OPTION_REL_TOL * abs(option))


def match_option(value: float, options: dict[str, str] | None, prefer: str | None = None) -> str | None:
    """The option whose numeric value is closest to `value`, if within tolerance (absolute 1e-2 or
    relative OPTION_REL_TOL, as options are printed rounded); else None. Among options with the same
    value (MathQA repeats some, e.g. "15 sec" as b and e) `prefer` wins: either is right."""
    matches = []
    for letter, text in sorted((options or {}).items()):
        opt = option_value(text)
        if opt is not None and _close(value, opt):
            matches.append((abs(value - opt), letter))
    if not matches:
        return None
    best = min(err for err, _ in matches)
    ties = [letter for err, letter in matches if err <= best + 1e-12]
    return prefer if prefer in ties else ties[0]


def _grade_program_choice(value, reason: str, ex: Example, guard: bool) -> tuple[str | None, str]:
    """A program's answer to a multiple-choice question.

    - It returns a number: the answer is the option with that value (see `match_option`). With the
      guard a value matching no option is no answer; without it the number itself is the answer
      (wrong, but "extracted", as in the release).
    - It returns a letter: without the guard, any letter a-e is the answer (the release). With the
      guard the letter must be one of the example's options, and when that option is a number the
      program must have computed it: one of solution()'s numeric local variables at `return` must
      match the option's value (the program is instrumented to report them). A bare `return "c"`
      computed nothing: it is the reward hack the paper saw, and gets no reward at all. Options
      without a value ("none of these") need no computed match.
    """
    numbers: list[float] = []
    if guard and isinstance(value, str):  # instrumented run: value = repr((returned, numeric locals))
        try:
            value, numbers = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError):
            return None, "could not read the program's result"
    answer, why = value_to_answer(value, reason)
    if answer is None:
        return None, why
    if answer in LETTERS:
        if not guard:
            return answer, ""
        if ex.options is not None and answer not in ex.options:
            return None, f"letter {answer!r} is not an option"
        target = option_value(ex.options[answer]) if ex.options else None
        if target is not None and not any(_close(n, target) for n in numbers):
            return None, f"letter {answer!r} without a computed value matching that option"
        return answer, ""
    letter = match_option(float(answer), ex.options, prefer=parse_choice(ex.answer))
    if letter is not None:
        return letter, ""
    return (None, f"value {answer} matches no option") if guard else (answer, "")


def grade_batch(cots: Sequence[str], examples: Sequence[Example], style: str, answer_type: str,
                choice_guard: bool = True, timeout: float = 2.0, memory_mb: int = 512,
                answer_format: str = "reft") -> list[Graded]:
    """Grade full CoTs against their examples (the reward's input).

    N-CoT: number after the last marker, or for choice questions the letter after it (with the
    guard, a letter that is not one of the example's options is no answer). P-CoT: the program's
    value; for choice questions see `_grade_program_choice`.
    """
    if len(cots) != len(examples):
        raise ValueError(f"grade_batch: {len(cots)} CoTs for {len(examples)} examples")
    if answer_type not in ("number", "choice"):
        raise ValueError(f"answer_type must be number or choice, got {answer_type!r}")
    graded: list[Graded] = []
    if style == "nl":
        for cot, ex in zip(cots, examples):
            answer, why = extract_final(cot, answer_type, answer_format)  # rewards/formats.py
            if answer is not None and answer_type == "choice" and choice_guard \
                    and ex.options is not None and answer not in ex.options:
                answer, why = None, f"letter {answer!r} is not an option"
            graded.append(Graded(answer, is_correct(answer, ex.answer, answer_type), why))
        return graded
    if style != "program":
        raise ValueError(f"style must be nl or program, got {style!r}")
    programs = [clean_program(c) for c in cots]
    if answer_type == "choice" and choice_guard:
        programs = [(instrument(p) or "") if p else "" for p in programs]
    for (value, reason), ex in zip(program_values(programs, timeout, memory_mb), examples):
        if answer_type == "choice":
            answer, why = _grade_program_choice(value, reason, ex, choice_guard)
        else:
            answer, why = value_to_answer(value, reason)
            if answer is not None and answer in LETTERS:
                answer, why = None, "a letter is not a number"
        graded.append(Graded(answer, is_correct(answer, ex.answer, answer_type), why))
    return graded
