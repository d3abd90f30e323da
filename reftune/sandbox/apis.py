"""What programs get from each allowed module: an allow-list of public names (data only; sympy's own
string evaluators are closed by `harden.py`).

Imports nothing (not even its siblings). An allow-list rather than a block-list: a name a module gains
in a new version, or a submodule that re-exports import machinery (``sympy.stats.rv.import_module``),
is simply not there. Left out on purpose: everything that evaluates strings or generates code
(``functools.singledispatch`` -> ``typing.get_type_hints``, ``dataclasses``, ``string.Formatter``,
``sympy.lambdify``/``nsolve``/``parse_expr``/``var``, printing to files, plotting), attribute walkers
(``functools.wraps``/``update_wrapper`` copy attributes by name), ``random.SystemRandom`` (not
reproducible), and clock setters.
"""


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
