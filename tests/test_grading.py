"""Answer extraction, comparison, voting keys and the MathQA guard (reftune.rewards)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

import reftune
from reftune.rewards import (
    answer_key, clean_program, extract_answer, extract_answers, grade_batch, is_correct, normalize_number,
    option_value, parse_choice,
)
from reftune.tasks.base import Example

MATHQA_OPTIONS = {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("18.00", "18"), ("18.0.", "18"), ("18 apples.", "18"), ("1,234", "1234"),
    ("1,234,567.5", "1234567.5"), ("$1,234.50", "1234.5"), ("€5", "5"), ("£7.5", "7.5"),
    ("45%", "45"), ("-3.5", "-3.5"), ("- 5", "-5"), ("−120", "-120"), ("-$5", "-5"), ("$-5", "-5"),
    ("3/4", "0.75"), ("28 / 55", "0.509091"), ("5 1/2", "5.5"), ("<203>.", "203"), ("<6%>.", "6"),
    (".5", "0.5"), ("1e3", "1000"), ("17.999999999", "18"), ("0.1 + 0.2", "0.1"),
    ("5 + 3 = 8", "8"), ("5 + 3 = 8 apples", "8"), ("x = 12 / 4 = 3", "3"), ("10 - 5", "10"),
    ("  \n 42\nQuestion: 7", "42"), ("rs . 1,200", "1200"), (r"\boxed{\frac{3}{4}}", "0.75"),
    ("five", None), ("", None), (None, None), ("24/0", None), ("CO2", None),
    (7, "7"), (2.50, "2.5"), (float("nan"), None), (True, None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("completion, expected", [
    ("so 24 + 48 = 72.\nTherefore, the answer is: 72", "72"),
    ("Therefore, the answer is 72", "72"),  # colon optional
    ("29 species * 7 = 203 pairs.\n\nTherefore, the answer is <203>.", "203"),  # SVAMP's gold form
    ("Therefore, the answer is: 5\nwait.\nTherefore, the answer is: 7\nQuestion: 9 apples", "7"),  # last marker
    ("therefore, the answer is: $1,080.", "1080"),
    ("Therefore, the answer is: 5 + 3 = 8", "8"),
    ("The answer is 72", None),  # no marker: no answer (no partial reward)
    ("Therefore, the answer is: many", None),
])
def test_extract_nl(completion, expected):
    assert extract_answer(completion, "nl") == expected


@pytest.mark.parametrize("text, expected", [
    ("(B)", "b"), ("b )", "b"), ("B", "b"), ("c.", "c"), ("Answer: c", "c"), ("answer is (d)", "d"),
    ("option e", "e"), ("<a>.", "a"), ("'e'", "e"), ("[C]", "c"), ("b ) 27.675", "b"),
    ("e ) none of these", "e"), ("a total of 38", None), ("f", None), ("38", None), ("", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected
    assert extract_answer(text, "choice") == expected


def test_extract_choice_after_marker():
    assert extract_answer("a ) is wrong since ...\nTherefore, the answer is: (C)", "choice") == "c"
    assert extract_answers(["Therefore, the answer is: b", "nothing"], "choice") == ["b", None]


def test_is_correct_and_tolerance():
    assert is_correct("18", "18.0", "number")
    assert is_correct("18.009", "18", "number")
    assert not is_correct("18.02", "18", "number")
    assert is_correct("3.33", "3.3333333333", "number")
    assert is_correct("0.5", "1/2", "number")
    assert is_correct("18.02", "18", "number", tol=0.05)
    assert not is_correct(None, "18", "number")
    assert not is_correct("18", None, "number")
    assert not is_correct("abc", "18", "number")
    assert is_correct("B", "b", "choice") and is_correct("(c)", "c", "choice")
    assert not is_correct("b", "c", "choice") and not is_correct(None, "c", "choice")
    with pytest.raises(ValueError):
        is_correct("1", "1", "text")


def test_answer_key_merges_close_numbers():
    assert answer_key("17.99999", "number") == answer_key("18", "number") == answer_key("18.0", "number") == "18"
    assert answer_key("0.333333", "number") == answer_key("0.33", "number")
    assert answer_key("17.5", "number") != answer_key("18", "number")
    assert answer_key("B", "choice") == answer_key("b", "choice") == "b"
    assert answer_key(None, "number") is None and answer_key("many", "number") is None


def test_option_values():
    assert option_value("rs . 1,200") == 1200 and option_value("16.66 %") == 16.66
    assert option_value("28 / 55") == pytest.approx(28 / 55)
    assert option_value("6 / π") == pytest.approx(1.909859, abs=1e-6)
    assert option_value("25 / √ π") == pytest.approx(25 / 3.14159265 ** 0.5, abs=1e-6)
    assert option_value("78 + ( 4 / 7 ) %") == pytest.approx(78 + 4 / 7)
    assert option_value("none of these") is None


# ---------------------------------------------------------------------------------------------- N-CoT grading

def test_grade_nl_reasons_and_partial_reward_inputs():
    ex = Example("1", "q", "72")
    got = grade_batch(["Therefore, the answer is: 72", "Therefore, the answer is: 71", "72", ""],
                      [ex] * 4, style="nl", answer_type="number")
    assert [g.correct for g in got] == [True, False, False, False]
    assert [g.answer for g in got] == ["72", "71", None, None]
    assert got[2].reason == "no answer line" and got[0].reason == ""


def test_grade_nl_choice_guard():
    four = Example("1", "q\na ) 1 , b ) 2 , c ) 3 , d ) 4", "c", options={"a": "1", "b": "2", "c": "3", "d": "4"})
    cots = ["Therefore, the answer is: C", "Therefore, the answer is: e", "Therefore, the answer is: 3"]
    guarded = grade_batch(cots, [four] * 3, "nl", "choice", choice_guard=True)
    assert [(g.answer, g.correct) for g in guarded] == [("c", True), (None, False), (None, False)]
    assert "not an option" in guarded[1].reason
    loose = grade_batch(cots, [four] * 3, "nl", "choice", choice_guard=False)
    assert [g.answer for g in loose] == ["c", "e", None]  # "e" is a letter: extracted, but wrong


# ---------------------------------------------------------------------------------------------- programs

BLANK_LINE_AND_HELPER = '''def helper(x):
    return x * 2


def solution():
    """A question."""
    a = helper(10)

    b = a + 1
    result = b
    return result

print(solution())
Question: what is next?'''


def test_clean_program_keeps_blank_lines_and_helpers():
    prog = clean_program(BLANK_LINE_AND_HELPER)
    assert "def helper" in prog and "    b = a + 1" in prog and "a = helper(10)\n\n    b" in prog
    assert "print(" not in prog and "Question" not in prog
    # Helper defined after solution, Markdown fence, a second solution (a new problem) and junk.
    text = "```python\ndef solution():\n    return twice(4)\n\ndef twice(x):\n    return 2 * x\n```\nmore text"
    assert "def twice" in clean_program(text) and "more text" not in clean_program(text)
    two = "def solution():\n    return 1\nTherefore\ndef solution():\n    return 2"
    assert clean_program(two).strip() == "def solution():\n    return 1"
    assert clean_program("no code here") == ""
    prose_first = "from the table we get:\nTotal = 5 apples\ndef solution():\n    return 5\nDone."
    assert clean_program(prose_first).strip() == "def solution():\n    return 5"
    assert clean_program("def solution():\n    return 1\x00") == ""
    assert clean_program("def solution():\n    return math.sqrt(4)").startswith("import math")
    # A truncated generation keeps only complete statements (and then returns nothing).
    assert clean_program("def solution():\n    a = 5\n    b = a *").strip() == "def solution():\n    a = 5"


@dataclass(frozen=True)
class _FakeResult:
    value: object
    reason: str

    @property
    def ok(self):
        return self.reason == ""


def _fake_run_programs(programs, timeout=2.0, memory_mb=512, entry="solution"):
    """Trusted in-process stand-in for the sandbox: the grading logic is tested on its own."""
    out = []
    for prog in programs:
        env: dict = {}
        try:
            exec(prog, env)
            value = env[entry]()
            out.append(_FakeResult(value, "") if value is not None else _FakeResult(None, "error: returned None"))
        except Exception as e:  # noqa: BLE001
            out.append(_FakeResult(None, f"error: {type(e).__name__}"))
    return out


@pytest.fixture
def fake_sandbox(monkeypatch):
    module = types.ModuleType("reftune.sandbox")
    module.run_programs = _fake_run_programs
    monkeypatch.setitem(sys.modules, "reftune.sandbox", module)
    monkeypatch.setattr(reftune, "sandbox", module, raising=False)
    return module


def _prog(body: str) -> str:
    return "def solution():\n" + "\n".join("    " + ln for ln in body.splitlines())


def test_program_number_grading(fake_sandbox):
    ex = Example("1", "q", "21")
    cots = [BLANK_LINE_AND_HELPER, _prog("return 20.99999999"), _prog("return 'c'"), _prog("x = 1"), "prose"]
    got = grade_batch(cots, [ex] * 5, "program", "number")
    assert [g.answer for g in got] == ["21", "21", None, None, None]
    assert got[0].correct and got[1].correct
    assert got[4].reason == "no program found"
    assert extract_answers(cots[:2], "program") == ["21", "21"]


def test_program_choice_guard(fake_sandbox):
    ex = Example("m", "q\na ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these", "a",
                 options=MATHQA_OPTIONS)
    cots = [
        _prog("return 31.1 * 1.05 + 5.345"),              # 38.0 -> option a
        _prog("return 27.6751"),                          # matches b within tolerance -> b (wrong)
        _prog("return 12.5"),                              # matches no option
        _prog("return 'a'"),                               # bare letter: computed nothing
        _prog("profit = 38.0\nreturn 'a'"),               # letter with the computed value -> a
        _prog("profit = 12.0\nreturn 'a'"),               # letter whose value was never computed
        _prog("return 'e'"),                               # non-numeric option: no value to match
        _prog("return 'f'"),                               # not an option
    ]
    guarded = grade_batch(cots, [ex] * len(cots), "program", "choice", choice_guard=True)
    assert [g.answer for g in guarded] == ["a", "b", None, None, "a", None, "e", None]
    assert [g.correct for g in guarded] == [True, False, False, False, True, False, False, False]
    assert "matches no option" in guarded[2].reason and "computed value" in guarded[3].reason
    loose = grade_batch(cots, [ex] * len(cots), "program", "choice", choice_guard=False)
    assert [g.answer for g in loose] == ["a", "b", "12.5", "a", "a", "a", "e", None]


def test_grade_batch_checks_lengths():
    with pytest.raises(ValueError):
        grade_batch(["x"], [], "nl", "number")


# ---------------------------------------------------------------------------------------------- real sandbox

def test_programs_in_the_real_sandbox():
    ex = Example("1", "q", "21")
    cots = [BLANK_LINE_AND_HELPER, _prog("while True:\n    pass"), _prog("import os\nreturn 21"),
            _prog("return 1 / 0"), "def solution():\n    return math.floor(21.7)"]
    got = grade_batch(cots, [ex] * len(cots), "program", "number", timeout=1.0)
    assert got[0].answer == "21" and got[0].correct
    assert got[1].answer is None and "timeout" in got[1].reason
    assert got[2].answer is None and got[2].reason  # forbidden import: no answer at all
    assert got[3].answer is None and got[3].reason.startswith("error")
    assert got[4].answer == "21"  # math is available, as in the release


def test_model_programs_print_no_warnings(capfd):
    """A program that Python parses with a SyntaxWarning (`1if`) or a DeprecationWarning (an invalid
    escape) is graded like any other, and neither the trainer nor the sandbox prints the warning."""
    import warnings

    ex = Example("1", "q", "2")
    cots = ["def solution():\n    x = 1if True else 0\n    return x + 1",
            'def solution():\n    s = "\\d"\n    return len(s)']
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = grade_batch(cots, [ex] * len(cots), "program", "number", timeout=5.0)
    assert [g.answer for g in got] == ["2", "2"]
    assert [str(w.message) for w in seen] == []
    assert "Warning" not in capfd.readouterr().err


def test_choice_guard_in_the_real_sandbox():
    ex = Example("m", "q", "a", options=MATHQA_OPTIONS)
    cots = [_prog("return 38.0"), _prog("return 'a'"), _prog("profit = 38.0\nreturn 'a'")]
    got = grade_batch(cots, [ex] * 3, "program", "choice", choice_guard=True)
    assert [g.answer for g in got] == ["a", None, "a"]
