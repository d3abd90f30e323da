"""Where a chain of thought states its final answer: one extractor for every format, chosen per
dataset and overridable (`data.answer_format`).

| format      | the answer is read from                          | a gold CoT without one gets  |
| ----------- | ------------------------------------------------ | ---------------------------- |
| `reft`      | the last "Therefore, the answer is: x" (the paper's; colon optional) | `Therefore, the answer is: x` |
| `answer_is` | the last "The answer is x" ("Therefore, ..." and "The final answer is" too) | `The answer is x` |
| `gsm8k`     | the last "#### x" (GSM8K's own files)             | `#### x`                     |
| `boxed`     | the last `\\boxed{x}` (nested braces kept)        | `\\boxed{x}`                  |
| `any`       | whichever of the above comes last in the text    | `Therefore, the answer is: x` |

`auto` is `reft` for the paper's datasets and the built-in task (their gold CoTs use it), and
`any` for your own files (`json`, `hf`), whose CoTs may end in any of these.

The text read is then a number (`answers.normalize_number`: "1,080", "$5", "3/4",
`\\frac{3}{4}`, ...) or, for multiple choice, an option letter ("(C)", `\\boxed{C}`). LaTeX beyond
`\\frac`, `\\boxed` and `\\text` (`\\sqrt{2}`, `\\pi`, `2\\cdot 3`) needs math-verify: with it
installed (`pip install 'reftune[latex]'`) it is read by math-verify; without it such an answer
is no answer, with a reason naming the extra (and a warning once), never a number misread.
Pure text, no torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

from reftune.rewards.answers import answer_segment, format_number, normalize_number, parse_choice

log = logging.getLogger(__name__)

LATEX_EXTRA = "pip install 'reftune[latex]'"
NEEDS_MATH_VERIFY = f"a LaTeX answer that needs math-verify ({LATEX_EXTRA})"

_ANSWER_IS_RE = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####\s*")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# LaTeX the plain rules read (answers._latex_to_plain): fractions, boxes, text, spacing, sizing.
_PLAIN_LATEX = {"frac", "dfrac", "tfrac", "boxed", "fbox", "text", "textbf", "mathrm", "mathbf", "left", "right",
                "displaystyle", "quad", "qquad"}
_COMMAND_RE = re.compile(r"\\([A-Za-z]+)")


# ---------------------------------------------------------------- finding the answer's text

def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def _reft(text: str) -> tuple[int, str] | None:
    segment = answer_segment(text)
    return None if segment is None else (len(text) - len(segment), segment)


def _after(pattern: re.Pattern) -> Callable[[str], tuple[int, str] | None]:
    def find(text: str) -> tuple[int, str] | None:
        m = _last(pattern, text)
        return None if m is None else (m.start(), text[m.end():])
    return find


def _boxed(text: str) -> tuple[int, str] | None:
    """The content of the last `\\boxed{...}`, braces balanced; None when it is not closed."""
    m = _last(_BOXED_RE, text)
    if m is None:
        return None
    depth = 1
    for i in range(m.end(), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return m.start(), text[m.end():i]
    return None


@dataclass(frozen=True)
class AnswerFormat:
    find: Callable[[str], tuple[int, str] | None]
    """text -> (where the answer statement starts, the text holding the answer), or None."""
    line: str
    """How a gold CoT without an answer states it: `{answer}` is filled in."""


FORMATS: dict[str, AnswerFormat] = {
    "reft": AnswerFormat(_reft, "Therefore, the answer is: {answer}"),
    "answer_is": AnswerFormat(_after(_ANSWER_IS_RE), "The answer is {answer}"),
    "gsm8k": AnswerFormat(_after(_GSM8K_RE), "#### {answer}"),
    "boxed": AnswerFormat(_boxed, "\\boxed{{{answer}}}"),
}
ANSWER_FORMATS = ("auto", *FORMATS, "any")
AUTO_FORMAT = {"json": "any", "hf": "any"}
"""`auto` by dataset name (others: `reft`)."""


def resolve_answer_format(answer_format: str, dataset: str) -> str:
    """The format `auto` stands for with `dataset`; other names are checked and returned."""
    if answer_format == "auto":
        return AUTO_FORMAT.get(dataset, "reft")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"data.answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    return answer_format


def find_answer(text: str, answer_format: str) -> str | None:
    """The text holding the final answer (after the marker, or inside the box), or None."""
    if answer_format == "any":
        found = [f.find(text) for f in FORMATS.values()]
        found = [x for x in found if x is not None]
        return max(found, key=lambda x: x[0])[1] if found else None
    hit = FORMATS[answer_format].find(text)
    return None if hit is None else hit[1]


def answer_line(answer: str, answer_format: str) -> str:
    """The line that states `answer` in this format (appended to gold CoTs that lack one)."""
    return FORMATS.get(answer_format, FORMATS["reft"]).line.format(answer=answer)


# ---------------------------------------------------------------- reading it

def needs_math_verify(text: str) -> bool:
    """True when the part of `text` a number is read from (its first line, after its last "=", as
    `normalize_number` reads it) holds LaTeX the plain rules would misread: a command beyond
    _PLAIN_LATEX. `$5 \\times 3 = 15$` reads 15 without it; `\\sqrt{2}` does not."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    part = line.rsplit("=", 1)[1] if "=" in line else line
    return "\\" in part and any(c not in _PLAIN_LATEX for c in _COMMAND_RE.findall(part))


def have_math_verify() -> bool:
    try:
        import math_verify  # noqa: F401  (optional extra)
    except ImportError:
        return False
    return True


_warned: set[str] = set()


def read_number(text) -> tuple[str | None, str]:
    """(canonical number, "") or (None, why). LaTeX the plain rules would misread goes to
    math-verify; without it installed, it is no number (`NEEDS_MATH_VERIFY`)."""
    if isinstance(text, str) and needs_math_verify(text):
        if not have_math_verify():
            if "latex" not in _warned:
                _warned.add("latex")
                log.warning("an answer in LaTeX (%r) needs math-verify to be read: %s", text[:60], LATEX_EXTRA)
            return None, NEEDS_MATH_VERIFY
        number = _math_verify_number(text)
        return number, "" if number is not None else "LaTeX answer is not a number"
    number = normalize_number(text)
    return number, "" if number is not None else "answer is not a number"


def _math_verify_number(text: str) -> str | None:
    """The number math-verify reads from the first line of `text` (math delimiters added when
    it has none, as a bare `\\sqrt{2}` is not extracted without them)."""
    from math_verify import parse  # optional extra: pip install 'reftune[latex]'

    line = next((ln for ln in text.splitlines() if ln.strip()), "").strip()
    for candidate in (line, f"${line.strip('$').strip()}$"):
        try:
            items = parse(candidate)
        except Exception:  # noqa: BLE001  (model output: an unreadable answer is no answer)
            items = []
        for item in items:
            try:
                return format_number(float(item))
            except (TypeError, ValueError, OverflowError):
                continue
    return None


def read_answer(segment: str, answer_type: str) -> tuple[str | None, str]:
    """A number, or an option letter for multiple choice, from the answer's text."""
    if answer_type == "choice":
        letter = parse_choice(segment)
        return letter, "" if letter else "answer is not an option letter"
    return read_number(segment)


def extract_final(completion: str, answer_type: str, answer_format: str = "reft") -> tuple[str | None, str]:
    """(answer, "") or (None, why) for an N-CoT: `find_answer`, then `read_answer`."""
    segment = find_answer(completion, answer_format)
    if segment is None:
        return None, "no answer line" if answer_format != "boxed" else "no \\boxed{} answer"
    return read_answer(segment, answer_type)
