"""Which programs may share a process: plain computations that can reach nothing that outlives them.

Standard library only; imports `apis` and `rules` of its siblings. A program is *pure* when its
syntax tree uses only the node types of _NODES (no class, lambda, decorator, annotation, yield,
with, match, set, global state of any kind) and every value it can name is builtin data: its own
variables, a few builtin functions and types, math and cmath, and its own functions -- which it may
only call, never use as values. Attributes are either allow-listed math/cmath names or calls of
allow-listed methods of builtin data (``xs.append``, ``s.split``, ``d.items``...). Such a program
can only build ints, floats, strings, lists, tuples, dicts and ranges, call functions and
raise/catch exceptions: it cannot reach a module's or class's state, decimal or random state, files,
threads or `__del__` -- nothing survives it. Its results depend on no allocator state either: no
value it can observe has an address in its repr or hash (functions, iterators, generators and bound
methods are never values; sets, whose order follows hashes, are not allowed; id/hash are not
builtins here). No name of a pure program starts with ``__`` (``global __builtins__`` would rebind
the namespace's own). The zygote runs pure programs one after another in one pre-forked, fully
locked-down child (saving a fork per program); anything else runs in a fresh fork of its own, and so
does a pure program that ran out of memory or crashed there.
"""

import ast

from .apis import API
from .rules import NAMING_KINDS, names_of

# Builtins a pure program may name (as values and calls), besides the exception classes; print only
# as a call (it is a no-op).
PURE_BUILTINS = frozenset(
    "abs all any bool complex dict divmod float int len list max min pow range round sorted str sum "
    "tuple isinstance chr ord bin hex oct".split()
)
CALL_ONLY_BUILTINS = frozenset({"print"})
# Builtins that return iterators (their repr shows an address): only where they are consumed.
ITERATORS = frozenset("enumerate zip reversed map filter".split())
CONSUMERS = frozenset("sum min max any all list tuple dict sorted".split()) | ITERATORS  # and str.join
PURE_MODULES = ("math", "cmath")  # functions of their arguments only
# Methods of builtin data that only compute, or change that (the program's own) object.
METHODS = frozenset("""
    append extend insert pop remove index count sort reverse copy clear get keys values items update
    setdefault popitem split rsplit join strip lstrip rstrip replace upper lower title capitalize
    startswith endswith find rfind isdigit isalpha isnumeric isdecimal isalnum isspace isupper islower
    zfill ljust rjust center splitlines partition rpartition casefold swapcase removeprefix removesuffix
    is_integer as_integer_ratio bit_length conjugate""".split())  # fmt: skip
_NODES = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.Assign, ast.AugAssign, ast.For,
    ast.While, ast.If, ast.Break, ast.Continue, ast.Pass, ast.Expr, ast.Try, ast.ExceptHandler, ast.Raise,
    ast.Assert, ast.Delete, ast.Global, ast.Nonlocal, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare,
    ast.IfExp, ast.Call, ast.keyword, ast.Constant, ast.Name, ast.Tuple, ast.List, ast.Dict, ast.ListComp,
    ast.DictComp, ast.comprehension, ast.GeneratorExp, ast.Subscript, ast.Slice, ast.Starred,
    ast.NamedExpr, ast.JoinedStr, ast.FormattedValue, ast.Import, ast.ImportFrom, ast.alias, ast.Attribute,
    ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context,
)  # fmt: skip
# The concrete node classes: a set lookup per node instead of isinstance() against abstract bases.
_ALLOWED_TYPES = frozenset(
    cls for cls in vars(ast).values() if isinstance(cls, type) and issubclass(cls, _NODES) and cls not in _NODES[-5:]
)
_CONSTANT_TYPES = (int, float, complex, str, bytes, type(None))


def unsafe_builtins(builtins):
    """The names of a builtins dict that a pure program may not use (every exception class is fine)."""
    exceptions = {n for n, v in builtins.items() if isinstance(v, type) and issubclass(v, BaseException)}
    return frozenset(builtins) - PURE_BUILTINS - CALL_ONLY_BUILTINS - ITERATORS - exceptions


class _Scan:
    """What one pass over a program's nodes found (see `_scan`)."""

    def __init__(self):
        self.functions, self.data, self.modules, self.imported = set(), set(), {}, set()  # modules: name -> module
        self.called, self.consumed = set(), set()  # ids of call targets; of call arguments and loop iterables
        self.loads, self.attributes, self.generators, self.calls = [], [], [], []


def is_pure(nodes, unsafe, dunders=True):
    """True if the program (the nodes of its ast.Module, e.g. list(ast.walk(tree))) is pure in the
    sense of this module's docstring. `unsafe`: builtin names it may not use (see unsafe_builtins);
    a name that is neither defined nor a builtin is fine (it raises NameError). `dunders`: False
    when the text names nothing starting with "__" (rules.may_name_dunders), to skip that check."""
    scan = _scan(nodes, dunders)
    return scan is not None and _names_allowed(scan, unsafe)


def _scan(nodes, dunders):
    """One pass: None at the first node no pure program has, else what it names and how."""
    s = _Scan()
    for node in nodes:
        kind = type(node)
        if kind is ast.Name:
            if dunders and node.id.startswith("__"):
                return None  # __builtins__, __name__...: the namespace's own, never a program's data
            if type(node.ctx) is ast.Load:
                s.loads.append(node)
            else:
                s.data.add(node.id)
            continue
        if kind not in _ALLOWED_TYPES or dunders and kind in NAMING_KINDS and any(
                n.startswith("__") for n in names_of(node, kind)):
            return None
        if kind is ast.Call:
            func = node.func
            s.called.add(id(func))
            s.calls.append(node)
            if type(func) is ast.Name and func.id in CONSUMERS or type(func) is ast.Attribute and func.attr == "join":
                s.consumed.update(map(id, node.args))
        elif kind is ast.Attribute:
            s.attributes.append(node)
        elif kind is ast.Constant:
            if not isinstance(node.value, _CONSTANT_TYPES):
                return None  # Ellipsis
        elif kind is ast.For or kind is ast.comprehension:
            s.consumed.add(id(node.iter))
        elif kind is ast.FunctionDef:
            if node.decorator_list or node.returns:
                return None
            s.functions.add(node.name)
        elif kind is ast.arg:
            if node.annotation is not None:
                return None
            s.data.add(node.arg)
        elif kind is ast.ExceptHandler:
            if node.name:
                s.data.add(node.name)
        elif kind is ast.Global or kind is ast.Nonlocal:
            s.data.update(node.names)
        elif kind is ast.GeneratorExp:
            s.generators.append(node)
        elif kind is ast.Import:
            for alias in node.names:
                if alias.name not in PURE_MODULES:
                    return None
                s.modules[alias.asname or alias.name] = alias.name
        elif kind is ast.ImportFrom:
            if node.level or node.module not in PURE_MODULES:
                return None
            for alias in node.names:
                if alias.name not in API[node.module]:
                    return None  # also refuses *
                s.imported.add(alias.asname or alias.name)
    return s


def _names_allowed(s, unsafe):
    """The second half of is_pure: every name and attribute is used as the docstring allows."""
    builtin_like = PURE_BUILTINS | CALL_ONLY_BUILTINS | ITERATORS | s.imported
    if s.functions & s.data or s.functions & builtin_like or set(s.modules) & (s.functions | s.data | s.imported):
        return False  # one name for two kinds of thing (a builtin or module rebound, a function as data...)
    module_bases = set()
    for node in s.attributes:
        base = node.value
        if type(node.ctx) is not ast.Load:
            return False
        if type(base) is ast.Name and base.id in s.modules:
            if node.attr not in API[s.modules[base.id]]:
                return False
            module_bases.add(id(base))
        elif node.attr not in METHODS or id(node) not in s.called:
            return False  # an attribute of data: only allow-listed methods, only called (no bound methods)
    if any(id(node) not in s.consumed for node in s.generators):
        return False  # a generator object would be a value
    for node in s.calls:
        if type(node.func) is ast.Name and node.func.id in ITERATORS and node.func.id not in s.data:
            if id(node) not in s.consumed:
                return False  # an iterator would be a value
    for node in s.loads:
        name = node.id
        if name in s.modules:
            if id(node) not in module_bases:
                return False  # a module as a value
        elif name in s.functions or name in CALL_ONLY_BUILTINS and name not in s.data:
            if id(node) not in s.called:
                return False  # a function used as a value
        elif name not in s.data and name in unsafe:
            return False  # a builtin outside the list
        elif name in ITERATORS and name not in s.data and id(node) not in s.called:
            return False  # the iterator builtins themselves are fine as values, but keep it simple
    return True
