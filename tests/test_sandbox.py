"""Adversarial tests of reftune.sandbox: one hostile program per property, each followed by a good one.

Short timeouts keep the file fast. Tests of the OS layers (Landlock, seccomp,
network namespace) use `_os_layers_only=True` -- programs then get the real builtins and `os`, which is
what an escaped program would have -- and skip when this kernel did not apply the layer (fail under
REFTUNE_REQUIRE_SANDBOX_LAYERS=1, see sandbox_support.py).
"""

import os
import signal
import time

import pytest

from reftune import sandbox
from reftune.sandbox import ExecResult, ProgramExecutor
from sandbox_support import layer_in_force, require_layer

GOOD = "def solution():\n    return 41 + 1\n"


def prog(body: str, header: str = "") -> str:
    """A `def solution():` program with `body` (dedented lines) as its body."""
    return header + "def solution():\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines())


@pytest.fixture(scope="module")
def ex():
    with ProgramExecutor(workers=2, grace=0.3) as executor:
        yield executor


@pytest.fixture(scope="module")
def ex_os():
    with ProgramExecutor(workers=1, grace=0.3, _os_layers_only=True) as executor:
        executor.run([GOOD])  # start the worker so that .protections is known
        yield executor


def run_then_good(ex, program, **kw):
    """Run `program` followed by a good one; the good one must always survive."""
    bad, good = ex.run([program, GOOD], **kw)
    assert good == ExecResult(42, ""), good
    return bad


def test_blank_lines_and_top_level_helper(ex):
    program = (
        'def solution():\n    """tyler had 29 species ..."""\n    num_species = 29\n\n'
        "    pairs = pairs_per(num_species)\n\n\n    result = pairs\n    return result\n\n"
        "def pairs_per(n):\n    return n * SEVEN\n\nSEVEN = 7\n"
    )
    assert ex.run([program]) == [ExecResult(203, "")]
    assert sandbox.run_program(program).value == 203  # the default pool too


def test_values_are_converted(ex):
    cases = {
        "return 1 / 4": 0.25,
        "return True": 1,
        "return 'abc'": "abc",
        "return (1, 2)": "(1, 2)",
        "import math\nreturn math.sqrt(16)": 4.0,
        "from fractions import Fraction\nreturn Fraction(3, 4)": 0.75,
        "from decimal import Decimal\nreturn Decimal('2.5')": 2.5,
        "import sympy\nx = sympy.Symbol('x')\nreturn sympy.solve(sympy.Eq(2 * x, 7), x)[0]": 3.5,
        "from sympy import Rational, sqrt\nreturn Rational(1, 8) + sqrt(4)": 2.125,
        "import sympy\nreturn sympy.Symbol('y') + 1": "y + 1",
        "import sympy\nreturn sympy.sympify('2*3 + 1')": 7.0,
        "return eval('6 * 7')": None,  # no evaluator of strings (forbidden)
        "return 10 ** 5000": None,
        "return 'x' * 20000": None,
    }
    results = ex.run([prog(body) for body in cases])
    assert [r.value for r in results] == list(cases.values())
    assert [type(r.value) for r in results[:3]] == [float, int, str]
    assert results[-1].reason == results[-2].reason == "output too large"
    star = prog("x = symbols('x')\nreturn solve(Eq(3 * x, 2 * pi), x)[0]", header="from sympy import *\n")
    assert abs(ex.run([star])[0].value - 2.0943951) < 1e-6
    none = ex.run([prog("pass"), "x = 1\n"])
    assert none == [ExecResult(None, ""), ExecResult(None, "no solution()")]
    assert not none[1].ok and none[0].ok


def test_hang_times_out_and_next_program_runs(ex):
    assert run_then_good(ex, prog("while True:\n    pass"), timeout=0.5).reason == "timeout"
    # A program that swallows the timeout exception is killed by the parent at timeout + grace.
    swallow = prog("while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass")
    assert run_then_good(ex, swallow, timeout=0.5).reason == "timeout"
    # CPU work inside one C call ignores the alarm too (the parent kills the worker).
    assert run_then_good(ex, prog("return 10 ** 10 ** 8"), timeout=0.5).reason == "timeout"


def test_stdout_flood_is_discarded(ex):
    assert run_then_good(ex, prog("for i in range(200000):\n    print('spam' * 100)\nreturn 7")).value == 7
    assert run_then_good(ex, prog("while True:\n    print('x' * 10000)"), timeout=0.5).reason == "timeout"


def test_memory_bomb(ex):
    # A fresh child faults in every page it fills: a small limit keeps the bombs fast on a busy machine.
    for bomb in ("x = [0] * 10 ** 10\nreturn 1", "s = 'ab'\nwhile True:\n    s += s",
                 "x = []\nwhile True:\n    x.append(bytearray(10 ** 6))",
                 "x = []\nwhile True:\n    x.append([0] * 10 ** 5)"):  # fmt: skip
        assert run_then_good(ex, prog(bomb), memory_mb=128).reason == "memory"


@pytest.mark.parametrize(
    "body",
    ["raise SystemExit(0)", "exit(0)", "quit()", "import sys\nsys.exit(1)", "import os\nos._exit(1)",
     "__import__('os')._exit(1)", "raise KeyboardInterrupt"],
)  # fmt: skip
def test_exit_attempts_fail_cleanly(ex, body):
    bad = run_then_good(ex, prog(body))
    assert bad.value is None and bad.reason.startswith(("error:", "forbidden:")), bad


def test_infinite_recursion(ex):
    assert run_then_good(ex, prog("return solution()")).reason.startswith("error: RecursionError")


@pytest.mark.parametrize(
    "module", ["os", "sys", "subprocess", "socket", "ctypes", "shutil", "pathlib", "io", "builtins",
               "importlib", "multiprocessing", "signal", "posix", "sympy.utilities.source", "numpy"],
)  # fmt: skip
def test_dangerous_imports_are_forbidden(ex, module):
    assert run_then_good(ex, prog(f"import {module}\nreturn 1")).reason == f"forbidden: import {module}"
    assert ex.run([prog(f"return __import__({module!r})")])[0].reason == f"forbidden: import {module}"


def test_forbidden_import_can_be_caught(ex):
    fallback = prog("try:\n    import os\nexcept ImportError:\n    return 5")
    assert ex.run([fallback]) == [ExecResult(5, "")]


def test_files_cannot_be_read_or_written(ex, tmp_path):
    target = tmp_path / "written.txt"
    programs = [
        prog("return open('/etc/passwd').read()"),
        prog(f"open({str(target)!r}, 'w').write('x')\nreturn 1"),
        prog("return __builtins__['open']('/etc/passwd').read()"),
        prog("import io\nreturn io.open('/etc/passwd').read()"),
    ]
    for result in ex.run(programs):
        assert result.value is None and result.reason.startswith("forbidden:"), result
    assert not target.exists()


def test_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("REFTUNE_SECRET", "hunter2")  # set before the workers start
    attempts = [prog("import os\nreturn os.environ['REFTUNE_SECRET']"),
                prog("return __import__('os').getenv('REFTUNE_SECRET')"),
                prog("import sympy\nreturn sympy.sympify(\"__import__('os').environ['REFTUNE_SECRET']\")")]  # fmt: skip
    with ProgramExecutor(workers=1) as executor:
        results = executor.run(attempts)
        assert all(r.value is None and r.reason.startswith("forbidden:") for r in results), results
        try:
            with open(f"/proc/{executor.worker_pids()[0]}/environ", "rb") as f:  # the OS-level view
                environ = f.read()
        except PermissionError:  # non-root: the zygote is non-dumpable, its /proc files are closed
            environ = b""
    assert b"REFTUNE_SECRET" not in environ and b"hunter2" not in environ
    with ProgramExecutor(workers=1, _os_layers_only=True) as executor:  # even with the real os module
        assert executor.run([prog("import os\nreturn sorted(os.environ)")])[0].value.count("SECRET") == 0


def test_subclasses_and_other_escapes_cannot_reach_os_system(ex, tmp_path):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    escapes = [  # each would call os.system(cmd) if it got hold of it
        f"for c in ().__class__.__base__.__subclasses__():\n    if c.__name__ == '_wrap_close':\n"
        f"        c.__init__.__globals__['system']({cmd!r})",
        f"getattr(getattr((), '__cl' + 'ass__'), '__ba' + 'se__')",
        f"import operator\noperator.attrgetter('__class__.__base__')(())",
        f"import string\nstring.Formatter().get_field('0.__class__', [()], {{}})",
        f"g = (i for i in [1])\ng.gi_frame.f_builtins['__import__']('os').system({cmd!r})",
        f"import random\nrandom._os.system({cmd!r})",
        f"import collections\ncollections._sys.modules['os'].system({cmd!r})",
        f"import sympy\nsympy.sympify(\"__import__('os').system({cmd!r})\")",
        f"import sympy\nsympy.sympify(\"().__class__.__base__.__subclasses__()\")",
        f"exec(\"import os\\nos.system({cmd!r})\")",
        f"eval(\"().__class__\", {{}})",
        f"match ():\n    case object(__class__=c):\n        return c",
        f"import typing\ntyping.get_type_hints(solution)",
        f"from sympy import lambdify\nreturn lambdify",
    ]
    results = ex.run([prog(body) for body in escapes])
    for body, result in zip(escapes, results):
        assert result.value is None and result.reason.startswith("forbidden:"), (body, result)
    assert not marker.exists()
    rebind = ex.run([prog("import math\ntype(math).__init__(math, 1)"), prog("import math\nreturn math.pi")])
    assert rebind[0].reason.startswith("error: TypeError") and rebind[1].value == 3.141592653589793
    # str.format walks the attributes its template names: only literal templates, under the attribute rule.
    walks = ex.run([prog("return '{0.__class__}'.format(())"), prog("t = '{0.real}'\nreturn t.format(1)"),
                    prog("return '{0.real}|{1[k]:>{2}}'.format(3, {'k': 'v'}, 2)")])  # fmt: skip
    assert [r.reason.startswith("forbidden: .format") for r in walks[:2]] == [True, True]
    assert walks[2] == ExecResult("3| v", "")


def test_fork_attempts(ex, ex_os):
    for body in ("import os\nreturn os.fork()", "return __import__('posix').fork()",
                 "import multiprocessing\nreturn 1", "import subprocess\nreturn 1"):  # fmt: skip
        assert ex.run([prog(body)])[0].reason.startswith("forbidden: import")
    # OS level, as if the Python layer had been escaped:
    assert "has no attribute 'fork'" in ex_os.run([prog("import os\nreturn os.fork()")])[0].reason
    require_layer(ex_os, "seccomp", "rlimit-nproc")  # root without seccomp has neither
    raw_fork = prog("import ctypes\nreturn ctypes.CDLL(None, use_errno=True).fork()")
    assert run_then_good(ex_os, raw_fork).value == -1
    spawn = prog("import subprocess\nreturn subprocess.run(['/bin/true']).returncode")
    assert run_then_good(ex_os, spawn).reason.startswith("error:")  # EPERM (seccomp) or EAGAIN (NPROC)


def test_os_layers(ex_os, tmp_path):
    prot = ex_os.protections
    assert {"rlimit-as", "rlimit-fsize", "rlimit-core"} <= set(prot), prot
    results = ex_os.run([
        prog("open('here.txt', 'w').write('ok')\nreturn open('here.txt').read()"),  # own temp dir: fine
        prog("open('big.bin', 'wb').write(b'x' * (2 << 20))"),  # RLIMIT_FSIZE
        prog("return open('/etc/passwd').read()"),
        prog(f"open({str(tmp_path / 'out.txt')!r}, 'w').write('x')"),
        prog("import os\nreturn open(f'/proc/{os.getppid()}/environ').read()"),
        prog("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=0.2)"),
        prog("import os\nos.kill(os.getppid(), 0)"),
    ])  # fmt: skip
    assert results[0].value == "ok"
    assert "File too large" in results[1].reason
    if layer_in_force(ex_os, "landlock-fs"):
        assert all("Permission denied" in r.reason for r in results[2:5]), results
        assert not (tmp_path / "out.txt").exists()
    if layer_in_force(ex_os, "seccomp", "netns"):
        assert results[5].reason.startswith(("error: PermissionError", "error: OSError")), results[5]
    assert results[6].reason.startswith("error:")  # os.kill was removed
    os.kill(os.getpid(), 0)  # and we are still alive


def test_batch_of_50_mixed_programs_keeps_order(ex):
    kinds = [
        (lambda i: prog(f"return {i} * 2"), lambda i: ExecResult(2 * i, "")),
        (lambda i: prog("return 1 / 0"), lambda i: ExecResult(None, "error: ZeroDivisionError: division by zero")),
        (lambda i: prog("import os"), lambda i: ExecResult(None, "forbidden: import os")),
        (lambda i: prog("x = [0] * 10 ** 11"), lambda i: ExecResult(None, "memory")),
        (lambda i: prog(f"s = 0\nfor k in range({i}):\n\n    s += helper(k)\nreturn s") + "def helper(k):\n    return k\n",
         lambda i: ExecResult(i * (i - 1) // 2, "")),
    ]  # fmt: skip
    programs, expected = [], []
    for i in range(50):
        make, want = kinds[i % len(kinds)] if i not in (13, 37) else (lambda i: prog("while 1: pass"), None)
        programs.append(make(i))
        expected.append(want(i) if want else ExecResult(None, "timeout"))
    assert ex.run(programs, timeout=0.5) == expected


def test_pool_survives_worker_death_and_is_reused(ex, ex_os):
    ex.run([GOOD] * 4)  # both slots busy once: two live workers
    before = ex.worker_pids()
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)  # a worker dies between calls
    time.sleep(0.05)
    assert ex.run([GOOD] * 20) == [ExecResult(42, "")] * 20
    after = ex.worker_pids()
    assert before[1] in after and before[0] not in after and len(after) == 2
    # A worker that dies mid-batch: that program is "crashed", the rest still get their results.
    dying = prog("import os\nos._exit(3)")
    assert ex_os.run([GOOD, dying, GOOD, dying, GOOD]) == [ExecResult(42, "")] + [
        ExecResult(None, "crashed"), ExecResult(42, ""), ExecResult(None, "crashed"), ExecResult(42, "")]  # fmt: skip


def test_state_does_not_leak_between_programs(ex):
    setup = [prog("import math\nmath.floor = lambda x: 0\nreturn 1"),
             prog("from decimal import getcontext\ngetcontext().prec = 2\nreturn 1")]  # fmt: skip
    check = [prog("import math\nreturn math.floor(2.5)"),
             prog("from decimal import Decimal\nreturn str(Decimal(1) / 7)"),
             prog("import random\nreturn random.random()")]  # fmt: skip
    results = ex.run(setup + check + check)
    assert results[0].reason == "error: AttributeError: sandboxed modules are read-only"
    assert results[2:5] == results[5:8] and results[2].value == 2 and len(results[3].value) > 10


def test_default_pool_shutdown_and_restart():
    assert sandbox.run_programs([GOOD, GOOD]) == [ExecResult(42, "")] * 2
    sandbox.shutdown()
    assert sandbox.run_programs([GOOD])[0].value == 42  # a new pool starts lazily
    sandbox.shutdown()
    assert sandbox.run_programs([]) == []
    with pytest.raises(TypeError):
        sandbox.run_programs([b"def solution(): return 1"])
