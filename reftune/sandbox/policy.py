"""Python-level policy of the sandbox: what a program may name, import and call.

Standard library only (sympy is touched only by `apis.harden_sympy`, after the zygote imported it)
and only relative imports of its siblings: the worker loads this folder as a package of its own,
never through reftune. The parent imports it for DEFAULT_MODULES and KEEP_ENV (no side effects).

A first filter, not the boundary (the OS layers are): it refuses the programs that name interpreter
internals, and hands out only an allow-listed API, so that no program string reaches an evaluator.
"""

import ast
import builtins
import operator
import sys
import types
import warnings

from .apis import API, LAZY_MODULES
from .pure import is_pure, unsafe_builtins

# Importable by programs. Stdlib ones are imported by the zygote at start (~50 ms); LAZY_MODULES
# (sympy: 0.3-1 s) by the zygote when a program that names them arrives, outside its timeout.
DEFAULT_MODULES = (
    "math", "cmath", "fractions", "decimal", "numbers", "statistics", "random", "itertools",
    "functools", "operator", "collections", "heapq", "bisect", "array", "copy", "string", "re",
    "datetime", "time", "enum", "typing", "abc", "textwrap", "sympy",
)  # fmt: skip
# A worker's whole environment (no tokens, HOME, PATH): thread caps for BLAS-backed libraries, fixed
# str hashing (set order, hence str() of results, is the same in every worker), no script dir on path.
KEEP_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0", "PYTHONSAFEPATH": "1"}  # fmt: skip
MAX_STR = 10_000  # longer string results -> "output too large"

# The attribute rule. Frames, code and tracebacks lead to real globals and builtins; AttributeError.obj
# hands out the object whose lookup failed (a real module, inside library code). Names starting with
# "_" are refused too (__class__, __subclasses__, __globals__, __self__, __dict__, random._os...)
# except protocol dunders, which only compute values, and namedtuple's API.
BLOCKED_ATTRS = frozenset(
    "gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await cr_origin ag_frame ag_code ag_await "
    "f_globals f_locals f_builtins f_back f_code f_trace tb_frame tb_next obj".split()
)
ALLOWED_UNDERSCORE = frozenset(
    "_asdict _replace _fields _make _field_defaults".split()
    + [f"__{n}__" for n in (
        "init new call post_init name qualname doc str repr format hash bool len iter next "
        "reversed contains getitem setitem delitem missing enter exit eq ne lt le gt ge neg pos abs "
        "invert int float complex index round trunc floor ceil").split()]
    + [f"__{p}{n}__" for p in ("", "r", "i") for n in (
        "add sub mul matmul truediv floordiv mod divmod pow lshift rshift and or xor").split()]
)  # fmt: skip
SAFE_BUILTINS = (
    "abs all any ascii bin bool bytearray bytes callable chr classmethod complex dict dir divmod "
    "enumerate filter float format frozenset hasattr hash hex id int isinstance issubclass iter len "
    "list map max min next object oct ord pow property range repr reversed round set slice sorted "
    "staticmethod str sum super tuple type zip memoryview NotImplemented Ellipsis __build_class__"
).split()
# Present as stubs that raise "forbidden: <name>()": the evaluators, I/O and introspection.
FORBIDDEN_BUILTINS = "eval exec compile open input breakpoint help exit quit globals locals vars".split()


class Forbidden(Exception):
    """A policy refusal, reported as "forbidden: <what>"."""


class ForbiddenImport(Forbidden, ImportError):  # so that `try: import numpy / except ImportError` works
    pass


class ForbiddenAttr(Forbidden, AttributeError):  # so that hasattr() says False
    pass


def attr_blocked(name):
    if not isinstance(name, str):
        return True
    return name in BLOCKED_ATTRS or name.startswith("_") and name not in ALLOWED_UNDERSCORE


def module_allowed(name, allowed):
    """`allowed`: the top-level modules this pool allows; a submodule needs its own API entry."""
    return name.partition(".")[0] in allowed and name in API


def check_tree(nodes, allowed):
    """Refuse, before anything runs, attribute access that leads to interpreter internals, and names
    outside an allowed module's API. `nodes`: all nodes of the program's tree (list(ast.walk(tree)))."""
    for node in nodes:
        kind, names = type(node), ()
        if kind is ast.Name or kind is ast.Constant or kind is ast.Load or kind is ast.Store:
            continue  # most nodes: nothing to check
        if kind is ast.Attribute:
            names = (node.attr,)
        elif kind is ast.MatchClass:  # `case C(__class__=x)` is a getattr too
            names = node.kwd_attrs
        elif kind is ast.ImportFrom:  # other imports fail at run time (catchable, as ImportError)
            if node.level:
                raise ForbiddenImport("relative import")
            known = API[node.module] if module_allowed(node.module or "", allowed) else None
            for alias in node.names:
                if known is not None and alias.name != "*" and alias.name not in known:
                    raise ForbiddenImport(f"from {node.module} import {alias.name}")
        for name in names:
            if attr_blocked(name):
                raise ForbiddenAttr(f"attribute .{name}")


# --------------------------------------------------------------------------------- module views


class ModuleView(types.ModuleType):
    """What `import m` gives a program: a fresh module holding only m's allow-listed names (values are
    the real functions, classes and constants; submodules are views too). Never the real module, so
    that nothing reached through it (its globals, `sys`, `import_module`) is a way out. Read-only, so
    that a program cannot change it for code it calls (each program runs in a fresh fork anyway)."""

    def __getattr__(self, name):  # only called for names the view does not hold
        raise ForbiddenAttr(f"{self.__name__}.{name}")

    def __setattr__(self, name, value):
        raise AttributeError("sandboxed modules are read-only")

    __delattr__ = __setattr__

    def __repr__(self):
        return f"<module {self.__name__!r} (sandboxed)>"


def make_view(module, overrides):
    """The view of a real, already imported module."""
    view = ModuleView(module.__name__)
    names = sorted(n for n in API[module.__name__] if hasattr(module, n))
    members = {n: overrides.get((module.__name__, n), getattr(module, n)) for n in names}
    assert not any(isinstance(v, types.ModuleType) for v in members.values()), "API lists a module"
    members["__all__"] = names  # what `from m import *` binds
    vars(view).update(members)  # ModuleType.__dict__ is writable through vars(), not setattr
    return view


def add_submodule(parent, name, view):
    vars(parent)[name] = view
    vars(parent)["__all__"] = sorted(set(vars(parent)["__all__"]) | {name})


def _name_checked(fn, dotted=False):
    """fn (getattr, setattr, delattr, operator.attrgetter/methodcaller) under the attribute rule."""

    def checked(*args, **kwargs):
        names = args if dotted else args[1:2] if fn in (getattr, setattr, delattr) else args[:1]
        if any(attr_blocked(part) for n in names for part in (str(n).split(".") if dotted else [n])):
            raise ForbiddenAttr(f"{fn.__name__}{tuple(names)}")
        return fn(*args, **kwargs)

    return checked


OVERRIDES = {
    ("operator", "attrgetter"): _name_checked(operator.attrgetter, dotted=True),
    ("operator", "methodcaller"): _name_checked(operator.methodcaller),
}


# ----------------------------------------------------------------------------- builtins, import


def forbidden_stub(name):
    def stub(*args, **kwargs):
        raise Forbidden(f"{name}()")

    stub.__name__ = stub.__qualname__ = name
    return stub


def _print(*args, **kwargs):
    """print() of programs: output is discarded (only solution()'s return value counts)."""


class Policy:
    """The allowed modules' views and the builtins programs get, built once by the zygote."""

    def __init__(self, allowed):
        self.allowed = frozenset(allowed)
        self.views = {}  # module name -> ModuleView
        self.lazy_ok = frozenset()  # lazy modules the running program named in its text
        b = {name: getattr(builtins, name) for name in SAFE_BUILTINS}
        b.update({k: v for k, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)})
        b.update({name: forbidden_stub(name) for name in FORBIDDEN_BUILTINS})
        b.update({f.__name__: _name_checked(f) for f in (getattr, setattr, delattr)})
        b.update(__import__=self.guarded_import, print=_print)
        self.builtins = b
        self.unsafe_for_pure = unsafe_builtins(b)

    def load(self, name):
        """Import an allowed module (zygote only) and build the views of it and its API submodules."""
        if name in self.views or not module_allowed(name, self.allowed):
            return
        module = __import__(name)
        for part in name.split(".")[1:]:
            module = getattr(module, part)
        self.views[name] = make_view(module, OVERRIDES)
        parent, _, child = name.rpartition(".")
        if parent in self.views:
            add_submodule(self.views[parent], child, self.views[name])
        for sub in sorted(m for m in API if m.startswith(name + ".") and m.count(".") == name.count(".") + 1):
            try:
                __import__(sub)
            except ImportError:
                continue
            self.load(sub)

    def guarded_import(self, name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0] if isinstance(name, str) else None
        if level or name not in self.views or top in LAZY_MODULES and top not in self.lazy_ok:
            raise ForbiddenImport(f"import {name}")
        return self.views[name] if fromlist else self.views[top]


# ------------------------------------------------------------------------------ running a program


def describe(exc):
    if isinstance(exc, MemoryError):
        return "memory"
    try:
        text = str(exc) if isinstance(exc, Forbidden) else f"{type(exc).__name__}: {exc}"
    except BaseException:  # a program's exception class with a broken __str__
        text = type(exc).__name__
    return f"{'forbidden' if isinstance(exc, Forbidden) else 'error'}: {text[:300]}"


def convert(v):
    """solution()'s return value -> (int | float | str | None, reason). May run program code."""
    if v is None:
        return None, ""
    if isinstance(v, int):  # bool, IntEnum, ... -> int
        v = int(v)
        return (v, "") if v.bit_length() <= 13_000 else (None, "output too large")  # JSON: <= 4300 digits
    if isinstance(v, float):
        return float(v), ""
    mod = getattr(type(v), "__module__", "") or ""
    numeric = mod in ("fractions", "decimal") or mod.startswith(("numpy", "sympy")) and getattr(v, "is_number", True)
    if numeric and not isinstance(v, str):
        try:
            return float(v), ""  # Fraction, Decimal, sympy numbers
        except (TypeError, ValueError, OverflowError):
            pass  # complex, symbolic: the text
    s = v if isinstance(v, str) else str(v)
    return (str(s), "") if len(s) <= MAX_STR else (None, "output too large")


def parse_quietly(source: str, filename: str = "<program>") -> ast.Module:
    """`ast.parse` without the warnings a model-written program can raise (SyntaxWarning "invalid
    decimal literal" for `1if`, DeprecationWarning for an escape such as "\\d"): they are the
    program's, and would print on the trainer's terminal. The grader's clean-up uses it too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source, filename, "exec")


def prepare(policy, program):
    """Parse, check and compile a program (in the zygote: parsing runs no program code, and the child
    then starts from a code object). Returns (code, reason, pure); code is None when refused."""
    try:
        tree = parse_quietly(program)
        nodes = list(ast.walk(tree))
        check_tree(nodes, policy.allowed)
        pure = is_pure(nodes, policy.unsafe_for_pure)
        del nodes
        return builtins.compile(tree, "<program>", "exec", dont_inherit=True), "", pure
    except BaseException as exc:  # SyntaxError, Forbidden, RecursionError, MemoryError on absurd input
        return None, describe(exc), False


def run(policy, code, program, entry):
    """Define and call one prepared program (in a fresh child); returns (value, reason)."""
    # Lazy modules (sympy) only for programs that name them, so that whether the zygote happened to
    # import one for an earlier program never changes what this one can do.
    policy.lazy_ok = frozenset(m for m in LAZY_MODULES if m in program)
    try:
        namespace = {"__builtins__": policy.builtins, "__name__": "__sandbox__"}
        exec(code, namespace)  # one namespace: helpers defined next to solution() are visible
        fn = namespace.get(entry)
        return convert(fn()) if callable(fn) else (None, f"no {entry}()")
    except BaseException as exc:
        return None, describe(exc)


def run_pure(policy, code, entry):
    """run() for a pure program in the shared child; also says whether to recompute it in a fresh
    fork: after a MemoryError (the shared heap may be fuller than a fresh one), or when the text
    shows an object address (it would depend on what ran before)."""
    namespace = {"__builtins__": policy.builtins, "__name__": "__sandbox__"}
    try:
        exec(code, namespace)
        fn = namespace.get(entry)
        value, reason = convert(fn()) if callable(fn) else (None, f"no {entry}()")
    except MemoryError:
        return None, "memory", True
    except BaseException as exc:
        value, reason = None, describe(exc)
    finally:
        namespace.clear()  # its functions and globals form cycles: free them now, not at the next gc
    return value, reason, reason == "memory" or " at 0x" in reason or isinstance(value, str) and " at 0x" in value


def run_unchecked(program, entry):
    """For tests of the OS layers only: real builtins and imports, what an escaped program has."""
    namespace = {"__name__": "__sandbox__"}
    try:
        exec(program, namespace)
        return convert(namespace[entry]())
    except BaseException as exc:
        return None, describe(exc)


def reset_stdio():
    """Programs' sys.stdout/stderr discard (a print from library code cannot fill a pipe)."""
    sys.stdout = sys.stderr = sys.stdin = _Null()


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass

    def read(self, *args):
        return ""

    readline = read
