"""Adversarial tests of isolation between programs: one program's faults are charged to it alone,
pure programs that share a child cannot change what a later one sees, and no temp folder outlives
or outgrows its program.

Programs here are ordinary model output (compile warnings, a slow compile) or crafted (rebinding
the builtins, filling or deepening the temp folder). Tests of the temp folder run with
`_os_layers_only=True` (real builtins and `os`, what an escaped program has); the private tmpfs
is an OS layer, required under REFTUNE_REQUIRE_SANDBOX_LAYERS=1.
"""

import os
import signal
import tempfile
import threading
import time

import pytest

from reftune.sandbox import ExecResult, ProgramExecutor, folders
from sandbox_support import LIVE, prog, require_layer

GOOD = prog("return 41 + 1")


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    """A temp root of our own; on a tmpfs where there is one (a plain folder with thousands of
    nested folders takes seconds to remove from a disk)."""
    shm = "/dev/shm"
    root = tempfile.mkdtemp(prefix="reftune-test-", dir=shm) if os.access(shm, os.W_OK) else None
    root = root or str(tmp_path_factory.mktemp("sandbox-root"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", root)
        yield root
    folders.remove_folder(root)


@pytest.fixture(scope="module")
def ex1(tmp_root):
    """One zygote: every pure program of a call goes through the same shared child."""
    with ProgramExecutor(workers=1, grace=0.3) as executor:
        LIVE.append(executor)
        yield executor
    LIVE.remove(executor)


def sandbox_folders(root) -> set[str]:
    return {p for p in os.listdir(root) if p.startswith("reftune-sandbox-")}


def live_folders() -> set[str]:
    return {os.path.basename(w.tmpdir) for e in LIVE for w in e._workers if w is not None}


def os_executor(private_tmpfs=True):
    executor = ProgramExecutor(workers=1, grace=0.3, _os_layers_only=True)
    executor._private_tmpfs = private_tmpfs
    executor.run([GOOD])  # start the zygote so that .protections is known
    return executor


# ------------------------------------------------------------------------ 1. faults stay with their program

def test_compile_warnings_never_fill_a_pipe(ex1):
    """`x is 0` is a SyntaxWarning of the compiler: thousands of them in one zygote's life, in pure
    programs (the shared child) and others (a fork each), cost no program its result."""
    noisy = prog("x = 3\nif x is 0 or x is 1 or x is 'a' or x is () or x is 2.5:\n    return -1\nreturn x")
    noisy_forked = noisy.replace("return x", "return int(statistics.mean([x, x]))") + "import statistics\n"
    programs = [noisy] * 1500 + [noisy_forked] * 150 + [GOOD]
    assert ex1.run(programs, timeout=5.0) == [ExecResult(3, "")] * 1650 + [ExecResult(42, "")]


def test_a_slow_compile_is_charged_to_its_own_program(ex1):
    """A long f-string compiles in quadratic time: its compile runs on its own clock, in its own
    child, and the programs around it (pure ones first and last, so in the shared child) are fine."""
    def bomb(n):
        return 'def solution():\n    x = 1\n    return len(f"' + "{x!r:>{x}}" * n + '")\n'

    busy = prog("s = 0\nfor i in range(50000):\n    s += i % 7\nreturn s")
    results = ex1.run([busy, bomb(20000), GOOD, bomb(2500), busy], timeout=0.5)  # 200 KB (forked), 25 KB (shared)
    total = sum(i % 7 for i in range(50000))
    assert results[0] == results[4] == ExecResult(total, "") and results[2] == ExecResult(42, "")
    assert results[1] == ExecResult(None, "timeout")
    assert results[3] in (ExecResult(None, "timeout"), ExecResult(2500 * 1, ""))  # its own verdict either way


def test_a_stalled_zygote_is_replaced_and_its_programs_rerun(ex1):
    """A zygote that stops answering (stopped here by a signal, as a loaded machine or a bug might)
    is replaced; the programs it held run again on a fresh one instead of being "timeout"."""
    ex1.run([GOOD])
    zygote = ex1.worker_pids()[0]
    sleeper = prog("time.sleep(0.5)\nreturn 7", header="import time\n")  # the zygote waits on it

    def stop_for_a_while():  # longer than timeout + grace: the pool must not wait for it
        time.sleep(0.1)
        os.kill(zygote, signal.SIGSTOP)
        time.sleep(4.0)
        try:
            os.kill(zygote, signal.SIGCONT)
        except ProcessLookupError:  # already replaced and gone
            pass

    stopper = threading.Thread(target=stop_for_a_while)
    stopper.start()
    try:
        results = ex1.run([sleeper, GOOD, GOOD, sleeper, GOOD], timeout=2.0)
    finally:
        stopper.join()
    assert results == [ExecResult(7, ""), ExecResult(42, ""), ExecResult(42, ""), ExecResult(7, ""), ExecResult(42, "")]
    assert zygote not in ex1.worker_pids()


# ------------------------------------------------------------------------ 2. the shared child of pure programs

# Each tries to change what a later pure program of the same call computes.
BUILTIN_ATTACKS = [
    "global __builtins__\n__builtins__['len'] = max\ndef solution():\n    return 1\n",
    "__builtins__ = {'round': int}\ndef solution():\n    return 1\n",
    "def solution():\n    global __builtins__\n    __builtins__['sum'] = min\n    return 1\n",
    "def solution():\n    del __builtins__['sum']\n    return 1\n",
    "def solution():\n    __builtins__.update({'abs': len})\n    return 1\n",
    "import math as __builtins__\ndef solution():\n    return 1\n",
    "def solution(__builtins__={'len': max}):\n    return len([1])\n",
    "_\ufe4dbuiltins_\ufe4d['len'] = max\ndef solution():\n    return 1\n",  # NFKC: the name is __builtins__
    "import math\ndef solution():\n    math.pi = True\n    return 1\n",
    "def solution():\n    len = max\n    round = int\n    return len([1, 5]) + round(2.6)\n",  # its own names only
    "def solution():\n    try:\n        ValueError.args = 1\n    except TypeError:\n        pass\n    return 1\n",
]
CHECKS = [
    (prog("return len([1, 2, 3]) + round(2.6) + sum([1, 2]) + abs(-1)"), 10),
    (prog("return math.pi", header="import math\n"), 3.141592653589793),
    (prog("return str(ValueError('x').args)"), "('x',)"),
    (prog("return max(1, 2) * 21"), 42),
]


def test_pure_programs_cannot_change_what_later_ones_see(ex1):
    programs, expected = [], []
    for attack in BUILTIN_ATTACKS:
        programs.append(attack)
        for check, answer in CHECKS:
            programs.append(check)
            expected.append(answer)
    for _ in range(2):  # in the same call, and the next
        results = ex1.run(programs)
        checked = [r for i, r in enumerate(results) if i % (len(CHECKS) + 1)]
        assert [r.value for r in checked] == expected
        attacks = results[:: len(CHECKS) + 1]
        assert all(r.reason.startswith("forbidden: name __builtins__") for r in attacks[:8]), attacks
        assert attacks[8].reason == "error: AttributeError: sandboxed modules are read-only"
        assert attacks[9:] == [ExecResult(7, ""), ExecResult(1, "")]


# ------------------------------------------------------------------------ 3. temp folders

# Each makes as much as it can, then waits (so that a poll of the folder sees it), and says how much.
HEADER = "import os, time\n"
DEEP = prog("n, fd = 0, os.open('.', os.O_RDONLY)\ntry:\n    for i in range(1500):\n        os.mkdir('d', dir_fd=fd)\n"
            "        fd, old = os.open('d', os.O_RDONLY, dir_fd=fd), fd\n        os.close(old)\n        n += 1\n"
            "except OSError:\n    pass\ntime.sleep(0.3)\nreturn n", header=HEADER)  # fmt: skip
MODES = prog("os.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\nos.mkdir('a/locked', 0o300)\n"
             "open('a/locked/g', 'w').write('y')\nos.mkdir('zero', 0)\nos.mkdir('a/b/c/none', 0)\nreturn 2",
             header=HEADER)  # fmt: skip
FILL = prog("done = 0\ntry:\n    for i in range(96):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * (1 << 20))\n        done += 1 << 20\nexcept OSError:\n    pass\n"
            "time.sleep(0.3)\nreturn done", header=HEADER)
MANY = prog("n = 0\ntry:\n    for i in range(5000):\n        open(f'e{i}', 'w').close()\n        n += 1\n"
            "except OSError:\n    pass\ntime.sleep(0.3)\nreturn n", header=HEADER)
LOOK = prog("return str(sorted(os.listdir('.')))", header=HEADER)


def test_temp_folders_are_bounded_and_emptied_on_a_private_tmpfs(tmp_root):
    executor = os_executor()
    try:
        require_layer(executor, "tmpfs")
        deep, _, modes, _, fill, _, many, _ = results = executor.run([DEEP, LOOK, MODES, LOOK, FILL, LOOK, MANY, LOOK],
                                                                      memory_mb=64)  # fmt: skip
        assert results[1::2] == [ExecResult("[]", "")] * 4  # each program starts in an empty folder
        assert 1000 < deep.value < 1024 and modes == ExecResult(2, "")  # the tmpfs's number of entries
        assert 7 << 20 <= fill.value <= 8 << 20  # its size, whatever memory_mb allows
        assert 1000 < many.value < 1024
    finally:
        executor.close()  # must not raise
    assert sandbox_folders(tmp_root) == live_folders()


def test_temp_folders_are_bounded_and_emptied_without_a_tmpfs(tmp_root):
    """Where no private tmpfs can be mounted: the zygote polls the folder's size and number of entries
    while a program runs (kills it past them), and removes whatever it left, however deep."""
    executor = os_executor(private_tmpfs=False)
    try:
        assert "tmpfs" not in executor.protections
        results = executor.run([DEEP, LOOK, MODES, LOOK, FILL, LOOK, MANY, LOOK], memory_mb=64)
        assert results[0].reason == results[4].reason == results[6].reason == "temp folder too large", results
        assert results[2] == ExecResult(2, "")
        assert results[1::2] == [ExecResult("[]", "")] * 4
        for folder in sandbox_folders(tmp_root) - live_folders():
            assert os.listdir(os.path.join(tmp_root, folder)) == []
    finally:
        executor.close()
    assert sandbox_folders(tmp_root) == live_folders()


def make_deep(root, depth, mode=0o700):
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", mode=0o700, dir_fd=fd)
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w") as f:
            f.write("x")
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    if mode != 0o700:
        os.chmod(os.path.join(root, "d"), mode)


def test_folder_removal_handles_any_depth_and_mode_and_never_raises(tmp_root):
    root = os.path.join(tmp_root, "deep")
    os.mkdir(root)
    make_deep(root, 3000)
    os.makedirs(os.path.join(root, "x", "y"))
    os.chmod(os.path.join(root, "x", "y"), 0)
    os.chmod(os.path.join(root, "x"), 0o300)
    assert folders.usage(root, 1 << 30, 10) is False  # past the bound on entries
    assert folders.empty_folder(root) and os.listdir(root) == []
    make_deep(root, 1200, mode=0)
    assert folders.remove_folder(root) and not os.path.exists(root)
    assert folders.remove_folder(root) and folders.empty_folder(root)  # gone already: fine
    assert folders.is_empty(root) is False and folders.usage(root, 1, 1) is False


def test_close_and_the_exit_hook_survive_what_a_program_left(tmp_root):
    """Leftovers in a zygote's folder that only an escape could make (deep, unreadable) are removed
    by close(), which raises nothing; so does the module's exit hook (`sandbox.shutdown`)."""
    from reftune import sandbox

    for close in ("close", "shutdown"):
        executor = ProgramExecutor(workers=1) if close == "close" else sandbox.configure(workers=1)
        executor.run([GOOD])
        folder = executor._workers[0].tmpdir
        make_deep(folder, 1500, mode=0o300)
        executor.close() if close == "close" else sandbox.shutdown()
        assert not os.path.exists(folder)
