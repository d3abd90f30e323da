"""Adversarial tests of the Python layer's name checks: what Python will do, not what a program's
objects say. Attribute names given at run time as lying `str` subclasses, class patterns in
`match`, sympy's and mpmath's ways to `eval`/`exec`/`compile`, and str.format field walks.

Every attack returns MARK only if it reached a real interpreter object (a module, a type's
internals, an evaluated string); each runs interleaved with benign programs whose answers are
checked in the same call and the next one (`run_mixed`).
"""

import tempfile

import pytest

from reftune.sandbox import ProgramExecutor
from sandbox_support import BENIGN, LIVE, MARK, prog, run_mixed

# A str subclass whose own methods lie about its characters: every check that asks it is fooled,
# while getattr & co. read the real characters (its hash and == stay true, so lookups find them).
LIAR = '''class S(str):
    def startswith(self, *args):
        return False
    def __str__(self):
        return "harmless"
    def __contains__(self, item):
        return False
    def split(self, *args):
        return ["harmless"]
    def partition(self, *args):
        return ("math", "", "")
'''

NAME_ATTACKS = {
    "getattr": prog("return MARK if getattr((), S('__class__')) is tuple else 0"),
    "getattr default": prog("return MARK if getattr((), S('__class__'), None) is tuple else 0"),
    "hasattr": prog("return MARK if hasattr(math, S('__loader__')) else 0", header="import math\n"),
    "setattr": prog("class C:\n    pass\nsetattr(C, S('__getattr__'), lambda s, n: 1)\nreturn MARK if C().x else 0"),
    "delattr": prog("class C:\n    pass\ndelattr(C, S('__module__'))\nreturn MARK"),
    "attrgetter": prog("return MARK if operator.attrgetter(S('__class__'))(()) is tuple else 0", header="import operator\n"),
    "attrgetter dotted": prog("return MARK if operator.attrgetter(S('real.__class__'))(1) is int else 0",
                              header="import operator\n"),
    "methodcaller": prog("return MARK if operator.methodcaller(S('__reduce_ex__'), 2)(1) else 0", header="import operator\n"),
    "import by a lying name": prog("return MARK if __import__(S('sym' + 'py'), None, None, ('pi',)).pi else 0"),
    "name from __str__": prog("class T:\n    def __str__(self):\n        return S('__class__')\n"
                              "return MARK if getattr((), T()) is tuple else 0"),
}  # fmt: skip

# Positional class patterns read attribute names from __match_args__, which the program controls,
# on any subject a lying __instancecheck__ lets through.
MATCH = '''class M(type):
    def __instancecheck__(cls, obj):
        return True
class C(metaclass=M):
    __match_args__ = ("__class__",)
'''
MATCH_ATTACKS = {
    "match_args": prog("match ():\n    case C(c):\n        return MARK if c is tuple else 0\nreturn 0", header=MATCH),
    "match_args of type()": prog("D = type('D', (), {'__match_args__': ('__class__',)})\nmatch D():\n"
                                 "    case D(c):\n        return MARK if c is D else 0\nreturn 0"),
    "builtin name rebound": prog("match ():\n    case int(c):\n        return MARK if c is tuple else 0\nreturn 0",
                                 header=MATCH + "int = C\n"),
    "keyword pattern": prog("match ():\n    case object(__class__=c):\n        return MARK if c is tuple else 0\nreturn 0"),
    "two positional": prog("match 5:\n    case int(a, b):\n        return MARK\nreturn 0"),
}  # fmt: skip

# sympy and mpmath call further into themselves with a program's own objects; each of these ends in
# eval/exec/compile of text unless closed.
EVALUATORS = {
    # sympy's evalf of a Function named `identify` calls mpmath.identify, which evals its constants.
    "mpmath.identify via evalf": prog(
        "try:\n    identify(sympy.Integer(1), E()).evalf()\nexcept Exception as e:\n"
        "    return MARK if any(hasattr(a, 'getpid') for a in e.args) else 0\nreturn 0",
        header="import sympy\nclass E(sympy.Expr):\n    def _to_mpmath(self, prec):\n"
               "        return [\"(_ for _ in ()).throw(Exception(__import__('os')))\"]\n"
               "class identify(sympy.Function):\n    pass\n"),
    "typing forward reference": prog("t = typing.List['LOG.append(1) or int']\nreturn MARK if LOG else 1",
                                     header="import typing\nLOG = []\n"),
    "namedtuple field injection": prog(
        "P = collections.namedtuple('P', [S2()])\nreturn MARK if LOG else 1",
        header="import collections\nLOG = []\nclass T(str):\n    def isidentifier(self):\n        return True\n"
               "class S2:\n    def __str__(self):\n        return T('x=LOG.append(1)')\n"),
    "sympify of a lying str": prog("return MARK if sympy.sympify(S('1 + 1')) == 99 else 0", header="import sympy\n"),
    "Function named eval": prog("f = sympy.Function('eval')\nreturn MARK if f(1).evalf() == 99 else 1",
                                header="import sympy\n"),
}  # fmt: skip

# str.format walks the attributes its template names.
FORMAT_WALKS = {
    "literal template": prog("return MARK if 'function' in '{0.__globals__}'.format(statistics.mean) else 0",
                             header="import statistics\n"),
    "computed template": prog("t = '{0.__cl' + 'ass__}'\nreturn MARK if 'tuple' in t.format(()) else 0"),
    "str.format": prog("return MARK if 'tuple' in str.format('{0.__class__}', ()) else 0"),
    "getattr format": prog("return MARK if 'tuple' in getattr('{0.__class__}', 'format')(()) else 0"),
    "methodcaller format": prog("return MARK if 'tuple' in operator.methodcaller('format', ())('{0.__class__}') else 0",
                                header="import operator\n"),
    "UserString": prog("return MARK if 'tuple' in collections.UserString('{0.__class__}').format(()) else 0",
                       header="import collections\n"),
    "item then attribute": prog("return MARK if 'int' in '{0[0].__class__}'.format([1]) else 0"),
    "field in the spec": prog("return MARK if '{0:{1.__class__}}'.format(1, 2) else 0"),
    "format_map": prog("return MARK if '{x.__class__}'.format_map({'x': 1}) else 0"),
    "sibling's text": prog("return MARK if 'SECRET' in '{0.__globals__[__builtins__]}'.format(solution) else 0"),
}  # fmt: skip

# What must keep working next to the attacks.
NAME_BENIGN = [
    (prog("match 5:\n    case int(n):\n        return n\nreturn 0"), 5),
    (prog("match {'k': [1, 2]}:\n    case {'k': [a, b]}:\n        return a + b\nreturn 0"), 3),
    (prog("P = collections.namedtuple('P', 'x y')\nreturn P(1, 2).x + P(3, 4)[1]", header="import collections\n"), 5),
    (prog("return sympy.nsimplify(0.3333333333333333) * 3", header="import sympy\n"), 1.0),
    (prog("return '{:.2f}'.format(2.5) + f'{7:>3}'"), "2.50  7"),
    (prog("return '{0} and {1[0]}'.format(1, [2]) + '{real}'.format_map({'real': 3})"), "1 and 23"),
    (prog("return getattr(3, 'real') + operator.attrgetter('real')(4) + operator.methodcaller('bit_length')(8)",
          header="import operator\n"), 11),
] + BENIGN  # fmt: skip


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox-root")
    with pytest.MonkeyPatch.context() as mp, ProgramExecutor(workers=2, grace=0.3) as executor:
        mp.setattr(tempfile, "tempdir", str(root))
        LIVE.append(executor)
        yield executor, root
        LIVE.remove(executor)


def contained(ex, attacks, benign=NAME_BENIGN):
    executor, root = ex
    programs = [(LIAR + p).replace("MARK", repr(MARK)) for p in attacks.values()]
    results = run_mixed(executor, root, programs, benign=benign)
    for name, result in zip(attacks, results):
        assert result.value in (None, 0, 1), (name, result)
        if result.value is None:
            assert result.reason.startswith(("forbidden:", "error:")), (name, result)
    return dict(zip(attacks, results))


def test_lying_names_are_read_as_their_characters(ex):
    named = contained(ex, NAME_ATTACKS)
    for name in ("getattr", "getattr default", "setattr", "delattr", "attrgetter", "attrgetter dotted", "methodcaller"):
        assert named[name].reason.startswith("forbidden:"), (name, named[name])
    assert named["hasattr"].value == 0  # a refused name is an attribute it does not have
    assert named["import by a lying name"].reason == "forbidden: import sympy"
    assert named["name from __str__"].reason.startswith("forbidden: getattr")


def test_class_patterns_are_checked(ex):
    named = contained(ex, MATCH_ATTACKS)
    assert all(r.reason.startswith("forbidden:") for r in named.values()), named


def test_sympy_and_mpmath_evaluate_no_text(ex):
    named = contained(ex, EVALUATORS)
    assert named["mpmath.identify via evalf"].value == 0  # refused inside evalf; the program caught it
    assert named["typing forward reference"].reason == "forbidden: compile()"
    assert named["namedtuple field injection"].reason.startswith("error: TypeError")
    assert named["sympify of a lying str"].value == 0


def test_format_walks_stay_within_the_attribute_rule(ex):
    named = contained(ex, FORMAT_WALKS)
    assert all(r.reason.startswith("forbidden:") for r in named.values()), named
