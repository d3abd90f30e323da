"""P-CoT programs: cleaning generated text into a runnable program, instrumenting `solution()`'s
returns (for the multiple-choice guard), running them in `reftune.sandbox`, and reading the value.

Nothing here raises on model output: a completion longer than MAX_COMPLETION_CHARS is no program,
text Python cannot parse (nesting, null bytes, huge literals) is cut or dropped, and a returned
value is read under the bounds of `answers.py` (an int beyond float range is no answer).
"""

from __future__ import annotations

import ast
import re

from reftune.rewards.answers import (MAX_ANSWER_CHARS, exact_number, format_number, normalize_number, parse_choice,
                                     plain_text)
from reftune.sandbox.rules import parse_quietly

MAX_COMPLETION_CHARS = 1 << 20
"""A completion longer than this is not read as a program (the sandbox refuses such programs too)."""

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
    text = plain_text(text)
    if len(text) > MAX_COMPLETION_CHARS:
        return ""
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
        # [ \t]*, not \s*: with re.M, \s* would rescan every following blank line from each line start
        if re.search(rf"\b{module}\.", program) and not re.search(rf"^[ \t]*import {module}\b", program, re.M):
            program = f"import {module}\n" + program
    return program


def _parse_prefix(lines: list[str]) -> tuple[ast.Module | None, list[str]]:
    """Parse the longest prefix of `lines` up to the first line Python cannot parse."""
    while lines:
        try:
            return parse_quietly("\n".join(lines)), lines
        except SyntaxError as e:  # keep what comes before the first broken line
            lines = lines[: min((e.lineno or len(lines)) - 1, len(lines) - 1)]
        except Exception:  # null bytes, absurd nesting, literals Python will not convert
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


def instrument(program: str) -> str | None:
    """The program with `solution`'s returns packed with its numeric locals (see _PackReturns)."""
    try:
        tree = parse_quietly(program)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "solution":
                packer = _PackReturns(_local_names(node))
                node.body = [packer.visit(stmt) for stmt in node.body]
        return ast.unparse(ast.fix_missing_locations(tree)) + "\n" + _PACK_HELPER
    except Exception:  # SyntaxError, RecursionError, MemoryError, what unparse cannot write back
        return None


def program_values(programs: list[str], timeout: float, memory_mb: int) -> list[tuple[object, str]]:
    """(value, reason) for each program; empty programs are not sent to the sandbox."""
    from reftune import sandbox  # imported late: only program grading needs it

    out: list[tuple[object, str]] = [(None, "no program found")] * len(programs)
    todo = [i for i, p in enumerate(programs) if p.strip()]
    if todo:
        results = sandbox.run_programs([programs[i] for i in todo], timeout=timeout, memory_mb=memory_mb)
        for i, r in zip(todo, results):
            out[i] = (r.value, r.reason) if r.ok else (None, r.reason or "error")
    return out


def value_to_answer(value, reason: str) -> tuple[str | None, str]:
    """A program's returned value as a canonical number string or a letter, with a reason."""
    kind = type(value)  # (type(): a value's __class__ can lie; the sandbox only returns exact types)
    if value is None:
        return None, plain_text(reason) or "solution() returned None"
    if issubclass(kind, bool):
        return None, "solution() returned a bool"
    if issubclass(kind, (int, float)):
        number = exact_number(value)
        text = format_number(number) if number is not None else None
        return text, "" if text is not None else "not a finite number" if number is not None else "number out of range"
    if issubclass(kind, str):
        stripped = plain_text(value).strip()
        if len(stripped) > MAX_ANSWER_CHARS:
            return None, f"returned text longer than {MAX_ANSWER_CHARS} characters"
        if len(stripped) <= 4 and (letter := parse_choice(stripped)):
            return letter, ""
        text = normalize_number(stripped)
        return text, "" if text is not None else "returned text is not a number"
    return None, f"unsupported return type {kind.__name__}"
