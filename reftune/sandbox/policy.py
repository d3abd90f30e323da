"""Python-level policy of the sandbox: what a program may import and call, and how it is run.

Standard library only (sympy is touched only by `harden.py`, after the zygote imported it) and only
relative imports of its siblings (`errors`, `apis`, `rules`, `pure`): the worker loads this folder as
a package of its own, never through reftune. The parent imports it for DEFAULT_MODULES and KEEP_ENV
(no side effects).

A first filter, not the boundary (the OS layers are): `rules.py` refuses the programs that name
interpreter internals; here programs get only an allow-listed API and builtins, each program its
own copy of them, so that no program string reaches an evaluator and no program changes what a
later one sees. In the children an audit hook (`install_compile_guard`) refuses any compile of text
in every child, wherever in the libraries it comes from.
"""

import ast
import builtins
import collections
import operator
import sys
import types

from .apis import API, LAZY_MODULES
from .errors import Forbidden, ForbiddenAttr, ForbiddenImport, forbidden_stub
from .pure import PURE_MODULES, is_pure, unsafe_builtins
from .rules import (check_tree, compile_quietly, dynamic_attr_blocked, exact_name, may_name_dunders, module_allowed,
                    parse_quietly)

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
MAX_INT_BITS = 13_000  # larger int results -> "output too large" (JSON writes at most 4,300 digits)

SAFE_BUILTINS = (
    "abs all any ascii bin bool bytearray bytes callable chr classmethod complex dict dir divmod "
    "enumerate filter float format frozenset hash hex id int isinstance issubclass iter len "
    "list map max min next object oct ord pow property range repr reversed round set slice sorted "
    "staticmethod str sum super tuple type zip memoryview NotImplemented Ellipsis __build_class__"
).split()
# Present as stubs that raise "forbidden: <name>()": the evaluators, I/O and introspection.
FORBIDDEN_BUILTINS = "eval exec compile open input breakpoint help exit quit globals locals vars".split()


# --------------------------------------------------------------------------------- module views


class ModuleView(types.ModuleType):
    """What `import m` gives a program: a fresh module holding only m's allow-listed names (values are
    the real functions, classes and constants; submodules are views too). Never the real module, so
    that nothing reached through it (its globals, `sys`, `import_module`) is a way out. Read-only, so
    that a program cannot change it for code it calls."""

    def __getattr__(self, name):  # only called for names the view does not hold
        raise ForbiddenAttr(f"{self.__name__}.{exact_name(name)}")

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


# ---------------------------------------------------- functions that take attribute names at run time


def allowed_name(name, what, dotted=False):
    """The exact str of an attribute name a program passed at run time, or ForbiddenAttr."""
    exact = exact_name(name)
    if exact is None or any(dynamic_attr_blocked(p) for p in (exact.split(".") if dotted else [exact])):
        raise ForbiddenAttr(f"{what}({exact if exact is not None else type(name).__name__!r})")
    return exact


def checked_getattr(obj, name, *default):
    return getattr(obj, allowed_name(name, "getattr"), *default)


def checked_setattr(obj, name, value):
    return setattr(obj, allowed_name(name, "setattr"), value)


def checked_delattr(obj, name):
    return delattr(obj, allowed_name(name, "delattr"))


def checked_hasattr(obj, name):
    exact = exact_name(name)
    if exact is None:
        raise TypeError("hasattr(): attribute name must be string")
    return not dynamic_attr_blocked(exact) and hasattr(obj, exact)


def checked_attrgetter(*names):
    return operator.attrgetter(*[allowed_name(n, "attrgetter", dotted=True) for n in names])


def checked_methodcaller(name, /, *args, **kwargs):
    return operator.methodcaller(allowed_name(name, "methodcaller"), *args, **kwargs)


OVERRIDES = {("operator", "attrgetter"): checked_attrgetter, ("operator", "methodcaller"): checked_methodcaller}
for _fn in (checked_getattr, checked_setattr, checked_delattr, checked_hasattr, checked_attrgetter,
            checked_methodcaller):  # what programs see: the builtin's name
    _fn.__name__ = _fn.__qualname__ = _fn.__name__.removeprefix("checked_")


# ----------------------------------------------------------------------------- builtins, import


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
        b.update(getattr=checked_getattr, setattr=checked_setattr, delattr=checked_delattr, hasattr=checked_hasattr)
        b.update(__import__=self.guarded_import, print=_print)
        self.builtins = b  # the master copy: each program gets a dict(...) of it
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
        name = exact_name(name)
        top = name.partition(".")[0] if name is not None else None
        if level or name not in self.views or top in LAZY_MODULES and top not in self.lazy_ok:
            raise ForbiddenImport(f"import {name}")
        return self.views[name] if fromlist else self.views[top]

    def snapshot(self):
        """What every pure program of a shared child reaches besides its own copy of the builtins (the
        math and cmath views, the import table): compared after each one, so that a change no rule
        foresaw ends the shared child. (The master builtins are no program's to see.)"""
        pure_views = [tuple(vars(self.views[m]).items()) for m in PURE_MODULES if m in self.views]
        return tuple(self.views.items()), pure_views, self.lazy_ok


# ---------------------------------------------------------------------- the children's audit hook


def install_compile_guard():
    """An audit hook (it cannot be removed) that refuses compile() of text -- eval, exec, compile,
    typing's forward references, anything in a library that generates code -- and the creation of
    code objects. Installed in each child before program code runs (never where programs get the
    real builtins, `_os_layers_only`). Trusted callers compile only text or trees of their own:
    `rules.compile_quietly` (the program's checked tree), ast.parse (no code object results),
    namedtuple (its field names are checked identifiers), the import system (files of the Python
    install) and sympy's monomial code generator (text made from a number of generators)."""
    getframe = sys._getframe
    direct = {ast.parse.__code__, collections.namedtuple.__code__, compile_quietly.__code__}
    via = {}  # code of the frame that calls compile -> check of that frame
    importer = sys.modules.get("_frozen_importlib")
    loader = getattr(sys.modules.get("_frozen_importlib_external"), "SourceLoader", None)
    if importer is not None and loader is not None:
        source_to_code = loader.source_to_code.__code__
        via[importer._call_with_frames_removed.__code__] = lambda f: f.f_back.f_code is source_to_code
    monomials = sys.modules.get("sympy.polys.monomials")
    if monomials is not None:
        ops = monomials.MonomialOps
        via[ops._build.__code__] = lambda f: type(f.f_locals.get("self")) is ops and \
            f.f_back.f_code.co_filename == monomials.__file__  # fmt: skip

    def hook(event, args):
        if event == "compile":
            caller = getframe(1)
            check = via.get(caller.f_code)
            if caller.f_code in direct or check is not None and check(caller):
                return
            raise Forbidden("compile()")
        if event == "code.__new__":
            raise Forbidden("code objects")

    sys.addaudithook(hook)


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
        return (v, "") if v.bit_length() <= MAX_INT_BITS else (None, "output too large")
    if isinstance(v, float):
        return float(v), ""
    mod = getattr(type(v), "__module__", "") or ""
    numeric = mod in ("fractions", "decimal") or mod.startswith(("numpy", "sympy")) and getattr(v, "is_number", True)
    if numeric and not isinstance(v, str):
        try:
            return float(v), ""  # Fraction, Decimal, sympy numbers
        except (TypeError, ValueError, OverflowError):
            pass  # complex, symbolic: the text
    s = exact_name(v if issubclass(type(v), str) else str(v))  # str() may return a lying subclass
    return (s, "") if s is not None and len(s) <= MAX_STR else (None, "output too large")


def prepare(policy, program):
    """Parse, check and compile a program (in the child that runs it: parsing runs no program code,
    and its time is the program's). Returns (code, reason, pure); code is None when refused."""
    try:
        tree = parse_quietly(program)
        nodes = list(ast.walk(tree))
        dunders = may_name_dunders(program)
        check_tree(nodes, policy.allowed, dunders)
        pure = is_pure(nodes, policy.unsafe_for_pure, dunders)
        del nodes
        return compile_quietly(tree), "", pure
    except BaseException as exc:  # SyntaxError, Forbidden, RecursionError, MemoryError on absurd input
        return None, describe(exc), False


def _call(code, entry, namespace, builtins):
    """Define the program in `namespace` with `builtins` and call `entry`; returns what convert()
    makes of the value."""
    namespace.update(__builtins__=builtins, __name__="__sandbox__")
    exec(code, namespace)  # one namespace: helpers defined next to solution() are visible
    fn = namespace.get(entry)
    return convert(fn()) if callable(fn) else (None, f"no {entry}()")


def run(policy, code, program, entry):
    """Call one prepared program (in a fresh child); returns (value, reason)."""
    # Lazy modules (sympy) only for programs that name them, so that whether the zygote happened to
    # import one for an earlier program never changes what this one can do.
    policy.lazy_ok = frozenset(m for m in LAZY_MODULES if m in program)
    try:
        # The master builtins: this child is the program's alone and exits after it (a copy would
        # touch every builtin object, and copy their pages from the zygote: ~0.2 ms a program).
        return _call(code, entry, {}, policy.builtins)
    except BaseException as exc:
        return None, describe(exc)


def run_pure(policy, code, entry):
    """run() for a pure program in the shared child; also says whether to recompute it in a fresh
    fork: after a MemoryError (the shared heap may be fuller than a fresh one), or when the text
    shows an object address (it would depend on what ran before)."""
    namespace = {}
    try:
        value, reason = _call(code, entry, namespace, dict(policy.builtins))  # a copy of its own
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
