"""The static part of the Python-level policy: what a program may name, checked on its syntax tree
before any of it runs (and the same attribute rule for the names that getattr & co. get at run time).

Standard library only; imports `errors` and `apis` of its siblings.

* Attributes: names that start with ``_`` are refused except harmless protocol dunders and
  namedtuple's API; so are frame, code and traceback attributes and ``.obj`` (AttributeError.obj
  holds the object whose lookup failed). A name is checked as the exact ``str`` Python will use
  (`exact_name`): a ``str`` subclass whose ``startswith``, ``__eq__`` or ``__hash__`` lies is read
  through ``str.__str__``, never through its own methods.
* ``str.format``/``format_map`` walk attributes named inside the template (``'{0.__class__}'``):
  allowed only on a string literal whose fields pass the attribute rule, never on a computed
  string nor through getattr/attrgetter/methodcaller.
* Class patterns in ``match``: keyword patterns are attribute names like any other; positional
  ones read names from the class's ``__match_args__`` (which a program controls, as it controls
  ``isinstance`` through a metaclass), so they are allowed only for the builtin types that match
  themselves (``case int(n)``), under their own names.
* ``__builtins__`` is not a name programs may use: each program gets its own copy of the builtins,
  and nothing of it is theirs to change for the code they call.
"""

import _string
import ast
import warnings

from .apis import API
from .errors import ForbiddenAttr, ForbiddenImport

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
# Methods that walk attributes named in a string (only on literals, see check_tree).
FORMAT_METHODS = frozenset({"format", "format_map"})
RESERVED_NAMES = frozenset({"__builtins__"})
# Builtin types whose class pattern matches the subject itself (`case int(n)`), no __match_args__.
SELF_MATCHING = frozenset("bool bytearray bytes dict float frozenset int list set str tuple".split())
_MAX_FORMAT_DEPTH = 2  # '{0:{1}}': a spec may hold fields, and CPython allows two levels


def exact_name(name):
    """`name` as an exact str (what getattr & co. will use), or None when it is not a str at all."""
    if type(name) is str:
        return name
    return str.__str__(name) if issubclass(type(name), str) else None  # type(): __class__ can lie


def attr_blocked(name):
    """True if the attribute `name` is refused (see the module doc); non-str names are refused."""
    name = exact_name(name)
    if name is None:
        return True
    return name in BLOCKED_ATTRS or name.startswith("_") and name not in ALLOWED_UNDERSCORE


def dynamic_attr_blocked(name):
    """The rule for names given at run time (getattr, attrgetter, methodcaller, class patterns)."""
    return attr_blocked(name) or exact_name(name) in FORMAT_METHODS


def format_fields_allowed(template, depth=0):
    """True if every field of a str.format template names only allowed attributes (its items,
    `[key]`, are the program's own data); a template Python cannot parse is refused too."""
    if depth > _MAX_FORMAT_DEPTH:
        return False
    try:
        for _, field, spec, _ in _string.formatter_parser(template):
            if field is None:
                continue
            _, rest = _string.formatter_field_name_split(field)
            if any(is_attr and attr_blocked(key) for is_attr, key in rest):
                return False
            if spec and not format_fields_allowed(spec, depth + 1):
                return False
    except ValueError:
        return False
    return True


def module_allowed(name, allowed):
    """`allowed`: the top-level modules this pool allows; a submodule needs its own API entry."""
    return name.partition(".")[0] in allowed and name in API


def _bound_names(nodes):
    """Every name the program binds anywhere (assignments, defs, arguments, imports, patterns...)."""
    out = set()
    for node in nodes:
        kind = type(node)
        if kind is ast.Name and type(node.ctx) is not ast.Load:
            out.add(node.id)
        elif kind in (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef):
            out.add(node.name)
        elif kind is ast.arg:
            out.add(node.arg)
        elif kind is ast.alias:
            out.add(node.asname or node.name.partition(".")[0])
        elif kind in (ast.Global, ast.Nonlocal):
            out.update(node.names)
        elif kind in (ast.ExceptHandler, ast.MatchAs, ast.MatchStar) and node.name:
            out.add(node.name)
        elif kind is ast.MatchMapping and node.rest:
            out.add(node.rest)
    return out


def _check_class_pattern(node, nodes, bound):
    for name in node.kwd_attrs:  # `case C(__class__=x)` is a getattr too
        if dynamic_attr_blocked(name):
            raise ForbiddenAttr(f"attribute .{name}")
    if not node.patterns:
        return bound
    if bound is None:
        bound = _bound_names(nodes)
    cls = node.cls
    if type(cls) is not ast.Name or cls.id not in SELF_MATCHING or cls.id in bound or len(node.patterns) > 1:
        raise ForbiddenAttr("positional class pattern (it reads attributes named by __match_args__)")
    return bound


NAMING_KINDS = frozenset({ast.Name, ast.arg, ast.Global, ast.Nonlocal, ast.alias, ast.FunctionDef, ast.AsyncFunctionDef,
                          ast.ClassDef, ast.ExceptHandler, ast.MatchAs, ast.MatchStar})  # fmt: skip


def names_of(node, kind):
    """The identifiers a node (of type `kind`) introduces or reads: names, arguments, global and
    nonlocal names, import aliases, def/class/except/pattern names."""
    if kind is ast.Name:
        return (node.id,)
    if kind is ast.arg:
        return (node.arg,)
    if kind is ast.Global or kind is ast.Nonlocal:
        return node.names
    if kind is ast.alias:
        return (node.asname or node.name,)
    if kind in (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler, ast.MatchAs, ast.MatchStar):
        return (node.name,) if node.name else ()
    return ()


def check_tree(nodes, allowed, dunders=True):
    """Refuse, before anything runs, what the module doc lists. `nodes`: all nodes of the program's
    tree (list(ast.walk(tree))); raises Forbidden (ForbiddenAttr / ForbiddenImport). `dunders`:
    False when the text cannot name `__builtins__` (see `may_name_dunders`), to skip that check."""
    bound = None  # computed once, only for a program with a positional class pattern
    for node in nodes:
        kind = type(node)
        if kind is ast.Name:
            if dunders and node.id in RESERVED_NAMES:
                raise ForbiddenAttr(f"name {node.id}")
            continue
        if kind is ast.Load or kind is ast.Store or kind is ast.Constant:
            continue  # most nodes: nothing to check
        if kind is ast.Attribute:
            name = node.attr
            if attr_blocked(name):
                raise ForbiddenAttr(f"attribute .{name}")
            if name in FORMAT_METHODS:
                template = node.value
                if type(template) is not ast.Constant or type(template.value) is not str:
                    raise ForbiddenAttr(f".{name} of a computed string (only a literal template)")
                if not format_fields_allowed(template.value):
                    raise ForbiddenAttr(f".{name} template {template.value[:80]!r}")
            continue
        if kind is ast.MatchClass:
            bound = _check_class_pattern(node, nodes, bound)
        elif kind is ast.ImportFrom:  # other imports fail at run time (catchable, as ImportError)
            if node.level:
                raise ForbiddenImport("relative import")
            known = API[node.module] if module_allowed(node.module or "", allowed) else None
            for alias in node.names:
                if known is not None and alias.name != "*" and alias.name not in known:
                    raise ForbiddenImport(f"from {node.module} import {alias.name}")
        if dunders and kind in NAMING_KINDS:
            for name in names_of(node, kind):
                if name in RESERVED_NAMES:
                    raise ForbiddenAttr(f"name {name}")


def may_name_dunders(source):
    """False if no identifier of `source` can start with "__": ASCII text without "__" (identifiers
    are NFKC-normalized: in other text "_" followed by U+FE4D spells "__")."""
    return not source.isascii() or "__" in source


def parse_quietly(source: str, filename: str = "<program>") -> ast.Module:
    """`ast.parse` without the warnings a model-written program can raise (SyntaxWarning "invalid
    decimal literal" for `1if`, DeprecationWarning for an escape such as "\\d"): they are the
    program's, and would print on the trainer's terminal. The grader's clean-up uses it too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source, filename, "exec")


def compile_quietly(tree, filename: str = "<program>"):
    """compile() of a checked tree, without its warnings (`x is 0` is a SyntaxWarning of the
    compiler, not of the parser): in a sandbox child they would go nowhere, but cost the time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile(tree, filename, "exec", dont_inherit=True)
