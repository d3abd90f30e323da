"""Reading answers: numbers (thousands separators, fractions, LaTeX, currency, percent), option
letters, the N-CoT answer line, the paper's 1e-2 tolerance and the voting key. Pure text, no torch.

Model output is read under explicit bounds (see "Bounds" below): an answer line longer than
MAX_ANSWER_CHARS or a number longer than MAX_NUMBER_CHARS is no answer, and nothing here raises
on any text, however long, nested or oddly typed (a `str` subclass is read as the plain text).
"""

from __future__ import annotations

import ast
import math
import re

TOLERANCE = 1e-2
"""The paper's tolerance for numeric answers."""
OPTION_REL_TOL = 1e-3
"""MathQA options are printed rounded ("25.7 miles"): a computed value also matches an option
within this relative error (besides the absolute TOLERANCE)."""
DECIMALS = 6
"""Canonical number strings are rounded to this many decimals (17.999999999 -> "18")."""
LETTERS = "abcde"
MAX_ANSWER_CHARS = 2_000
"""An answer line (or a returned text) longer than this is not read: no answer."""
MAX_NUMBER_CHARS = 400
"""A number written with more characters than this is not read (a float holds at most 309 digits
before the point, and Python will not convert an int of more than 4,300)."""

# The last marker wins; the colon is optional because SVAMP's gold CoTs end "... is <203>."
_MARKER_RE = re.compile(r"therefore,?\s+the\s+answer\s+is\s*:?", re.IGNORECASE)

# A number: thousands separators, decimals, leading-dot decimals, exponent. The look-behind
# keeps it out of words ("CO2", "x2"), the look-ahead keeps "1,2345" from reading as "1,234".
_CORE_RE = re.compile(
    r"(?<![\w])(?<!\d\.)"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+(?![\w]))?"
)
_FRACTION_RE = re.compile(r"\s*/\s*(\d+(?:\.\d+)?)(?![\d.])")
_MIXED_RE = re.compile(r"\s+(\d+)\s*/\s*(\d+)(?![\d.])")  # "5 1/2" after the whole part
_MINUS = "-−–"
_CURRENCY = "$€£¥"

# An option letter: "(B)", "b )", "c.", "<d>", "Answer: c", "option (e)". The letter must stand
# alone (end, bracket or punctuation next), so the article in "a total of 38" is not an answer.
_CHOICE_RE = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)?(?:\s+is)?\s*[:\-]?\s*"
    r"[(\[{<'\"]?\s*(?P<letter>[a-e])\s*(?:[)\]}>'\".,:;]|$)",
    re.IGNORECASE,
)
_LATEX_FRAC_RE = re.compile(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


# ---------------------------------------------------------------- bounds (model output is read under these)

def plain_text(text) -> str:
    """`text` as a plain str: a str subclass through str.__str__ (never its own methods), anything
    else through str() (a failing __str__ gives "")."""
    if type(text) is str:
        return text
    if issubclass(type(text), str):
        return str.__str__(text)
    try:
        text = str(text)
    except Exception:
        return ""
    return str.__str__(text) if issubclass(type(text), str) else ""


def answer_line(text) -> str | None:
    """The first non-empty line of `text` (its leading blank lines dropped), or None when there is
    none or it is longer than MAX_ANSWER_CHARS."""
    text = plain_text(text).lstrip()
    end = len(text)
    for sep in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029":  # what str.splitlines() splits on
        found = text.find(sep, 0, MAX_ANSWER_CHARS + 1)
        if found != -1:
            end = min(end, found)
    if not text or end > MAX_ANSWER_CHARS:
        return None
    return text[:end]


def exact_number(x) -> float | None:
    """An int or float (bools excluded, subclasses read as the plain number) as a float; None when
    it is out of float range or not a number."""
    kind = type(x)
    if issubclass(kind, bool) or not issubclass(kind, (int, float)):
        return None
    try:
        return float(int.__int__(x)) if issubclass(kind, int) else float.__float__(x)
    except OverflowError:  # an int beyond float range (10 ** 400)
        return None


# ---------------------------------------------------------------- numbers and letters

def format_number(x: float) -> str | None:
    """Canonical text of a number: rounded to DECIMALS, no trailing zeros ("18", "0.75", "-3.5")."""
    x = exact_number(x)
    if x is None or not math.isfinite(x):
        return None
    text = f"{round(x, DECIMALS):.{DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _first_number(text: str) -> float | None:
    """Value of the first number-like token in `text` (sign, currency, fraction, mixed number)."""
    m = _CORE_RE.search(text)
    if m is None or m.end() - m.start() > MAX_NUMBER_CHARS:
        return None
    value = float(m.group("num").replace(",", "") + (m.group("exp") or ""))
    rest = text[m.end():]
    whole_is_int = m.group("exp") is None and re.fullmatch(r"\d+", m.group("num")) is not None
    mixed = _MIXED_RE.match(rest) if whole_is_int else None
    if mixed and int(mixed.group(1)) < int(mixed.group(2)):  # "5 1/2" = 5.5 (a proper fraction)
        value += int(mixed.group(1)) / int(mixed.group(2))
    elif frac := _FRACTION_RE.match(rest):
        den = float(frac.group(1))
        if den == 0:
            return None
        value /= den
    # A minus right before the number (currency may sit on either side of it) makes it negative,
    # unless the minus follows a word or a number: "10 - 5" is a subtraction.
    before = text[: m.start()].rstrip().rstrip(_CURRENCY).rstrip()
    if before and before[-1] in _MINUS:
        prev = before[:-1].rstrip().rstrip(_CURRENCY).rstrip()
        if not prev or not (prev[-1].isalnum() or prev[-1] in ")]"):
            value = -value
    return value


def _latex_to_plain(text: str) -> str:
    """Just enough LaTeX for answers like `\\boxed{\\frac{3}{4}}`; math-verify does more if present."""
    if "\\" not in text:
        return text
    try:  # optional extra (`pip install reftune[latex]`)
        from math_verify import parse  # type: ignore

        for item in parse(text):
            try:
                return format_number(float(item)) or text
            except (TypeError, ValueError):
                continue
    except Exception:  # not installed, or it could not parse: fall back to the plain rules
        pass
    text = _LATEX_FRAC_RE.sub(r" \1/\2 ", text)
    return re.sub(r"\\(?:boxed|text|mathrm)\s*|\\[,;!$%]|[{}]", " ", text).replace("\\", " ")


def normalize_number(text) -> str | None:
    """The canonical number in an answer text, or None if there is none.

    Rule: take the first non-empty line; if it contains "=", read the part after the last "="
    (so "5 + 3 = 8" gives 8, the result, not the first operand); otherwise (or if that part holds
    no number) read the first number-like token. Handled: "1,234", "$5", "€5", "£5", "45%" (-> 45),
    "-3.5", "- 5", "3/4" (-> 0.75), "5 1/2" (-> 5.5), "18 apples.", "18.0.", "<203>", "18.00",
    "1e3", `\\boxed{\\frac{3}{4}}`. Numbers written as words are not read.
    """
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return format_number(text)
    line = answer_line(text)
    if line is None:
        return None
    lines = [ln for ln in _latex_to_plain(line).splitlines() if ln.strip()]
    if not lines:
        return None
    line = lines[0]
    value = None
    if "=" in line:
        value = _first_number(line.rsplit("=", 1)[1])
    if value is None:
        value = _first_number(line)
    return None if value is None else format_number(value)


def parse_choice(text) -> str | None:
    """An option letter a-e (lowercase) from "(B)", "b )", "c.", "Answer: c", ..., else None."""
    line = answer_line(text) if text is not None else None
    # One space for each run of whitespace: the pattern's neighbouring \s* would otherwise try every
    # split of a long run (seconds for 250 spaces).
    m = _CHOICE_RE.match(" ".join(line.split())) if line else None
    return m.group("letter").lower() if m else None


def _to_float(text) -> float | None:
    norm = normalize_number(text)
    return None if norm is None else float(norm)


def option_value(text: str) -> float | None:
    """Numeric value of a multiple-choice option ("rs . 1,200" -> 1200, "28 / 55", "6 / π"),
    or None for options such as "none of these"."""
    if any(ch in text for ch in "π√("):
        return _eval_symbolic(text)
    return _to_float(text)


_BINOPS = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__,
           ast.Div: float.__truediv__, ast.Pow: float.__pow__}


def _eval_symbolic(text: str) -> float | None:
    """Options written with π, √ or brackets ("6 / π", "25 / √ π", "78 + ( 4 / 7 ) %"): a tiny
    arithmetic evaluator (units and % dropped)."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    expr = re.sub(r"[^0-9.+\-*/^()π√ ]", " ", text).replace("^", "**")
    expr = re.sub(r"√\s*(π|\d+(?:\.\d+)?)", r"sqrt(\1)", expr).replace("π", " pi ")
    expr = re.sub(r"(\d|\))\s+(?=[a-z(\d])", r"\1*", expr.strip())  # implicit products: "4 pi"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "pi":
            return math.pi
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "sqrt" and len(node.args) == 1:
            return math.sqrt(ev(node.args[0]))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported: {ast.dump(node)}")

    try:
        value = ev(tree.body)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None  # TypeError: a negative number to a fractional power is complex
    return value if isinstance(value, float) and math.isfinite(value) else None


# ---------------------------------------------------------------- comparison and voting keys

def is_correct(predicted, gold, answer_type: str, tol: float = TOLERANCE) -> bool:
    """number: |pred - gold| <= tol; choice: same letter (case-insensitive); None is never correct."""
    if predicted is None or gold is None:
        return False
    if answer_type == "choice":
        p, g = parse_choice(predicted), parse_choice(gold)
        return p is not None and p == g
    if answer_type != "number":
        raise ValueError(f"answer_type must be number or choice, got {answer_type!r}")
    p, g = _to_float(predicted), _to_float(gold)
    return p is not None and g is not None and abs(p - g) <= tol


def answer_key(answer, answer_type: str) -> str | None:
    """Key for majority voting: answers equal up to the tolerance share a key (17.99999 and 18 both
    give "18"); letters are lowercased. None for no usable answer."""
    if answer is None:
        return None
    if answer_type == "choice":
        return parse_choice(answer)
    value = _to_float(answer)
    if value is None:
        return None
    # Round to the tolerance grid (0.01): the paper's comparison counts these as one answer.
    return format_number(round(value, max(0, round(-math.log10(TOLERANCE)))))


# ---------------------------------------------------------------- the N-CoT answer line

def answer_segment(completion: str) -> str | None:
    """The text after the last answer marker, or None without one."""
    last = None
    completion = plain_text(completion)
    for last in _MARKER_RE.finditer(completion):
        pass
    return None if last is None else completion[last.end():]


def extract_nl(completion: str, answer_type: str) -> tuple[str | None, str]:
    segment = answer_segment(completion)
    if segment is None:
        return None, "no answer line"
    if answer_line(segment) is None and segment.strip():
        return None, f"answer line longer than {MAX_ANSWER_CHARS} characters"
    if answer_type == "choice":
        letter = parse_choice(segment)
        return letter, "" if letter else "answer is not an option letter"
    number = normalize_number(segment)
    return number, "" if number is not None else "answer is not a number"
