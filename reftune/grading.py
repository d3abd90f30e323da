"""Answer extraction and grading: the paper's reward, with fewer ways to fool it.

- N-CoT (`nl`): the answer is the text after the LAST "Therefore, the answer is" (colon optional),
  read as a number or an option letter.
- P-CoT (`program`): the program is cleaned (junk after the code dropped, blank lines inside the
  function and top-level helpers kept) and run in `reftune.sandbox`; the answer is `solution()`.
- Numbers are correct when |pred - gold| <= 1e-2 (the paper's rule); letters compare exactly.

The RL reward is 1 / 0.1 / 0 for correct / answered but wrong / no usable answer, so
`Graded.answer` is None whenever the answer is unusable, with `Graded.reason` saying why.
No torch here: data loading, evaluation and the sandbox workers import this module.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Sequence

from reftune.tasks.base import Example, Graded

TOLERANCE = 1e-2
"""The paper's tolerance for numeric answers."""
OPTION_REL_TOL = 1e-3
"""MathQA options are printed rounded ("25.7 miles"): a computed value also matches an option
within this relative error (besides the absolute TOLERANCE)."""
DECIMALS = 6
"""Canonical number strings are rounded to this many decimals (17.999999999 -> "18")."""
LETTERS = "abcde"

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


# ---------------------------------------------------------------- numbers and letters

def format_number(x: float) -> str | None:
    """Canonical text of a number: rounded to DECIMALS, no trailing zeros ("18", "0.75", "-3.5")."""
    if isinstance(x, bool) or not math.isfinite(x):
        return None
    text = f"{round(float(x), DECIMALS):.{DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _first_number(text: str) -> float | None:
    """Value of the first number-like token in `text` (sign, currency, fraction, mixed number)."""
    m = _CORE_RE.search(text)
    if m is None:
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
        return format_number(float(text))
    lines = [ln for ln in _latex_to_plain(str(text)).splitlines() if ln.strip()]
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
    lines = [ln for ln in str(text).splitlines() if ln.strip()] if text is not None else []
    m = _CHOICE_RE.match(lines[0]) if lines else None
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
    expr = re.sub(r"[^0-9.+\-*/^()π√ ]", " ", text).replace("^", "**")
    expr = re.sub(r"√\s*(π|\d+(?:\.\d+)?)", r"sqrt(\1)", expr).replace("π", " pi ")
    expr = re.sub(r"(\d|\))\s+(?=[a-z(\d])", r"\1*", expr.strip())  # implicit products: "4 pi"
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
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
        return ev(tree.body)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


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


# ---------------------------------------------------------------- programs

_CODE_START_RE = re.compile(r"^(?:def |async def |class |import |from |@|[A-Za-z_]\w*\s*=[^=])")
_KEEP_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom,
               ast.Assign, ast.AnnAssign)


def clean_program(text: str) -> str:
    """The runnable part of a generated program.

    The release kept lines only up to the first blank line (cutting functions with a blank line
    inside) and hid top-level helpers from `solution`. Here: drop Markdown fences and any prose
    before the code; cut at the first line Python cannot parse (the model started writing
    something else, or was truncated); then keep only top-level definitions, imports and
    assignments, in their original text (blank lines and comments inside functions stay), up to a
    second `def solution` (the model started a new problem). Calls such as `print(solution())` are
    dropped: the sandbox calls `solution()` itself. `import math` / `import sympy` is added when
    `math.` / `sympy.` is used without it (the release put both in the program's globals).
    """
    if "```" in text:
        blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", text, re.DOTALL)
        text = next((b for b in blocks if "def " in b), blocks[0] if blocks else text.replace("```", ""))
    all_lines = text.splitlines()
    # Prose can look like code ("from the table, ..."): try the first few code-like lines as the
    # start until one yields a `solution`.
    starts = [i for i, ln in enumerate(all_lines) if _CODE_START_RE.match(ln)][:8]
    tree, lines = None, []
    for start in starts:
        parsed = _parse_prefix(all_lines[start:])
        if parsed[0] is not None and (tree is None or _defines_solution(parsed[0])):
            tree, lines = parsed
            if _defines_solution(tree):
                break
    if tree is None:
        return ""
    kept: list[str] = []
    seen_solution = False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "solution":
            if seen_solution:
                break
            seen_solution = True
        if not isinstance(node, _KEEP_NODES):
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        kept.append("\n".join(lines[first - 1: node.end_lineno]))
    program = "\n\n".join(kept)
    for module in ("sympy", "math"):  # the release put both in the program's globals
        if re.search(rf"\b{module}\.", program) and not re.search(rf"^\s*import {module}\b", program, re.M):
            program = f"import {module}\n" + program
    return program


def _parse_prefix(lines: list[str]) -> tuple[ast.Module | None, list[str]]:
    """Parse the longest prefix of `lines` up to the first line Python cannot parse."""
    while lines:
        try:
            return ast.parse("\n".join(lines)), lines
        except SyntaxError as e:  # keep what comes before the first broken line
            lines = lines[: min((e.lineno or len(lines)) - 1, len(lines) - 1)]
        except (ValueError, RecursionError, MemoryError):  # null bytes, absurd nesting
            break
    return None, []


def _defines_solution(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "solution" for n in tree.body)


# Appended to instrumented programs (the sandbox refuses `locals()`, so each return gets getters
# for solution's local names; an unbound one raises NameError and is skipped). Only finite numbers
# count as computed: containers such as an options list do not. The value is converted like the
# sandbox converts return values, so the packed text stays readable by ast.literal_eval.
_PACK_HELPER = '''
def _reftune_pack(value, getters):
    if isinstance(value, bool) or value is not None and not isinstance(value, (str, int, float)):
        try:
            value = int(value) if isinstance(value, bool) else float(value)
        except Exception:
            value = str(value)
    if isinstance(value, float) and not abs(value) < 1e308:
        value = str(value)
    nums = []
    for get in getters:
        try:
            v = get()
        except NameError:
            continue
        if v is None or isinstance(v, (str, bytes, bool)):
            continue
        try:
            v = float(v)
        except Exception:
            continue
        if abs(v) < 1e308:
            nums.append(v)
    return repr((value, nums))
'''

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)


def _local_names(fn: ast.FunctionDef) -> list[str]:
    """Names bound in `fn`'s own scope (arguments, assignment/loop/with targets), in order."""
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    todo = list(fn.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in names:
            names.append(node.id)
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))
    return names


class _PackReturns(ast.NodeTransformer):
    """Rewrite `return X` in `solution` (not in nested functions) into
    `return _reftune_pack(X, [lambda: a, lambda: b, ...])` over solution's local names."""

    def __init__(self, names: list[str]):
        self.names = names

    def visit_FunctionDef(self, node):
        return node  # nested functions keep their own returns

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_FunctionDef

    def visit_Return(self, node):
        no_args = ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                                kwarg=None, defaults=[])
        getters = ast.List([ast.Lambda(no_args, ast.Name(n, ast.Load())) for n in self.names], ast.Load())
        call = ast.Call(ast.Name("_reftune_pack", ast.Load()), [node.value or ast.Constant(None), getters], [])
        return ast.copy_location(ast.Return(call), node)


def _instrument(program: str) -> str | None:
    """The program with `solution`'s returns packed with its numeric locals (see _PackReturns)."""
    try:
        tree = ast.parse(program)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "solution":
                packer = _PackReturns(_local_names(node))
                node.body = [packer.visit(stmt) for stmt in node.body]
        return ast.unparse(ast.fix_missing_locations(tree)) + "\n" + _PACK_HELPER
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _run(programs: list[str], timeout: float, memory_mb: int) -> list[tuple[object, str]]:
    """(value, reason) for each program; empty programs are not sent to the sandbox."""
    from reftune import sandbox  # imported late: only program grading needs it

    out: list[tuple[object, str]] = [(None, "no program found")] * len(programs)
    todo = [i for i, p in enumerate(programs) if p.strip()]
    if todo:
        results = sandbox.run_programs([programs[i] for i in todo], timeout=timeout, memory_mb=memory_mb)
        for i, r in zip(todo, results):
            out[i] = (r.value, r.reason) if r.ok else (None, r.reason or "error")
    return out


def _value_to_answer(value, reason: str) -> tuple[str | None, str]:
    """A program's returned value as a canonical number string or a letter, with a reason."""
    if value is None:
        return None, reason or "solution() returned None"
    if isinstance(value, bool):
        return None, "solution() returned a bool"
    if isinstance(value, (int, float)):
        text = format_number(float(value))
        return text, "" if text is not None else "not a finite number"
    if isinstance(value, str):
        stripped = value.strip()
        if len(stripped) <= 4 and (letter := parse_choice(stripped)):
            return letter, ""
        text = normalize_number(stripped)
        return text, "" if text is not None else "returned text is not a number"
    return None, f"unsupported return type {type(value).__name__}"


# ---------------------------------------------------------------- extraction

def _answer_segment(completion: str) -> str | None:
    """The text after the last answer marker, or None without one."""
    last = None
    for last in _MARKER_RE.finditer(completion):
        pass
    return None if last is None else completion[last.end():]


def _extract_nl(completion: str, answer_type: str) -> tuple[str | None, str]:
    segment = _answer_segment(completion)
    if segment is None:
        return None, "no answer line"
    if answer_type == "choice":
        letter = parse_choice(segment)
        return letter, "" if letter else "answer is not an option letter"
    number = normalize_number(segment)
    return number, "" if number is not None else "answer is not a number"


def extract_answer(completion: str, style: str) -> str | None:
    """The normalised answer of one completion. style: nl | program | choice (see module doc).
    `choice` reads a letter after the answer marker, or from the text itself ("Answer: c")."""
    return extract_answers([completion], style)[0]


def extract_answers(completions: list[str], style: str, timeout: float = 2.0,
                    memory_mb: int = 512) -> list[str | None]:
    """Batch `extract_answer`; programs run in one sandbox call."""
    if style == "nl":
        return [_extract_nl(c, "number")[0] for c in completions]
    if style == "choice":
        return [parse_choice(seg if (seg := _answer_segment(c)) is not None else c) for c in completions]
    if style == "program":
        runs = _run([clean_program(c) for c in completions], timeout, memory_mb)
        return [_value_to_answer(v, r)[0] for v, r in runs]
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
    answer, why = _value_to_answer(value, reason)
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
                choice_guard: bool = True, timeout: float = 2.0, memory_mb: int = 512) -> list[Graded]:
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
            answer, why = _extract_nl(cot, answer_type)
            if answer is not None and answer_type == "choice" and choice_guard \
                    and ex.options is not None and answer not in ex.options:
                answer, why = None, f"letter {answer!r} is not an option"
            graded.append(Graded(answer, is_correct(answer, ex.answer, answer_type), why))
        return graded
    if style != "program":
        raise ValueError(f"style must be nl or program, got {style!r}")
    programs = [clean_program(c) for c in cots]
    instrument = answer_type == "choice" and choice_guard
    if instrument:
        programs = [(_instrument(p) or "") if p else "" for p in programs]
    for (value, reason), ex in zip(_run(programs, timeout, memory_mb), examples):
        if answer_type == "choice":
            answer, why = _grade_program_choice(value, reason, ex, choice_guard)
        else:
            answer, why = _value_to_answer(value, reason)
            if answer is not None and answer in LETTERS:
                answer, why = None, "a letter is not a number"
        graded.append(Graded(answer, is_correct(answer, ex.answer, answer_type), why))
    return graded
