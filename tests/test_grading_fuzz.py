"""Fuzzing the grader: whatever a model writes and whatever its program returns, `grade_batch` gives
back one `Graded` per completion and never raises.

Inputs (hypothesis, derandomized so that CI sees the same cases every run): N-CoT answer lines and
whole completions of any unicode, huge and tiny ints and floats, NaN and infinities, digit strings
past int's 4,300-digit limit, deeply nested expressions, long whitespace runs, str subclasses whose
methods lie; for P-CoT, any value the sandbox could return (and some it cannot) given straight to
the grading that follows the sandbox, and crafted programs in the real sandbox.
"""

from __future__ import annotations

from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reftune.rewards import grade_batch, grading
from reftune.tasks.base import Example
from reftune.types import Graded

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # no example database: nothing written to the tree
MARKER = "Therefore, the answer is "
NUMBER = Example("n", "q", "72")
CHOICE = Example("m", "q", "a", options={"a": "38", "b": "27.675", "c": "6 / π", "d": "25 / √ π", "e": "none of these"})


class Liar(str):
    """A str whose methods and comparisons lie about its characters."""

    def __str__(self):
        return "Therefore, the answer is 72"

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__

    def __len__(self):
        return 1

    def strip(self, *args):
        return "72"

    def splitlines(self, *args):
        raise RuntimeError("lying")

    def startswith(self, *args):
        return True


class LiarInt(int):
    def __float__(self):
        raise RuntimeError("lying")

    def __int__(self):
        return 10**5000

    def __index__(self):
        raise RuntimeError("lying")


class LiarFloat(float):
    def __float__(self):
        return float("nan")

    def __round__(self, *args):
        raise RuntimeError("lying")


def nested(n: int) -> list[str]:
    return ["(" * n + "1" + ")" * n, "-" * n + "1", "[" * n + "]" * n, "1" + "**1" * n, "((" * n, "{" * n + "}" * n]


HUGE_INTS = st.one_of(st.integers(), st.integers(min_value=10**300, max_value=10**6000), st.sampled_from(
    [10**308, 2**1024, -(2**1024), 10**400, 10**4299, 10**4300, 10**5000]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5e-324, float("nan")])
DIGITS = st.integers(1, 20000).map(lambda n: "9" * n) | st.text("0123456789,./-+eE ", max_size=6000)
WEIRD = st.sampled_from(
    ["\ud800", "\x00", "٣", "１２", "½", "Ⅻ", "\u2028", "\u0085", "\u200b72", "⁷²", "𝟕𝟐", "72\u0301", " " * 5000 + "z",
     "\\frac{" * 500, "\\boxed{" + "{" * 3000, "1/0", "5 1/0", "0/0", "1e999999", "−" * 300 + "5", "$" * 3000,
     *nested(3000), *nested(150)]
)  # fmt: skip
PACKABLE_INTS = st.integers(-(2**13000), 2**13000)  # what the sandbox passes (str() stops at 4,300 digits)
ANSWERS = st.one_of(st.text(), DIGITS, WEIRD, PACKABLE_INTS.map(str), FLOATS.map(repr), st.lists(WEIRD, max_size=4).map("".join))


def completions(answer: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(answer, answer.map(lambda a: MARKER + a), st.tuples(answer, answer).map(lambda t: t[0] + MARKER + t[1]),
                     answer.map(lambda a: MARKER + a + "\n" + MARKER + "(b)"), answer.map(Liar))


def check(graded: list, n: int) -> None:
    assert len(graded) == n
    for g in graded:
        assert isinstance(g, Graded)
        assert g.answer is None or type(g.answer) is str
        assert type(g.correct) is bool and (g.answer is not None or not g.correct)
        assert type(g.reason) is str and (g.answer is not None or g.reason)


@FUZZ
@given(st.lists(completions(ANSWERS), min_size=1, max_size=4), st.booleans())
def test_nl_grading_never_raises(cots, guard):
    check(grade_batch(cots, [NUMBER] * len(cots), "nl", "number"), len(cots))
    check(grade_batch(cots, [CHOICE] * len(cots), "nl", "choice", choice_guard=guard), len(cots))


VALUES = st.one_of(
    st.none(), st.booleans(), HUGE_INTS, FLOATS, ANSWERS, st.sampled_from(["a", "(b)", "c )", "e", "f"]),
    st.builds(lambda v, nums: repr((v, nums)), st.one_of(st.none(), PACKABLE_INTS, FLOATS, st.text(), st.sampled_from("abcde")),
              st.lists(st.one_of(FLOATS, PACKABLE_INTS, st.text(max_size=5)), max_size=5)),  # what the choice guard reads
    st.integers(0, 5000).map(lambda n: "(" * n + "'a', [38.0]" + ")" * n),
    st.integers(0, 3000).map(lambda n: "('a', [" + "-" * n + "38.0])"),
    HUGE_INTS.map(LiarInt), FLOATS.map(LiarFloat), ANSWERS.map(Liar), st.just(object()), st.just([1, 2]),
)  # fmt: skip


@FUZZ
@given(st.lists(st.tuples(VALUES, st.text(max_size=50)), min_size=1, max_size=5), st.booleans())
def test_program_grading_never_raises(runs, guard):
    """The sandbox's answers, whatever they are, go through the same grading as real ones."""
    cots = ["def solution():\n    return 1\n"] * len(runs)
    runs = [(v, r if v is None else "") for v, r in runs]
    with mock.patch.object(grading, "program_values", lambda programs, timeout, memory_mb: list(runs)):
        check(grade_batch(cots, [NUMBER] * len(cots), "program", "number"), len(cots))
        check(grade_batch(cots, [CHOICE] * len(cots), "program", "choice", choice_guard=guard), len(cots))


@FUZZ
@given(st.lists(completions(st.one_of(st.text(), WEIRD)), min_size=1, max_size=3))
def test_program_clean_up_never_raises(cots):
    """Cleaning and instrumenting any text (the sandbox is not reached: every program fails to run)."""
    with mock.patch.object(grading, "program_values", lambda programs, t, m: [(None, "error")] * len(programs)):
        check(grade_batch(cots, [NUMBER] * len(cots), "program", "number"), len(cots))
        check(grade_batch(cots, [CHOICE] * len(cots), "program", "choice"), len(cots))


def _prog(body: str, header: str = "") -> str:
    return header + "def solution():\n" + "".join(f"    {line}\n" for line in body.splitlines())


def test_crafted_programs_in_the_real_sandbox():
    """What a model can return by accident or on purpose, through the real sandbox and grader."""
    deep = "def f():\n    return '(' * 4900 + \"'a', [38.0]\" + ')' * 4900\n"
    cases = [
        (_prog("return 10 ** 400"), "number out of range"),  # an int the sandbox passes, float cannot hold
        (_prog("return -10 ** 4000"), "output too large"),
        (_prog("return '9' * 1500"), "returned text is not a number"),  # more digits than any float
        (_prog("return '9' * 9999"), "returned text longer than 2000 characters"),
        (_prog("return float('nan')"), "not a finite number"),
        (_prog("return '1' + ' ' * 3000 + '/ 2'"), "returned text longer than 2000 characters"),
        (_prog("return 1e308 * 10"), "not a finite number"),
        (_prog("return 72"), ""),
    ]
    cots = [c for c, _ in cases]
    got = grade_batch(cots, [NUMBER] * len(cots), "program", "number", timeout=5.0)
    assert [g.reason for g in got] == [r for _, r in cases]
    assert got[-1] == Graded("72", True, "")
    # The choice guard reads the program's result as (value, locals); a program that rebinds
    # `solution` writes that text itself, nested past any recursion limit.
    chosen = grade_batch([deep + "solution = f\n", _prog("profit = 38.0\nreturn 'a'")], [CHOICE] * 2, "program",
                         "choice", timeout=5.0)  # fmt: skip
    assert chosen == [Graded(None, False, "could not read the program's result"), Graded("a", True, "")]


def test_crafted_answer_lines():
    lines = [MARKER + "9" * 1500, MARKER + "5 " + "1" * 4400 + "/" + "2" * 4400, MARKER + " " * 5000 + "z",
             MARKER + "(" * 1000 + "72", MARKER + "72", Liar("x"), MARKER + "5 " + "1" * 900 + "/" + "2" * 900]  # fmt: skip
    got = grade_batch(lines, [NUMBER] * len(lines), "nl", "number")
    assert [g.answer for g in got] == [None, None, None, "72", "72", None, "5.5"]
    assert got[0].reason == got[2].reason == "answer is not a number"
    assert got[1].reason == "answer line longer than 2000 characters" and got[5].reason == "no answer line"
    letters = grade_batch([MARKER + " " * 5000 + "(b) " + " " * 5000 + "x", MARKER + "the answer is" + "\t" * 300 + "(c)"],
                          [CHOICE] * 2, "nl", "choice")  # fmt: skip
    assert [g.answer for g in letters] == [None, "c"]  # one line of 10,000 characters: not read
    assert letters[0].reason == "answer line longer than 2000 characters"
