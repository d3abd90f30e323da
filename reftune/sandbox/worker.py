"""Worker process of :mod:`reftune.sandbox` (read that module's docstring for the threat model).

Started by the parent as ``python -s -B worker.py CONFIG_JSON`` with a scrubbed environment
and a fresh temp dir as cwd. Standard library only: it must never import ``reftune`` (whose
``__init__`` may pull in torch) nor anything heavy that no program asked for.

Protocol (both ways: 4-byte big-endian length + UTF-8 JSON; fds 0/1 are moved aside at start):
  parent -> worker  {"jobs": [[index, program], ...], "timeout": s, "entry": "solution"}
  worker -> parent  {"hello": pid, "prot": [...]} once; then per job, in order:
                    {"i": index, "ev": "import"} / {"i": index, "ev": "start"} around slow imports,
                    {"i": index, "v": value, "r": reason} when it is done.
Importing this module (as the parent does, for DEFAULT_MODULES) has no side effects.
"""

import sys

if __name__ == "__main__" and not getattr(sys.flags, "safe_path", False):
    del sys.path[0]  # the script's folder (reftune/) must not shadow stdlib modules

import ast
import builtins
import json
import operator
import os
import signal
import struct
import types

# Importable by programs. Stdlib ones are pre-imported at worker start (~50 ms); the _LAZY ones
# (sympy: 0.3-1 s) when a program first imports them, outside that program's timeout.
DEFAULT_MODULES = (
    "math", "cmath", "fractions", "decimal", "numbers", "statistics", "random", "itertools",
    "functools", "operator", "collections", "heapq", "bisect", "array", "copy", "string", "re",
    "datetime", "time", "enum", "dataclasses", "typing", "abc", "textwrap", "sympy",
)  # fmt: skip
_LAZY = {"sympy", "mpmath", "numpy", "scipy"}
# Sub-packages of allowed modules that are not importable: file/process/eval gadgets, or too big to audit.
_BLOCKED_MODULES = (
    "sympy.utilities", "sympy.plotting", "sympy.interactive", "sympy.testing", "sympy.external",
    "sympy.parsing", "sympy.printing.preview", "sympy.codegen", "sympy.benchmarks",
    "numpy.ctypeslib", "numpy.f2py", "numpy.distutils", "numpy.testing", "numpy.lib", "numpy.typing",
)  # fmt: skip
# Public names that are gadgets, by top-level package.
_BLOCKED_NAMES = {
    "string": {"Formatter"},  # Formatter().get_field() is a getattr that ignores the attribute rule
    "typing": {"get_type_hints", "ForwardRef"},  # they eval annotation strings with real builtins
    "sympy": {"lambdify", "preview", "plot", "plot_implicit", "plot_parametric", "plot_backends",
              "textplot", "test", "doctest", "init_session", "init_printing", "interactive_traversal",
              "pager_print", "print_gtk", "source", "timed", "utilities", "parsing"},
    "numpy": {"load", "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt",
              "fromfile", "fromregex", "memmap", "DataSource", "ctypeslib", "lib", "show_config"},
}  # fmt: skip
# The attribute rule. Frames and code lead to real globals/builtins; names starting with "_" are refused
# too (__class__, __subclasses__, __globals__, __self__, __dict__, random._os, ForwardRef._evaluate...)
# except protocol dunders, which only compute values, and namedtuple's API.
_BLOCKED_ATTRS = frozenset(
    "gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await ag_frame ag_code ag_await f_globals "
    "f_locals f_builtins f_back f_code tb_frame tb_next co_code tofile dump".split()
)
_ALLOWED_UNDERSCORE = frozenset(
    "_asdict _replace _fields _make _field_defaults".split()
    + [f"__{n}__" for n in (
        "init new call post_init name qualname doc module str repr format hash bool len iter next "
        "reversed contains getitem setitem delitem missing enter exit eq ne lt le gt ge neg pos abs "
        "invert int float complex index round trunc floor ceil").split()]
    + [f"__{p}{n}__" for p in ("", "r", "i") for n in (
        "add sub mul matmul truediv floordiv mod divmod pow lshift rshift and or xor").split()]
)  # fmt: skip
_SAFE_BUILTINS = (
    "abs all any ascii bin bool bytearray bytes callable chr classmethod complex dict dir divmod "
    "enumerate filter float format frozenset hasattr hash hex id int isinstance issubclass iter len "
    "list map max min next object oct ord pow print property range repr reversed round set slice "
    "sorted staticmethod str sum super tuple type zip memoryview NotImplemented Ellipsis __build_class__"
).split()
_FORBIDDEN_BUILTINS = "open compile input breakpoint help exit quit globals locals vars".split()
MAX_STR = 10_000  # longer string results -> "output too large"
# A worker's whole environment (no tokens, HOME, PATH): thread caps for BLAS-backed libraries, fixed
# str hashing (set order, hence str() of results, is the same in every worker), no script dir on path.
KEEP_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0", "PYTHONSAFEPATH": "1"}  # fmt: skip


class _Forbidden(Exception):
    """A policy refusal, reported as "forbidden: <what>"."""


class _ForbiddenImport(_Forbidden, ImportError):  # so `try: import numpy / except ImportError` works
    pass


class _ForbiddenAttr(_Forbidden, AttributeError):
    pass


class _Timeout(BaseException):  # BaseException: a program's `except Exception:` does not swallow it
    pass


# ---------------------------------------------------------------------------------------------------
# Python-level policy: static check, restricted import, read-only module proxies, restricted builtins.

_CONFIG = {"modules": frozenset(DEFAULT_MODULES)}
_PROXIES = {}
_CURRENT_BUILTINS = None  # the running program's builtins (eval/exec inside it keep them)


def _attr_blocked(name):
    if not isinstance(name, str):
        return True
    return name in _BLOCKED_ATTRS or name.startswith("_") and name not in _ALLOWED_UNDERSCORE


def _module_allowed(name):
    blocked = any(name == p or name.startswith(p + ".") for p in _BLOCKED_MODULES)
    return name.partition(".")[0] in _CONFIG["modules"] and not blocked


def _name_blocked(module, name):
    return name.startswith("_") or name in _BLOCKED_NAMES.get(module.partition(".")[0], ())


def check_tree(tree):
    """Refuse, before anything runs, attribute access that leads to interpreter internals."""
    for node in ast.walk(tree):
        names = ()
        if isinstance(node, ast.Attribute):
            names = (node.attr,)
        elif isinstance(node, ast.MatchClass):  # `case C(__class__=x)` is a getattr too
            names = node.kwd_attrs
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise _ForbiddenImport("relative import")
            for alias in node.names:
                if alias.name != "*" and _name_blocked(node.module or "", alias.name):
                    raise _ForbiddenImport(f"from {node.module} import {alias.name}")
        for name in names:
            if _attr_blocked(name):
                raise _ForbiddenAttr(f"attribute .{name}")


class _ModuleProxy:
    """Read-only view of an allowed module: public attributes, submodules proxied in turn.

    Read-only so that a program cannot monkeypatch `math.floor` for the next one in this worker.
    """

    __slots__ = ("__sb_mod__",)  # no __init__: `type(math).__init__(math, x)` must not rebind it

    def __getattr__(self, name):
        mod = self.__sb_mod__
        if _name_blocked(mod.__name__, name):
            raise _ForbiddenAttr(f"{mod.__name__}.{name}")
        value = _OVERRIDES.get((mod.__name__, name)) or getattr(mod, name)
        return _proxy(value) if isinstance(value, types.ModuleType) else value

    def __setattr__(self, name, value):
        raise AttributeError("sandboxed modules are read-only")

    __delattr__ = __setattr__

    def __dir__(self):
        return [n for n in dir(self.__sb_mod__) if not _name_blocked(self.__sb_mod__.__name__, n)]

    @property
    def __all__(self):  # what `from m import *` binds
        mod = self.__sb_mod__
        names = [n for n in getattr(mod, "__all__", None) or dir(mod) if not _name_blocked(mod.__name__, n)]
        return [n for n in names if not isinstance(getattr(mod, n, None), types.ModuleType)
                or _module_allowed(f"{mod.__name__}.{n}")]  # fmt: skip

    def __repr__(self):
        return f"<module {self.__sb_mod__.__name__!r} (sandboxed)>"


def _proxy(module):
    name = module.__name__
    if not _module_allowed(name):
        raise _ForbiddenImport(f"module {name}")
    if name not in _PROXIES:
        _PROXIES[name] = proxy = object.__new__(_ModuleProxy)
        object.__setattr__(proxy, "__sb_mod__", module)
    return _PROXIES[name]


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level or not isinstance(name, str) or not _module_allowed(name):
        raise _ForbiddenImport(f"import {name}")
    # The real import also imports the submodules named in `from m import sub`: only allowed ones.
    safe = tuple(f for f in fromlist or () if f == "*" or _module_allowed(f"{name}.{f}"))
    top = builtins.__import__(name, None, None, safe, 0)
    if name.partition(".")[0] == "sympy":
        _guard_libraries()
    return _proxy(sys.modules[name] if fromlist else top)


def _name_checked(fn, dotted=False):
    """fn (getattr, setattr, delattr, operator.attrgetter/methodcaller) under the attribute rule."""

    def checked(*args, **kwargs):
        names = args if dotted else args[1:2] if fn in (getattr, setattr, delattr) else args[:1]
        if any(_attr_blocked(part) for n in names for part in (str(n).split(".") if dotted else [n])):
            raise _ForbiddenAttr(f"{fn.__name__}{tuple(names)}")
        return fn(*args, **kwargs)

    return checked


_OVERRIDES = {
    ("operator", "attrgetter"): _name_checked(operator.attrgetter, dotted=True),
    ("operator", "methodcaller"): _name_checked(operator.methodcaller),
}


def _compile_checked(source, mode):
    if isinstance(source, types.CodeType):
        return source  # programs cannot obtain code objects (compile, __code__, f_code are refused)
    tree = source if isinstance(source, ast.AST) else ast.parse(source, "<string>", mode)
    check_tree(tree)
    return builtins.compile(tree, "<string>", mode)


def _run_checked(mode, source, globals=None, locals=None):
    """eval/exec for programs, and for the strings libraries (sympify) evaluate on their behalf."""
    code = _compile_checked(source, mode)
    if globals is None:  # like the builtins: the caller's namespace
        frame = sys._getframe(2)
        globals, locals = frame.f_globals, frame.f_locals if locals is None else locals
    safe = globals["__builtins__"] = _CURRENT_BUILTINS or _make_builtins()
    for name, value in list(globals.items()):  # sympy's parse_expr copies real builtins into globals
        if getattr(builtins, name, None) is value and safe.get(name) is not value:
            globals[name] = safe.get(name, _forbidden_stub(name))
    return (builtins.eval if mode == "eval" else builtins.exec)(code, globals, locals)


def _checked_eval(source, globals=None, locals=None):
    return _run_checked("eval", source, globals, locals)


def _checked_exec(source, globals=None, locals=None):
    return _run_checked("exec", source, globals, locals)


def _checked_lib_compile(source, filename="<string>", mode="exec", *args, **kwargs):
    return _compile_checked(source, mode)  # for libraries only: programs have no compile()


def _forbidden_stub(name):
    def stub(*args, **kwargs):
        raise _Forbidden(f"{name}()")

    return stub


def _make_builtins():
    b = {name: getattr(builtins, name) for name in _SAFE_BUILTINS}
    b.update({k: v for k, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)})
    b.update({name: _forbidden_stub(name) for name in _FORBIDDEN_BUILTINS})
    b.update({f.__name__: _name_checked(f) for f in (getattr, setattr, delattr)})
    b.update(__import__=_guarded_import, eval=_checked_eval, exec=_checked_exec)
    return b


_GUARDED_LIBS = ("sympy.parsing.sympy_parser", "sympy.parsing.ast_parser")


def _guard_libraries():
    """sympify()/parse_expr() eval strings with real builtins: make them use the checked versions.

    The parser is imported here (sympy loads it lazily) so that it is patched before any use."""
    if "sympy" in sys.modules and _GUARDED_LIBS[0] not in sys.modules:
        __import__(_GUARDED_LIBS[0])
    for mod in filter(None, map(sys.modules.get, _GUARDED_LIBS)):
        vars(mod).update(eval=_checked_eval, exec=_checked_exec, compile=_checked_lib_compile)


# ---------------------------------------------------------------------------------------------------
# Running one program.


def _describe(exc):
    if isinstance(exc, (_Timeout, MemoryError)):
        return "timeout" if isinstance(exc, _Timeout) else "memory"
    try:
        text = str(exc) if isinstance(exc, _Forbidden) else f"{type(exc).__name__}: {exc}"
    except BaseException:  # a program's exception class with a broken __str__
        text = type(exc).__name__
    return f"{'forbidden' if isinstance(exc, _Forbidden) else 'error'}: {text[:300]}"


def _convert(v):
    """solution()'s return value -> (int | float | str | None, reason). Runs under the timer."""
    if v is None:
        return None, ""
    if isinstance(v, int):  # bool, IntEnum, ... -> int
        v = int(v)
        return (v, "") if v.bit_length() <= 13_000 else (None, "output too large")  # JSON: <= 4300 digits
    if isinstance(v, float):  # incl. numpy.float64
        return float(v), ""
    mod = getattr(type(v), "__module__", "") or ""
    numeric = mod in ("fractions", "decimal") or mod.startswith(("numpy", "sympy")) and getattr(v, "is_number", True)
    if numeric and not isinstance(v, str):
        try:
            return float(v), ""  # Fraction, Decimal, sympy numbers, numpy scalars
        except (TypeError, ValueError, OverflowError):
            pass  # complex, symbolic, arrays: the text
    s = v if isinstance(v, str) else str(v)
    return (str(s), "") if len(s) <= MAX_STR else (None, "output too large")


_ARMED = False


def _on_alarm(signum, frame):
    if _ARMED:
        raise _Timeout()


def run_one(index, program, timeout, entry, send):
    """Run one program; returns (value, reason). `send` tells the parent about slow imports."""
    global _ARMED, _CURRENT_BUILTINS
    try:
        tree = ast.parse(program, "<program>", "exec")
        check_tree(tree)
        code = builtins.compile(tree, "<program>", "exec")
    except BaseException as exc:
        return None, _describe(exc)
    _prepare(index, tree, send)
    _CURRENT_BUILTINS = _make_builtins()
    namespace = {"__builtins__": _CURRENT_BUILTINS, "__name__": "__sandbox__"}
    try:
        _ARMED = True
        signal.setitimer(signal.ITIMER_REAL, timeout, 0.05)  # re-fires if the program catches it
        try:
            exec(code, namespace)  # one namespace: helpers defined next to solution() are visible
            fn = namespace.get(entry)
            return _convert(fn()) if callable(fn) else (None, f"no {entry}()")
        except (_Timeout, MemoryError):
            raise
        except BaseException as exc:
            return None, _describe(exc)  # still under the timer: str(exc) may run program code
        finally:
            _ARMED = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as exc:  # _Timeout / MemoryError, possibly raised inside the finally above
        _ARMED = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        return None, _describe(exc)
    finally:
        _CURRENT_BUILTINS = None


def _prepare(index, tree, send):
    """Import slow allowed modules *before* the timer starts; reset shared library state."""
    nodes = list(ast.walk(tree))
    wanted = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    wanted |= {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
    missing = [m for m in wanted if _module_allowed(m) and m not in sys.modules]
    if missing:
        send({"i": index, "ev": "import"})  # the parent now allows a long import phase
        for name in missing:
            try:
                __import__(name)
                if name.partition(".")[0] == "sympy":  # also warm what programs hit first
                    _guard_libraries()
                    sympy = sys.modules["sympy"]
                    sympy.solve(sympy.Symbol("x") - 1)
            except Exception:
                pass  # the program's own import reports it
        send({"i": index, "ev": "start"})
    # Same result whatever ran before in this worker: fixed RNG seed, default decimal context.
    if "random" in sys.modules:
        sys.modules["random"].seed(0)
    if "decimal" in sys.modules:
        sys.modules["decimal"].setcontext(sys.modules["decimal"].Context())


# ---------------------------------------------------------------------------------------------------
# OS-level hardening. Best effort: a layer the kernel refuses is left out of the hello report.

_SYSCALLS = {  # machine: (audit arch, clone, clone3, kill/tkill/tgkill, denied)
    "x86_64": (0xC000003E, 56, 435, (62, 200, 234), (57, 58, 59, 322, 41, 53, 101, 434, 310, 311)),
    "aarch64": (0xC00000B7, 220, 435, (129, 130, 131), (221, 281, 198, 199, 117, 434, 270, 271)),
}


def _seccomp(libc):
    """EPERM for fork, vfork, execve(at), socket(pair), ptrace, pidfd_open, process_vm_*, clone
    without CLONE_THREAD and signals to other processes; threads still work (clone3 -> ENOSYS)."""
    import ctypes

    arch, clone, clone3, kills, denied = _SYSCALLS[os.uname().machine]
    allow, eperm, enosys = 0x7FFF0000, 0x50000 | 1, 0x50000 | 38
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # classic BPF: A = data[k]; jumps; return
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 syscall numbers
    for nr in denied:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, clone3), (ret, 0, 0, enosys)]  # libc then falls back to clone()
    prog += [(jeq, 0, 3, clone), (ld, 0, 0, 16), (jset, 1, 0, 0x10000), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    for nr in kills:  # first argument must be our own pid
        prog += [(jeq, 0, 4, nr), (ld, 0, 0, 16), (jeq, 1, 0, os.getpid()), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    prog += [(ret, 0, 0, allow)]
    raw = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in prog))
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(raw))
    if libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp")
    return ["seccomp"]


def _landlock(libc, read_paths, rw_path):
    """Read-only: the Python install and system libs; read-write: the temp dir; nothing else.
    No execve anywhere (EXECUTE is never granted), no TCP (ABI >= 4), scoped signals (ABI >= 6)."""
    import ctypes

    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, ..._VERSION)
    if abi < 1:
        raise OSError("no landlock")
    fs_all = (1 << {1: 13, 2: 14}.get(abi, 15 if abi < 5 else 16)) - 1
    attr = struct.pack("=QQQ", fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    attr = attr[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    for path, access in [(p, 4 | 8) for p in read_paths] + [(rw_path, fs_all & ~1)]:  # READ_FILE|READ_DIR
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        access &= fs_all if os.path.isdir(path) else (2 | 4 | 1 << 14)  # a file takes file rights only
        libc.syscall(445, ruleset, 1, struct.pack("=Qi", access, fd), 0)  # landlock_add_rule
        os.close(fd)
    if libc.syscall(446, ruleset, 0) != 0:  # landlock_restrict_self
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    return ["landlock-fs"] + ["landlock-tcp"] * (abi >= 4) + ["landlock-signals"] * (abi >= 6)


def harden(memory_mb):
    """Apply the OS-level limits to this process; returns the names of the layers that took effect."""
    import ctypes
    import resource

    done = []
    for key in set(os.environ) - set(KEEP_ENV):  # the parent passed a minimal env already
        del os.environ[key]
    try:  # private network namespace (no usable interface): root directly, others via a user namespace
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) == 0 or libc.unshare(0x10000000 | 0x40000000) == 0:
            done.append("netns")
    except (OSError, AttributeError):
        libc = None
    for name, value in {"AS": memory_mb << 20, "FSIZE": 1 << 20, "CORE": 0, "NOFILE": 64, "NPROC": 0}.items():
        try:
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
            done += [f"rlimit-{name.lower()}"] if name != "NPROC" or os.geteuid() != 0 else []  # root ignores it
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail (EFBIG) instead of killing us
    if libc is not None and libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS, needed by both below
        read_paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *filter(os.path.isdir, sys.path),
                      "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache"}  # fmt: skip
        for layer in (lambda: _landlock(libc, sorted(read_paths), os.getcwd()), lambda: _seccomp(libc)):
            try:
                done += layer()
            except Exception:
                pass
    # Last line for code that reaches the real os module anyway: take the process tools away.
    for name in ("fork forkpty system popen execv execve execl execle execlp execlpe execvp execvpe "
                 "spawnv spawnve spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe posix_spawn "
                 "posix_spawnp kill killpg putenv unsetenv register_at_fork").split():  # fmt: skip
        vars(os).pop(name, None)
        vars(sys.modules["posix"]).pop(name, None)
    return done


class _Null:
    """sys.stdout/stderr of programs: what they print is discarded (it cannot fill a pipe)."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def main():
    import resource

    config = json.loads(sys.argv[1])
    _CONFIG["modules"] = frozenset(config["modules"])
    fd_in, fd_out = os.dup(0), os.dup(1)  # the protocol; fds 0-2 become /dev/null for programs
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    sys.stdin = sys.stdout = sys.stderr = _Null()
    for name in _CONFIG["modules"] - _LAZY:
        try:
            __import__(name)
        except ImportError:
            pass
    if "" in sys.path:
        sys.path.remove("")
    signal.signal(signal.SIGALRM, _on_alarm)

    def send(obj):
        data = json.dumps(obj).encode()
        data = struct.pack(">I", len(data)) + data
        while data:
            data = data[os.write(fd_out, data) :]

    def recv():  # the parent sends one batch, then waits for all its results
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            chunk = os.read(fd_in, 1 << 16)
            if not chunk:
                return None
            buf += chunk
        return json.loads(buf[4:])

    send({"hello": os.getpid(), "prot": harden(int(config["memory_mb"]))})
    while (msg := recv()) is not None:
        for index, program in msg["jobs"]:
            # RLIMIT_CPU backstop: should a C-level loop ignore the alarm, the kernel kills us (SIGXCPU).
            used = resource.getrusage(resource.RUSAGE_SELF)
            cpu = int(used.ru_utime + used.ru_stime + msg["timeout"]) + 2
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.RLIM_INFINITY))
            if config.get("os_layers_only"):  # tests of the OS layers: real builtins, no Python policy
                namespace = {"__name__": "__sandbox__"}
                try:
                    exec(program, namespace)
                    value, reason = _convert(namespace[msg["entry"]]())
                except BaseException as exc:
                    value, reason = None, _describe(exc)
            else:
                value, reason = run_one(index, program, float(msg["timeout"]), msg["entry"], send)
            send({"i": index, "v": value, "r": reason})


if __name__ == "__main__":
    main()
