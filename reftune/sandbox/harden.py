"""Closing sympy's and mpmath's own evaluators of strings (applied by the zygote after it imports sympy).

Standard library only at import time; imports `errors` and `apis` of its siblings. Programs reach
sympy only through the allow-listed API of `apis.py`, but sympy calls further into itself with
objects a program made (its own classes, names and strings): each place where that ends in
`eval`, `exec` or `compile` of text is replaced here by code that evaluates nothing. The children's
audit hook (`policy.CompileGuard`) refuses any compile of text that is still reached.
"""

import ast
import importlib
import io
import sys
import tokenize

from .apis import API
from .errors import Forbidden, forbidden_stub


def harden_sympy(sympy):
    """Close the string evaluators inside sympy and mpmath, in every loaded sympy/mpmath module.

    * sympify()/S()/parse_expr() of a string: parsed by `safe_parse_expr_for`'s (an AST walk that builds
      the expression from numbers, names and calls of allow-listed sympy functions; it never calls
      eval), and the real parser's eval/exec/compile fail closed should anything still reach them;
    * lambdify() (exec of code printed from an expression, whose symbol names a program chooses;
      used inside evalf of infinite sums and root refinement): replaced by `safe_lambdify`, which
      substitutes the values into the expression instead of generating code;
    * mpmath.identify (eval of the names in its `constants` when they are not a dict; sympy's evalf
      calls it for a Function subclass named `identify` with arguments of a program's own class):
      refuses constants other than a dict of values, the form nsimplify uses;
    * sympy.external.importtools.import_module (any module by name): answers "not installed".
    Modules sympy imports later bind these names from the patched modules, so they get them too."""
    importtools = importlib.import_module("sympy.external.importtools")
    sympy_parser = importlib.import_module("sympy.parsing.sympy_parser")
    lambdify_module = importlib.import_module("sympy.utilities.lambdify")  # the package re-exports the function
    identification = importlib.import_module("mpmath.identification")

    originals = [  # kept referenced: ids of freed objects could be reused while we scan
        (sympy_parser.parse_expr, safe_parse_expr_for(sympy, sympy_parser)),
        (sympy_parser.eval_expr, forbidden_stub("eval_expr")),
        (lambdify_module.lambdify, safe_lambdify),
        (importtools.import_module, lambda *args, **kwargs: None),
    ]
    replace = {id(old): new for old, new in originals}
    identify = identification.IdentificationMethods.identify
    methods = identification.IdentificationMethods
    methods.identify = safe_identify_for(identify)  # mp.identify, fp.identify... are looked up on the class
    for name, module in list(sys.modules.items()):
        if module is not None and name.partition(".")[0] in ("sympy", "mpmath"):
            space = vars(module)
            for key, value in list(space.items()):
                if key.startswith("__"):
                    continue
                if id(value) in replace:
                    space[key] = replace[id(value)]
                elif getattr(value, "__func__", None) is identify:  # mpmath.identify: a bound method of mp
                    space[key] = methods.identify.__get__(value.__self__)
    for module in (sympy_parser, identification):  # module globals shadow the builtins inside them
        for name in ("eval", "exec", "compile"):
            vars(module)[name] = forbidden_stub(name)


def safe_identify_for(identify):
    """mpmath's identify() without its eval: constants only as a dict {name: value}."""

    def safe_identify(ctx, x, constants=(), *args, **kwargs):
        if constants and not isinstance(constants, dict):
            raise Forbidden("identify() with constants given by name")
        return identify(ctx, x, constants, *args, **kwargs)

    safe_identify.__name__ = safe_identify.__qualname__ = "identify"
    return safe_identify


def safe_lambdify(args, expr, modules=None, printer=None, use_imps=True, dummify=False, cse=False, **kwargs):
    """lambdify() without code generation: a function that substitutes its arguments into `expr`
    and returns a Python number where the result is one (what the numeric callers expect)."""
    from sympy import Tuple, sympify

    params = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    expr = sympify(expr)

    def number(result):
        if getattr(result, "is_Integer", False):
            return int(result)
        if getattr(result, "is_number", False) and not isinstance(result, Tuple):
            value = complex(result)
            return value.real if value.imag == 0 else value
        return result

    def f(*values):
        subs = dict(zip(params, values))
        if isinstance(expr, (list, tuple)):  # lambdify of several expressions
            return type(expr)(number(sympify(e).subs(subs)) for e in expr)
        return number(expr.subs(subs))

    return f


def safe_parse_expr_for(sympy, sympy_parser):
    """A parse_expr() for sympify(): the expression grammar of sympy's default transformations
    (numbers -> Integer/Float, ^ -> ** when convert_xor, floats -> Rational when rationalize, unknown
    names -> Symbol, unknown names called -> Function), built without evaluating any code."""
    names = {n: getattr(sympy, n) for n in API["sympy"] if hasattr(sympy, n)}
    names.update(abs=sympy.Abs, min=sympy.Min, max=sympy.Max)  # Python builtins, as sympify had them
    xor, rationalize = sympy_parser.convert_xor, sympy_parser.rationalize
    binops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a**b, ast.Mod: lambda a, b: a % b,
              ast.FloorDiv: lambda a, b: a // b, ast.MatMult: lambda a, b: a @ b}  # fmt: skip
    compares = {ast.Lt: lambda a, b: a < b, ast.Gt: lambda a, b: a > b, ast.LtE: lambda a, b: a <= b,
                ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}  # fmt: skip

    def parse_expr(s, local_dict=None, transformations=(), global_dict=None, evaluate=True):
        if not isinstance(s, str):
            raise TypeError("parse_expr() takes a string")
        opts = tuple(transformations) if isinstance(transformations, (tuple, list)) else ()
        s = s.strip()
        if xor in opts and "^" in s:  # like sympy's convert_xor: on tokens, so that 2^3 + x is (2**3) + x
            tokens = tokenize.generate_tokens(io.StringIO(s).readline)
            s = tokenize.untokenize((t.type, "**" if t.type == tokenize.OP and t.string == "^" else t.string)
                                    for t in tokens).strip()  # fmt: skip
        tree = ast.parse(s, "<sympify>", "eval")  # SyntaxError -> SympifyError in sympify()
        scopes = [d for d in (local_dict, global_dict) if isinstance(d, dict)] + [names]

        def lookup(name):
            for scope in scopes:
                if name in scope:
                    return True, scope[name]
            return False, None

        def number(node):
            text = ast.get_source_segment(s, node) or repr(node.value)
            if isinstance(node.value, float):
                return sympy.Rational(text) if rationalize in opts else sympy.Float(text)
            if isinstance(node.value, complex):
                return sympy.I * sympy.Float(repr(node.value.imag))
            return sympy.Integer(node.value)

        def build(node, in_call=False):
            kind = type(node)
            if kind is ast.Constant:
                if isinstance(node.value, bool) or node.value is None:
                    return node.value
                if isinstance(node.value, (int, float, complex)):
                    return number(node)
                if isinstance(node.value, str) and in_call:  # Symbol('x'), Rational('1/3')
                    return node.value
            elif kind is ast.Name:
                found, value = lookup(node.id)
                return value if found else sympy.Symbol(node.id)
            elif kind is ast.BinOp and (type(node.op) in binops or type(node.op) is ast.BitXor):
                a, b = build(node.left), build(node.right)
                if type(node.op) is ast.BitXor:  # only left when convert_xor is off
                    return a ^ b
                return binops[type(node.op)](a, b)
            elif kind is ast.UnaryOp:
                a = build(node.operand)
                ops = {ast.USub: lambda: -a, ast.UAdd: lambda: +a, ast.Invert: lambda: ~a, ast.Not: lambda: sympy.Not(a)}
                return ops[type(node.op)]()
            elif kind is ast.Compare and len(node.ops) == 1 and type(node.ops[0]) in compares:
                return compares[type(node.ops[0])](build(node.left), build(node.comparators[0]))
            elif kind is ast.Call and type(node.func) is ast.Name and all(k.arg for k in node.keywords):
                found, fn = lookup(node.func.id)
                fn = fn if found else sympy.Function(node.func.id)
                if any(type(a) is ast.Starred for a in node.args):
                    raise Forbidden("sympify of *args")
                args = [build(a, in_call=True) for a in node.args]
                return fn(*args, **{k.arg: build(k.value, in_call=True) for k in node.keywords})
            elif kind in (ast.Tuple, ast.List):
                items = [build(e, in_call) for e in node.elts]
                return tuple(items) if kind is ast.Tuple else items
            raise Forbidden(f"sympify of {kind.__name__} syntax")

        if evaluate:
            return build(tree.body)
        with sympy.evaluate(False):
            return build(tree.body)

    return parse_expr
