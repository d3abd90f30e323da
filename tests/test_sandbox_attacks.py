"""Adversarial tests of reftune.sandbox, one group per attack class (more in test_sandbox_attacks_*.py).

Every attack returns MARK only if it got through (a forged result, a real module, an evaluated
string, a system call that succeeded); anything else -- a refusal, an error, another value -- means
it was contained. Attacks run in batches interleaved with benign programs whose answers are checked
in the same call and in the next one, and after each batch the zygotes may have no child left but
their shared one and no temp folder but their own. Attacks on the OS layers run with
`_os_layers_only=True`: programs get the real builtins and modules, i.e. what an escaped program has;
they skip where the layer is missing (fail under REFTUNE_REQUIRE_SANDBOX_LAYERS=1).
"""

import os
import socket
import tempfile

import pytest

from reftune.sandbox import ExecResult, ProgramExecutor
from sandbox_support import BENIGN, LIVE, MARK, assert_no_leftovers, children_of, prog, require_layer, run_mixed


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    """A temp root of our own, so that folders of other sandboxes on this machine are not counted."""
    root = tmp_path_factory.mktemp("sandbox-root")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(root))
        yield root


@pytest.fixture(scope="module")
def ex(tmp_root):
    with ProgramExecutor(workers=2, grace=0.3) as executor:
        LIVE.append(executor)
        yield executor
    LIVE.remove(executor)


@pytest.fixture(scope="module")
def ex_os(tmp_root):
    with ProgramExecutor(workers=1, grace=0.3, _os_layers_only=True) as executor:
        executor.run([BENIGN[0][0]])  # start the zygote so that .protections is known
        LIVE.append(executor)
        yield executor
    LIVE.remove(executor)


# ------------------------------------------------------------------ 1. escapes from the Python layer

ESCAPES = {
    # Modules that an allowed package reaches re-export import machinery.
    "stats.rv.import_module": prog("m = sympy.stats.rv.import_module('os')\nreturn MARK if hasattr(m, 'getpid') else 0",
                                   header="import sympy.stats\n"),
    "from stats.rv": prog("return MARK if hasattr(import_module('os'), 'getpid') else 0",
                          header="from sympy.stats.rv import import_module\n"),
    "view attribute": prog("m = sympy.external.importtools.import_module('os')\nreturn MARK if m else 0",
                           header="import sympy\n"),
    "getattr submodule": prog("u = getattr(sympy, 'utilities')\nreturn MARK if u else 0", header="import sympy\n"),
    "lazy import by name": prog("s = __import__('sym' + 'py')\nreturn MARK if hasattr(s, 'utilities') else 0"),
    "lambdify": prog("f = sympy.lambdify(sympy.Symbol('x'), 1)\nreturn MARK if f else 0", header="import sympy\n"),
    "from sympy import lambdify": prog("return MARK", header="from sympy import lambdify\n"),
    # String annotations evaluated by typing.get_type_hints (reached through singledispatch).
    "singledispatch register": prog(
        "return MARK if LOG else 0",
        header="import functools\nLOG = []\n@functools.singledispatch\ndef f(x):\n    return 0\n"
               "@f.register\ndef _(x: 'LOG.append(1) or int'):\n    return 1\n"),
    "from functools import singledispatch": prog("return MARK", header="from functools import singledispatch\n"),
    "singledispatchmethod": prog("return MARK if functools.singledispatchmethod else 0", header="import functools\n"),
    "get_type_hints": prog("typing.get_type_hints(f)\nreturn MARK if LOG else 0",
                           header="import typing\nLOG = []\ndef f(x: 'LOG.append(1) or int'):\n    pass\n"),
    "NamedTuple annotation": prog("P(1)\nreturn MARK if LOG else 1",
                                  header="import typing\nLOG = []\nclass P(typing.NamedTuple):\n    x: 'LOG.append(1) or int'\n"),
    "List[str] forward ref": prog("t = typing.List['LOG.append(1) or int']\nreturn MARK if LOG else 1",
                                  header="import typing\nLOG = []\n"),
    # Names injected into code that dataclasses generates.
    "dataclass annotations": prog(
        "C = type('C', (), {'__annotations__': {'x=LOG.append(1)': int}})\ndataclasses.dataclass(C)\n"
        "return MARK if LOG else 0", header="import dataclasses\nLOG = []\n"),
    "from dataclasses": prog("return MARK if dataclass else 0", header="from dataclasses import dataclass\n"),
    # sympy's own string evaluators.
    "sympify locals": prog("try:\n    sympy.sympify('LOG.append(1)', locals={'LOG': LOG})\nexcept Exception:\n    pass\n"
                           "return MARK if LOG else 1", header="import sympy\nLOG = []\n"),
    "S() subclasses": prog("return MARK if isinstance(sympy.S('().__class__.__base__.__subclasses__()'), list) else 0",
                           header="import sympy\n"),
    "sympify import": prog("r = sympy.sympify(\"__import__('os').getpid()\")\nreturn MARK if isinstance(r, int) else 0",
                           header="import sympy\n"),
    "Matrix string": prog("try:\n    sympy.Matrix('LOG.append(1)')\nexcept Exception:\n    pass\nreturn MARK if LOG else 1",
                          header="import sympy\nLOG = []\n"),
    "evalf lambdify names": prog(
        "n = sympy.Symbol('n')\ntry:\n    sympy.N(sympy.Sum(1 / (n**2 + sympy.Symbol('LOG.append(1) or 1')), (n, 1, sympy.oo)))\n"
        "except Exception:\n    pass\nreturn MARK if LOG else 1", header="import sympy\nLOG = []\n"),
    # Getattr gadgets and real objects handed out by errors.
    "AttributeError.obj": prog("try:\n    statistics.nothing\nexcept AttributeError as e:\n    m = e.obj\n"
                               "    return MARK if hasattr(m, 'sys') else 0", header="import statistics\n"),
    "getattr obj": prog("try:\n    statistics.nothing\nexcept AttributeError as e:\n    return MARK if getattr(e, 'obj', 0) else 0",
                        header="import statistics\n"),
    "Formatter": prog("return MARK if string.Formatter().get_field('0.__class__', [()], {}) else 0", header="import string\n"),
    "update_wrapper": prog("class C:\n    pass\nc = functools.update_wrapper(C(), statistics.mean, assigned=('__globals__',), updated=())\n"
                           "return MARK", header="import functools, statistics\n"),
    "attrgetter": prog("return MARK if operator.attrgetter('__class__.__base__')(()) else 0", header="import operator\n"),
    "methodcaller": prog("return MARK if operator.methodcaller('__reduce_ex__', 2)(1) else 0", header="import operator\n"),
    "statistics.sys": prog("return MARK if statistics.sys.modules['os'] else 0", header="import statistics\n"),
    "module internals": prog("return MARK if random._os else 0", header="import random\n"),
    "eval": prog("return eval(\"'PW' + 'NED'\")"),
    "exec": prog("exec(\"LOG.append(1)\")\nreturn MARK if LOG else 0", header="LOG = []\n"),
    "compile": prog("return MARK if compile('1', 'x', 'eval') else 0"),
    "builtins import": prog("return MARK if __builtins__['__import__']('os') else 0"),
    "subclasses": prog("return MARK if ().__class__.__base__.__subclasses__() else 0"),
    "frames": prog("g = (i for i in [1])\nreturn MARK if g.gi_frame.f_builtins else 0"),
    "match class": prog("match ():\n    case object(__class__=c):\n        return MARK"),
    "module type": prog("class M(type(math)):\n    pass\nreturn MARK if hasattr(M('os'), 'getpid') else 0", header="import math\n"),
    "vars module": prog("return MARK if vars(math) else 0", header="import math\n"),
    "format walk": prog("s = '{0.__globals__}'.format(statistics.mean)\nreturn MARK if callable(s) else 0",
                        header="import statistics\n"),
}  # fmt: skip


def test_python_layer_escapes_are_contained(ex, tmp_root):
    attacks = [program.replace("MARK", repr(MARK)) for program in ESCAPES.values()]
    results = run_mixed(ex, tmp_root, attacks)
    for name, result in zip(ESCAPES, results):
        assert result.value in (None, 0, 1), (name, result)
        if result.value is None:
            assert result.reason.startswith(("forbidden:", "error:")), (name, result)
    # The refusals come from the allow-list, not from a list of known names.
    assert results[list(ESCAPES).index("stats.rv.import_module")].reason == "forbidden: import sympy.stats"
    assert results[list(ESCAPES).index("view attribute")].reason == "forbidden: sympy.external"
    assert results[list(ESCAPES).index("singledispatchmethod")].reason == "forbidden: functools.singledispatchmethod"


# ------------------------------------------------------------------------------- 2. system calls

# x86_64 numbers; each call is made with arguments under which it would succeed or fail with an
# errno other than EPERM if the filter let it through.
SYSCALLS = {
    "io_uring_setup": "425, 8, ctypes.create_string_buffer(120)",
    "socket AF_UNIX": "41, 1, 1, 0",
    "socket AF_INET": "41, 2, 2, 0",
    "socket AF_NETLINK": "41, 16, 3, 0",
    "socketpair": "53, 1, 1, 0, ctypes.create_string_buffer(8)",
    "bpf": "321, 0, ctypes.create_string_buffer(128), 128",
    "ptrace TRACEME": "101, 0, 0, 0, 0",
    "keyctl": "250, 0, -3, 0",
    "add_key": "248, b'user', b'k', b'v', 1, -2",
    "userfaultfd": "323, 0",
    "perf_event_open": "298, ctypes.create_string_buffer(128), 0, -1, -1, 0",
    "unshare user ns": "272, 0x10000000",
    "memfd_create": "319, b'x', 0",
    "process_vm_readv": "310, os.getppid(), 0, 0, 0, 0, 0",
    "pidfd_open": "434, os.getppid(), 0",
    "kill zygote": "62, os.getppid(), 0",
    "tgkill zygote": "234, os.getppid(), os.getppid(), 0",
    "fork": "57",
    "clone process": "56, 17, 0, 0, 0, 0",
    "execve": "59, b'/bin/true', 0, 0",
    "setsid": "112",
    "setpgid": "109, 0, 0",
    "prctl dumpable": "157, 4, 1, 0, 0, 0",
    "fcntl F_SETOWN": "72, 0, 8, os.getppid()",
    "ioctl TIOCGWINSZ": "16, 0, 0x5413, ctypes.create_string_buffer(8)",
    "shmget": "29, 0, 4096, 0o1600",
    "msgget": "68, 0, 0o1600",
    "mknod fifo": "133, b'fifo', 0o10600, 0",
    "symlink": "88, b'/etc/passwd', b'link'",
    "chmod": "90, b'.', 0o777",
    "setrlimit AS": "160, 9, ctypes.create_string_buffer(16)",
    "mount": "165, b'none', b'.', b'tmpfs', 0, 0",
}  # fmt: skip
SYSCALL_PROGRAM = """import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def solution():
    rc = libc.syscall({args})
    return {mark!r} if rc >= 0 else ctypes.get_errno()
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
def test_system_calls_outside_the_allow_list_fail(ex_os, tmp_root):
    require_layer(ex_os, "seccomp")
    attacks = [SYSCALL_PROGRAM.format(args=args, mark=MARK) for args in SYSCALLS.values()]
    results = run_mixed(ex_os, tmp_root, attacks, benign=BENIGN[:8])  # sympy is importable there too
    for name, result in zip(SYSCALLS, results):
        assert result == ExecResult(1, ""), (name, result)  # EPERM from the filter, not from the kernel


def test_unix_socket_outside_receives_nothing(ex_os, tmp_root, tmp_path):
    path = str(tmp_path / "outside.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    listener.setblocking(False)
    attempts = [
        prog(f"s = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.sendall(b'x')\nreturn {MARK!r}",
             header="import socket\n"),
        prog(f"s = socket.socket(socket.AF_UNIX)\ns.connect('\\0reftune-test-abstract')\nreturn {MARK!r}",
             header="import socket\n"),
        prog(f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"fd = libc.syscall(425, 8, ctypes.create_string_buffer(120))\nreturn {MARK!r} if fd >= 0 else -1"),
        prog(f"open({path!r}, 'wb')\nreturn {MARK!r}"),
    ]  # fmt: skip
    try:
        results = run_mixed(ex_os, tmp_root, attempts, benign=BENIGN[:8])
        assert all(r.value in (None, -1) for r in results), results
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_files_and_proc_outside_are_closed(ex_os, tmp_root, tmp_path):
    require_layer(ex_os, "landlock-fs")
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    attempts = [
        prog(f"return {MARK!r} if 'hunter2' in open({str(secret)!r}).read() else 0"),
        prog(f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\nreturn {MARK!r}"),
        prog(f"return {MARK!r} if open(f'/proc/{{os.getppid()}}/environ').read() is not None else 0", header="import os\n"),
        prog(f"return {MARK!r} if os.listdir(f'/proc/{{os.getppid()}}/fd') else 0", header="import os\n"),
        prog(f"return {MARK!r} if open('/proc/self/mem', 'rb') else 0"),
        prog(f"return {MARK!r} if open('/dev/tty', 'wb') else 0"),
        prog(f"return {MARK!r} if open('/etc/passwd').read() else 0"),
    ]  # fmt: skip
    results = run_mixed(ex_os, tmp_root, attempts, benign=BENIGN[:8])
    assert all(r.reason.startswith("error:") for r in results), results
    assert not (tmp_path / "new.txt").exists()


# ---------------------------------------------------------------------------- 3. forged results

_FRAME = "lambda obj: (lambda d: struct.pack('>I', len(d)) + d)(json.dumps(obj).encode())"
FORGERIES = {
    # Fake zygote frames ("results of the batch's later programs") on every descriptor number.
    "all fds, parent format": prog(
        f"frame = {_FRAME}\nfor fd in range(64):\n    for k in range(40):\n        try:\n"
        "            os.write(fd, frame({'i': k, 'v': 999999, 'r': ''}))\n        except OSError:\n            pass\nreturn 7",
        header="import json, os, struct\n"),
    # The zygote's descriptors (its socket to the parent, the pipes) through /proc.
    "proc fds": prog(
        f"frame = {_FRAME}\nopened = 0\nfor pid in (os.getppid(), 1):\n    for base in (f'/proc/{{pid}}/fd', f'/proc/{{pid}}/task/{{pid}}/fd'):\n"
        "        for fd in range(64):\n            try:\n                with open(f'{base}/{fd}', 'wb') as f:\n"
        "                    f.write(frame({'i': 0, 'v': 999999, 'r': ''}))\n                    opened += 1\n"
        "            except OSError:\n                pass\n"
        f"return {MARK!r} if opened else 0", header="import json, os, struct\n"),
    # The result, then more frames for "the next programs", then it keeps running.
    "frame then more": prog(
        f"frame = {_FRAME}\nfd = [fd for fd in range(3, 64) if fd_ok(fd)][0]\nos.write(fd, frame({{'v': 8, 'r': ''}}))\n"
        "for k in range(20):\n    os.write(fd, frame({'v': 999999, 'r': ''}))\ntime.sleep(5)",
        header="import json, os, struct, time\ndef fd_ok(fd):\n    try:\n        os.fstat(fd)\n        return True\n"
               "    except OSError:\n        return False\n"),
}  # fmt: skip
MALFORMED = {  # written to the program's own pipe: each must be an error for that program only
    "huge length": "b'\\x7f\\xff\\xff\\xff'",
    "not json": "struct.pack('>I', 9) + b'not json!'",
    "not a dict": "frame([1, 2])",
    "list value": "frame({'v': [1, 2], 'r': ''})",
    "long string": "frame({'v': 'x' * 20000, 'r': ''})",
    "no reason": "frame({'v': 1})",
    "reason not str": "frame({'v': 1, 'r': 5})",
    "truncated": "frame({'v': 1, 'r': ''})[:-3]",
}
MALFORMED_PROGRAM = prog(
    "fd = [fd for fd in range(3, 64) if fd_ok(fd)][0]\nos.write(fd, {data})\nos._exit(0)",
    header="import json, os, struct\ndef fd_ok(fd):\n    try:\n        os.fstat(fd)\n        return True\n"
           f"    except OSError:\n        return False\nframe = {_FRAME}\n",
)  # fmt: skip


def test_forged_frames_reach_no_other_program(ex_os, tmp_root):
    results = run_mixed(ex_os, tmp_root, list(FORGERIES.values()), benign=BENIGN[:8], timeout=1.0)
    named = dict(zip(FORGERIES, results))
    assert named["frame then more"] == ExecResult(8, "")  # its own first frame, nothing more
    assert named["proc fds"].value == 0
    assert named["all fds, parent format"].reason in ("", "crashed")  # its own result only


def test_malformed_frames_are_errors_of_their_program_only(ex_os, tmp_root):
    attacks = [MALFORMED_PROGRAM.format(data=data) for data in MALFORMED.values()]
    results = run_mixed(ex_os, tmp_root, attacks, benign=BENIGN[:8])
    assert results == [ExecResult(None, "crashed")] * len(MALFORMED), results


def test_results_cannot_be_forged_without_an_escape(ex, tmp_root):
    forged = '\x00\x00\x00\x1a{"i": 1, "v": 999999, "r": ""}'
    attacks = [prog(f"print({forged!r})\nreturn 3"), prog(f"return {forged!r}")]
    results = run_mixed(ex, tmp_root, attacks)
    assert results == [ExecResult(3, ""), ExecResult(forged, "")]


# ------------------------------------------------------------------ 4. state across programs

# Each tries to change what a later program computes, without any escape.
POISON = {
    "module type attribute": prog("type(math).sqrt = property(lambda self: (lambda x: -1.0))\nreturn math.sqrt(16)",
                                  header="import math\n"),
    "module type getattr": prog("type(math).__getattr__ = lambda self, name: 0\nreturn 1", header="import math\n"),
    "view setattr": prog("math.floor = lambda x: 0\nreturn 1", header="import math\n"),
    "Random methods": prog("random.Random.random = lambda self: 0.5\nrandom.Random.seed = lambda self, *a, **k: None\n"
                           "return random.random()", header="import random\n"),
    "Fraction methods": prog("Fraction.__add__ = lambda a, b: 0\nFraction.limit_denominator = lambda s, m=0: 0\n"
                             "return Fraction(1, 2) + Fraction(1, 3)", header="from fractions import Fraction\n"),
    "decimal context": prog("decimal.getcontext().prec = 2\ndecimal.DefaultContext.prec = 3\nreturn str(decimal.Decimal(1) / 7)",
                            header="import decimal\n"),
    "statistics class": prog("statistics.NormalDist.mean = property(lambda s: 0)\nreturn 1", header="import statistics\n"),
    "Counter method": prog("collections.Counter.most_common = lambda self, n=None: []\nreturn 1", header="import collections\n"),
    "sympy class": prog("sympy.Integer.__add__ = lambda a, b: 0\nsympy.Symbol.__add__ = lambda a, b: 0\nreturn 1",
                        header="import sympy\n"),
    "sympy singleton": prog("sympy.S.Half = 0\nreturn 1", header="import sympy\n"),
    "builtins dict": prog("__builtins__['len'] = lambda x: 0\n__builtins__['__import__'] = None\nreturn len([1])"),
    "del in a cycle": prog("a = Slow()\na.me = a\nreturn 1",
                           header="import math\nclass Slow:\n    def __del__(self):\n        type(math).sqrt = property(lambda s: (lambda x: 0))\n"
                                  "        while True:\n            pass\n"),
    "del storm": prog("for i in range(2000):\n    a = Heavy()\n    a.me = a\nreturn 2",
                      header="class Heavy:\n    def __del__(self):\n        self.junk = [0] * 10 ** 5\n"),
    "mutable default": prog("acc.append(1)\nreturn len(acc)", header="acc = []\n"),
}  # fmt: skip
# The benign programs each poisoning targets (checked right after it, and again in the next call).
CHECKS = [
    (prog("return math.sqrt(16) + math.floor(2.5)", header="import math\n"), 6.0),
    (prog("return random.random()", header="import random\n"), 0.8444218515250481),
    (prog("random.seed(42)\nreturn random.randint(1, 1000)", header="import random\n"), 655),
    (prog("return Fraction(1, 2) + Fraction(1, 3)", header="from fractions import Fraction\n"), 5 / 6),
    (prog("return Fraction(1, 3).limit_denominator(10) * 3", header="from fractions import Fraction\n"), 1.0),
    (prog("return str(Decimal(1) / 7)", header="from decimal import Decimal\n"), "0.1428571428571428571428571429"),
    (prog("return NormalDist(5, 1).mean", header="from statistics import NormalDist\n"), 5.0),
    (prog("return str(Counter('aab').most_common(1))", header="from collections import Counter\n"), "[('a', 2)]"),
    (prog("return sympy.Integer(2) + 3 + sympy.S.Half", header="import sympy\n"), 5.5),
    (prog("return len([1, 2, 3])"), 3),
    (prog("acc.append(1)\nreturn len(acc)", header="acc = []\n"), 1),
]  # fmt: skip


def test_no_program_changes_a_later_one(ex, tmp_root):
    results = run_mixed(ex, tmp_root, list(POISON.values()), benign=CHECKS, timeout=1.0)
    named = dict(zip(POISON, results))
    assert named["module type attribute"].value == -1.0  # it changed its own world only
    assert named["view setattr"].reason == "error: AttributeError: sandboxed modules are read-only"
    assert named["decimal context"].value == "0.14"
    assert named["mutable default"].value == 1
    assert named["del in a cycle"].value in (1, None)  # its own __del__ may cost it its own timeout
    assert named["del storm"].value in (2, None)


def test_threads_and_files_die_with_their_program(ex_os, tmp_root):
    # A thread that keeps burning CPU and writing, and files and folders in the temp dir.
    spinner = prog(
        "def spin():\n    while True:\n        with open('beat.txt', 'a') as f:\n            f.write('x')\n"
        "threading.Thread(target=spin, daemon=True).start()\ntime.sleep(0.05)\nreturn 1",
        header="import threading, time\n")  # fmt: skip
    writer = prog("os.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('x')\nopen('left.txt', 'w').write('x')\nreturn 2",
                  header="import os\n")  # fmt: skip
    looker = prog("time.sleep(0.1)\nreturn str(sorted(os.listdir('.')))", header="import os, time\n")
    failing = spinner.replace("return 1", "raise ValueError('after starting the thread')")
    results = ex_os.run([spinner, looker, writer, looker, failing, looker])
    assert results == [ExecResult(1, ""), ExecResult("[]", ""), ExecResult(2, ""), ExecResult("[]", ""),
                       ExecResult(None, "error: ValueError: after starting the thread"), ExecResult("[]", "")]  # fmt: skip
    assert children_of(set(ex_os.worker_pids())) == []  # every forked child is gone
    assert_no_leftovers(ex_os, tmp_root)


def test_lazy_modules_do_not_depend_on_history(tmp_root):
    """Whether the zygote imported sympy for an earlier program must not change what a later one can
    do: neither its imports nor its memory headroom."""
    dynamic = prog("return __import__('sym' + 'py').pi")
    big = prog("b = bytearray(300 * 2 ** 20)\nreturn len(b) // 2 ** 20")
    with ProgramExecutor(workers=1) as fresh:
        alone = fresh.run([dynamic, big], memory_mb=400)
    with ProgramExecutor(workers=1) as used:
        after = used.run([BENIGN[8][0], dynamic, big], memory_mb=400)[1:]
    assert alone == after == [ExecResult(None, "forbidden: import sympy"), ExecResult(300, "")]
