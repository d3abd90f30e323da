"""The Python-level policy on its own: which programs are pure (may share a child), and what the
allow-listed API reaches."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reftune.sandbox.policy import Policy
from reftune.sandbox.pure import is_pure

UNSAFE = Policy(()).unsafe_for_pure

ROOT = Path(__file__).resolve().parents[1]


def pure(source: str) -> bool:
    return is_pure(list(ast.walk(ast.parse(source))), UNSAFE)


@pytest.mark.parametrize("source", [
    "def solution():\n    '''doc'''\n    a = 29\n    b = 7\n    result = a * b\n    return result\n",
    "def helper(n):\n    return n * 2\n\ndef solution():\n    return helper(3) + SEVEN\nSEVEN = 7\n",
    "def solution():\n    total = 0\n    for i in range(10):\n        if i % 2:\n            total += i\n    return total\n",
    "def solution():\n    xs = [i * i for i in range(5)]\n    d = {k: k * 2 for k in xs}\n    return sum(xs) + len(d) + d[4]\n",
    "def solution():\n    return sum(i for i in range(10)) + max(x for x in [1, 2])\n",
    "def solution():\n    try:\n        return 1 / 0\n    except ZeroDivisionError as e:\n        return str(e)\n",
    "def solution():\n    x = 2.5\n    return f'{x:.2f} {x!r}' + str(round(x)) + str(int('7'))\n",
    "def solution(acc=[1]):\n    acc += [2]\n    return len(acc)\n",
    "def solution():\n    n = 0\n    while (n := n + 1) < 5:\n        pass\n    return n\n",
    "def solution():\n    print('thinking', 3)\n    return sorted([3, 1], key=abs, reverse=True)\n",
    "import math\ndef solution():\n    return math.ceil(7 / 2) + math.pi + math.sqrt(4)\n",
    "from math import floor as fl, gcd\ndef solution():\n    return fl(2.5) + gcd(4, 6)\n",
    "def solution(acc=[]):\n    acc.append(1)\n    return len(acc)\n",
    "def solution():\n    words = 'a b c'.split()\n    return ', '.join(w.upper() for w in words)\n",
    "def solution():\n    d = {'a': 1}\n    return sum(v for k, v in d.items()) + d.get('b', 0)\n",
    "def solution():\n    xs = [3, 1, 2]\n    xs.sort(reverse=True)\n    return [i * x for i, x in enumerate(xs)]\n",
    "def solution():\n    return dict(zip(['a', 'b'], [1, 2])), list(reversed([1, 2])), sum(map(int, ['1', '2']))\n",
    "def solution():\n    return undefined_helper(3)\n",  # a NameError, like anywhere else
    "def solution():\n    try:\n        return x\n    except NameError as e:\n        raise KeyError(str(e))\n",
])  # fmt: skip
def test_plain_computations_are_pure(source):
    assert pure(source)


@pytest.mark.parametrize("source", [
    "def solution():\n    f = 'abc'.upper\n    return f()\n",  # a bound method as a value
    "def solution():\n    return 'a'.encode()\n",  # a method outside the list
    "def solution():\n    return '{0.__class__}'.format(1)\n",  # format walks attributes
    "def solution():\n    return (1).real\n",  # attributes of data: method calls only
    "def solution():\n    x = []\n    x.append = 1\n",
    "import math\ndef solution():\n    return str(math)\n",  # a module as a value
    "import math\ndef solution():\n    return math.nothing\n",
    "import math\ndef solution():\n    math.pi = 3\n",
    "import math\nmath = 3\ndef solution():\n    return math\n",
    "import os\ndef solution():\n    return 1\n",
    "import statistics\ndef solution():\n    return statistics.mean([1])\n",
    "from math import *\ndef solution():\n    return pi\n",
    "def solution():\n    return str(zip([1], [2]))\n",  # an iterator as a value (its repr shows an address)
    "def solution():\n    z = enumerate([1])\n    return 1\n",
    "def solution():\n    return type(math).sqrt\n",
    "def solution():\n    f = lambda x: x\n    return f(1)\n",  # lambda
    "def solution():\n    return str(solution)\n",  # a function as a value (its repr shows an address)
    "def g():\n    return 1\ndef solution():\n    return [g][0]()\n",
    "def solution():\n    return sorted([1, 2], key=helper)\ndef helper(x):\n    return -x\n",
    "def solution():\n    return str(x for x in [1])\n",  # a generator object as a value
    "def solution():\n    return list({'b', 'a'})\n",  # set order follows hashes
    "def solution():\n    return list(set([1, 2]))\n",
    "class A:\n    pass\ndef solution():\n    return 1\n",  # class
    "@decorate\ndef solution():\n    return 1\n",  # decorator
    "def solution() -> int:\n    return 1\n",  # annotation
    "def solution():\n    yield 1\n",
    "def solution():\n    return id(1) + hash('x')\n",  # builtins outside the list
    "def solution():\n    return type(1)\n",
    "def solution():\n    return __name__\n",
    "def solution():\n    __builtins__['len'] = 0\n",  # the builtins dict would be shared
    "def solution():\n    return getattr(1, 'real')\n",
    "def solution():\n    return set([1])\n",
    "def solution():\n    return print\n",  # print only as a call
    "def solution():\n    with x:\n        pass\n",
    "def solution():\n    return __builtins__\n",
    "def sum(x):\n    return 0\ndef solution():\n    return sum([1])\n",  # a builtin redefined as a function
    "def solution():\n    return ...\n",
])  # fmt: skip
def test_everything_else_is_not_pure(source):
    assert not pure(source)


CRAWL = r"""
import json, sys, types, builtins, functools, importlib, string, typing
from reftune.sandbox import apis, harden, policy, rules
import sympy
it, lam, sp = map(importlib.import_module, ["sympy.external.importtools", "sympy.utilities.lambdify",
                                            "sympy.parsing.sympy_parser"])
originals = [it.import_module, lam.lambdify, sp.parse_expr, sp.eval_expr]
p = policy.Policy(policy.DEFAULT_MODULES)
for name in policy.DEFAULT_MODULES:
    p.load(name)
harden.harden_sympy(sympy)
dangerous = {id(f): f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', f)}" for f in originals + [
    builtins.eval, builtins.exec, builtins.compile, builtins.open, builtins.__import__, builtins.getattr,
    builtins.setattr, builtins.globals, builtins.locals, builtins.vars, builtins.breakpoint, builtins.input,
    importlib.import_module, typing.get_type_hints, functools.singledispatch, functools.update_wrapper,
    functools.wraps, string.Formatter]}
problems, seen = [], set()
frontier = [(f"{view.__name__}.{n}", v) for view in p.views.values() for n, v in vars(view).items() if not n.startswith("__")]
for depth in range(3):
    following = []
    for path, obj in frontier:
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.ModuleType) and not isinstance(obj, policy.ModuleView):
            problems.append(f"module {path}")
        elif id(obj) in dangerous or isinstance(obj, (types.CodeType, types.FrameType)):
            problems.append(f"{dangerous.get(id(obj), type(obj).__name__)} at {path}")
        elif depth < 2 and isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)):
            for attr in dir(obj):
                if not rules.attr_blocked(attr):
                    try:
                        following.append((f"{path}.{attr}", getattr(obj, attr)))
                    except Exception:
                        pass
    frontier = following
print(json.dumps({"checked": len(seen), "problems": problems}))
"""


def test_the_allowed_api_reaches_no_module_and_no_evaluator():
    """Public attributes, two levels deep from every name a program can import (classes and
    functions; instances are program data): no real module, no evaluator, no import machinery."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CRAWL], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["checked"] > 5000
    assert report["problems"] == []


def test_the_sandbox_modules_import_each_other_without_a_circle():
    """The worker loads this folder as a package of its own through relative imports, which the
    repository's layer check does not see: they must run one way too."""
    folder = ROOT / "reftune" / "sandbox"
    deps = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps[path.stem] = {n.module.split(".")[0] for n in ast.walk(tree)
                           if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}  # fmt: skip
    order, done = [], set()
    while len(done) < len(deps):
        ready = sorted(m for m in deps if m not in done and deps[m] <= done)
        assert ready, f"import circle among {sorted(set(deps) - done)}: {deps}"
        order += ready
        done.update(ready)
    assert order.index("errors") < order.index("rules") < order.index("policy")
