"""What programs get from each allowed module: an allow-list of public names (data), and the
hardening of sympy's own string evaluators (applied by the zygote after it imports sympy).

Standard library only at import time. An allow-list rather than a block-list: a name a module gains
in a new version, or a submodule that re-exports import machinery (``sympy.stats.rv.import_module``),
is simply not there. Left out on purpose: everything that evaluates strings or generates code
(``functools.singledispatch`` -> ``typing.get_type_hints``, ``dataclasses``, ``string.Formatter``,
``sympy.lambdify``/``nsolve``/``parse_expr``/``var``, printing to files, plotting), attribute walkers
(``functools.wraps``/``update_wrapper`` copy attributes by name), ``random.SystemRandom`` (not
reproducible), and clock setters.
"""

import ast
import io
import sys
import tokenize


def _names(text):
    return frozenset(text.split())


LAZY_MODULES = frozenset({"sympy"})  # imported by the zygote only when a program names them

API = {
    "math": _names("""acos acosh asin asinh atan atan2 atanh cbrt ceil comb copysign cos cosh degrees dist e
        erf erfc exp exp2 expm1 fabs factorial floor fmod frexp fsum gamma gcd hypot inf isclose isfinite
        isinf isnan isqrt lcm ldexp lgamma log log10 log1p log2 modf nan nextafter perm pi pow prod
        radians remainder sin sinh sqrt sumprod tan tanh tau trunc ulp"""),
    "cmath": _names("""acos acosh asin asinh atan atanh cos cosh e exp inf infj isclose isfinite isinf isnan
        log log10 nan nanj phase pi polar rect sin sinh sqrt tan tanh tau"""),
    "fractions": _names("Fraction"),
    "decimal": _names("""BasicContext Clamped Context ConversionSyntax Decimal DecimalException DecimalTuple
        DefaultContext DivisionByZero DivisionImpossible DivisionUndefined ExtendedContext FloatOperation
        Inexact InvalidContext InvalidOperation MAX_EMAX MAX_PREC MIN_EMIN MIN_ETINY Overflow ROUND_05UP
        ROUND_CEILING ROUND_DOWN ROUND_FLOOR ROUND_HALF_DOWN ROUND_HALF_EVEN ROUND_HALF_UP ROUND_UP Rounded
        Subnormal Underflow getcontext localcontext setcontext"""),
    "numbers": _names("Number Complex Real Rational Integral"),
    "statistics": _names("""NormalDist StatisticsError correlation covariance fmean geometric_mean
        harmonic_mean linear_regression mean median median_grouped median_high median_low mode multimode
        pstdev pvariance quantiles stdev variance"""),
    "random": _names("""Random betavariate binomialvariate choice choices expovariate gammavariate gauss
        getrandbits getstate lognormvariate normalvariate paretovariate randbytes randint random randrange
        sample seed setstate shuffle triangular uniform vonmisesvariate weibullvariate"""),
    "itertools": _names("""accumulate batched chain combinations combinations_with_replacement compress count
        cycle dropwhile filterfalse groupby islice pairwise permutations product repeat starmap takewhile tee
        zip_longest"""),
    "functools": _names("cache cached_property cmp_to_key lru_cache partial partialmethod reduce total_ordering"),
    "operator": _names("""abs add and_ attrgetter call concat contains countOf delitem eq floordiv ge getitem
        gt iadd iand iconcat ifloordiv ilshift imatmul imod imul index indexOf inv invert ior ipow irshift
        is_ is_not isub itemgetter itruediv ixor le length_hint lshift lt matmul methodcaller mod mul ne neg
        not_ or_ pos pow rshift setitem sub truediv truth xor"""),
    "collections": _names("ChainMap Counter OrderedDict UserDict UserList UserString defaultdict deque namedtuple"),
    "heapq": _names("heappush heappop heapify heapreplace merge nlargest nsmallest heappushpop"),
    "bisect": _names("bisect bisect_left bisect_right insort insort_left insort_right"),
    "array": _names("ArrayType array typecodes"),
    "copy": _names("Error copy deepcopy"),
    "string": _names("""ascii_letters ascii_lowercase ascii_uppercase capwords digits hexdigits octdigits
        printable punctuation whitespace Template"""),
    "re": _names("""match fullmatch search sub subn split findall finditer compile purge escape error Pattern
        Match A I M S X U ASCII IGNORECASE MULTILINE DOTALL VERBOSE UNICODE NOFLAG RegexFlag"""),
    "datetime": _names("date datetime time timedelta timezone tzinfo MINYEAR MAXYEAR UTC"),
    "time": _names("""altzone asctime ctime daylight gmtime localtime mktime monotonic monotonic_ns
        perf_counter perf_counter_ns process_time process_time_ns sleep strftime strptime struct_time
        thread_time thread_time_ns time time_ns timezone tzname"""),
    "enum": _names("Enum EnumMeta EnumType IntEnum IntFlag Flag StrEnum auto unique"),
    "typing": _names("""AbstractSet Annotated Any Callable ClassVar Collection Container Counter DefaultDict
        Deque Dict Final FrozenSet Generator Generic Hashable Iterable Iterator List Literal Mapping
        MutableMapping MutableSequence MutableSet NamedTuple NoReturn Optional Protocol Reversible Sequence
        Set Sized SupportsAbs SupportsFloat SupportsIndex SupportsInt SupportsRound Tuple Type TypeVar Union
        cast overload"""),
    "abc": _names("ABC ABCMeta abstractmethod abstractclassmethod abstractstaticmethod abstractproperty"),
    "textwrap": _names("TextWrapper wrap fill dedent indent shorten"),
    # The math of a word problem: numbers, algebra, solving, calculus, number theory, sets, matrices,
    # geometry, logic; text printers only.
    "sympy": _names("""
        sympify SympifyError S Basic Atom Expr AtomicExpr UnevaluatedExpr Symbol Wild Dummy symbols Number
        Float Rational Integer RealNumber igcd ilcm E I nan oo pi zoo AlgebraicNumber mod_inverse Pow
        integer_nthroot integer_log Mul prod Add Mod Rel Eq Ne Lt Le Gt Ge Equality GreaterThan LessThan
        Unequality StrictGreaterThan StrictLessThan Lambda Derivative diff Function Subs expand count_ops
        expand_mul expand_log expand_func expand_trig expand_complex expand_multinomial expand_power_base
        expand_power_exp nfloat N Tuple Dict gcd_terms factor_terms evaluate Catalan EulerGamma GoldenRatio
        TribonacciConstant default_sort_key ordered num_digits preorder_traversal postorder_traversal
        factorial factorial2 rf ff binomial RisingFactorial FallingFactorial subfactorial fibonacci lucas
        tribonacci harmonic bernoulli bell euler catalan partition divisor_sigma totient primepi mobius
        sqrt root Min Max real_root Rem cbrt re im sign Abs conjugate arg sin cos tan sec csc cot sinc asin
        acos atan asec acsc acot atan2 exp ln log LambertW sinh cosh tanh coth sech csch asinh acosh atanh
        acoth asech acsch floor ceiling frac Piecewise piecewise_fold erf erfc gamma lowergamma uppergamma
        polygamma loggamma digamma zeta beta KroneckerDelta DiracDelta Heaviside legendre hermite
        chebyshevt chebyshevu laguerre
        product Product summation Sum
        simplify nsimplify trigsimp powsimp powdenest radsimp ratsimp logcombine collect fraction numer
        denom separatevars combsimp gammasimp sqrtdenest cse
        solve solveset linsolve nonlinsolve linear_eq_to_matrix diophantine rsolve dsolve checksol
        reduce_inequalities solve_poly_system solve_univariate_inequality
        Poly degree LC LM LT div rem quo gcd lcm gcd_list lcm_list factor factor_list sqf sqf_list cancel
        apart together roots real_roots nroots all_roots count_roots terms_gcd discriminant resultant
        groebner interpolate horner minimal_polynomial minpoly CRootOf rootof RootOf
        nextprime prevprime prime primerange randprime isprime divisors proper_divisors divisor_count
        factorint primefactors multiplicity perfect_power is_perfect n_order primitive_root
        continued_fraction egyptian_fraction binomial_coefficients npartitions sqrt_mod is_quad_residue
        discrete_log
        Set Interval Union EmptySet FiniteSet ProductSet Intersection Complement Range Reals Integers
        Naturals Naturals0 Rationals Complexes Contains ImageSet imageset ConditionSet
        Order O limit Limit series
        is_increasing is_decreasing singularities minimum maximum stationary_points AccumBounds periodicity
        integrate Integral
        And Or Not Xor Implies Equivalent ITE true false satisfiable simplify_logic to_cnf to_dnf
        Matrix ImmutableMatrix SparseMatrix MatrixSymbol eye zeros ones diag det trace Identity ZeroMatrix
        GramSchmidt hessian ShapeError NonSquareMatrixError BlockMatrix
        Point Point2D Point3D Line Ray Segment Circle Ellipse Polygon RegularPolygon Triangle Plane rad deg
        intersection convex_hull centroid
        Q ask refine assuming
        latex pretty pprint srepr sstr"""),
    "sympy.abc": _names("""a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P
        Q R S T U V W X Y Z alpha beta gamma delta epsilon zeta eta theta iota kappa lamda mu nu xi omicron
        pi rho sigma tau upsilon phi chi psi omega"""),
}  # fmt: skip


# ---------------------------------------------------------------------------- sympy's evaluators


def harden_sympy(sympy, forbidden_stub):
    """Close the string evaluators inside sympy itself, in every loaded sympy/mpmath module.

    * sympify()/S()/parse_expr() of a string: parsed by `safe_parse_expr_for`'s (an AST walk that builds
      the expression from numbers, names and calls of allow-listed sympy functions; it never calls
      eval), and the real parser's eval/exec/compile fail closed should anything still reach them;
    * lambdify() (exec of code printed from an expression, whose symbol names a program chooses;
      used inside evalf of infinite sums and root refinement): replaced by `safe_lambdify`, which
      substitutes the values into the expression instead of generating code;
    * sympy.external.importtools.import_module (any module by name): answers "not installed".
    Modules sympy imports later bind these names from the patched modules, so they get them too."""
    import importlib

    importtools = importlib.import_module("sympy.external.importtools")
    sympy_parser = importlib.import_module("sympy.parsing.sympy_parser")
    lambdify_module = importlib.import_module("sympy.utilities.lambdify")  # the package re-exports the function

    originals = [  # kept referenced: ids of freed objects could be reused while we scan
        (sympy_parser.parse_expr, safe_parse_expr_for(sympy, sympy_parser)),
        (sympy_parser.eval_expr, forbidden_stub("eval_expr")),
        (lambdify_module.lambdify, safe_lambdify),
        (importtools.import_module, lambda *args, **kwargs: None),
    ]
    replace = {id(old): new for old, new in originals}
    for name, module in list(sys.modules.items()):
        if module is not None and name.partition(".")[0] in ("sympy", "mpmath"):
            space = vars(module)
            for key, value in list(space.items()):
                if id(value) in replace and not key.startswith("__"):
                    space[key] = replace[id(value)]
    for name in ("eval", "exec", "compile"):  # module globals shadow the builtins inside the parser
        vars(sympy_parser)[name] = forbidden_stub(name)


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
    from .policy import Forbidden

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
