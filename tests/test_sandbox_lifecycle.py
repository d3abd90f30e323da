"""No process and no temp folder outlives the sandbox: after a normal exit, after a SIGKILL of the
trainer (here a subprocess that started an executor), also while it closes its pool, and after a
zygote is killed."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from reftune.sandbox import ExecResult, ProgramExecutor
from sandbox_support import children_of

ROOT = Path(__file__).resolve().parents[1]
GOOD = "def solution():\n    return 41 + 1\n"
HANG = "def solution():\n    while True:\n        pass\n"
TRAINER = """
import json, sys, threading, time
from reftune.sandbox import ProgramExecutor
ex = ProgramExecutor(workers=2)
ex.run([{good!r}] * 4 + ["import math\\ndef solution():\\n    return math.pi\\n"] * 2)
if sys.argv[1] == "busy":  # each zygote is running a program when we are killed
    threading.Thread(target=ex.run, args=([{hang!r}] * 2,), kwargs={{"timeout": 60}}, daemon=True).start()
print(json.dumps(ex.worker_pids()), flush=True)
if sys.argv[1] == "busy":
    time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead (its reaper's business)
    except FileNotFoundError:
        return False


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def sandbox_dirs(root) -> list[str]:
    return sorted(p for p in os.listdir(root) if p.startswith("reftune-sandbox-"))


def start_trainer(mode: str, tmp_path) -> tuple[subprocess.Popen, list[int]]:
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", TRAINER.format(good=GOOD, hang=HANG), mode],
                            stdout=subprocess.PIPE, env=env, cwd=str(ROOT), text=True)  # fmt: skip
    return proc, json.loads(proc.stdout.readline())


def test_sigkill_of_the_trainer_leaves_nothing(tmp_path):
    proc, zygotes = start_trainer("busy", tmp_path)
    try:
        assert len(zygotes) == 2
        assert wait_until(lambda: len(children_of(set(zygotes))) >= 2), "the zygotes should be running programs"
        doomed = zygotes + children_of(set(zygotes))
        assert len(sandbox_dirs(tmp_path)) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_until(lambda: not any(map(alive, doomed))), [p for p in doomed if alive(p)]
    assert wait_until(lambda: sandbox_dirs(tmp_path) == []), sandbox_dirs(tmp_path)


DIES_WHILE_CLOSING = """
import json, os, signal
import reftune.sandbox.executor as executor
ex = executor.ProgramExecutor(workers=1)
ex.run([{good!r}])
print(json.dumps(ex.worker_pids()), flush=True)
# Killed after its zygote exited and before its own removal of the folder.
executor.remove_folder = lambda path: os.kill(os.getpid(), signal.SIGKILL)
ex.close()
"""


def test_a_trainer_killed_while_it_closes_leaves_nothing(tmp_path):
    """The janitor removes the folder when the trainer dies between its zygote's exit and its own
    removal (with the trainer alive at the janitor's first look: it then waits for either)."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", DIES_WHILE_CLOSING.format(good=GOOD)], stdout=subprocess.PIPE,
                            env=env, cwd=str(ROOT), text=True)  # fmt: skip
    zygotes = json.loads(proc.stdout.readline())
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert wait_until(lambda: not any(map(alive, zygotes)))
    assert wait_until(lambda: sandbox_dirs(tmp_path) == []), sandbox_dirs(tmp_path)


def test_normal_exit_leaves_nothing(tmp_path):
    proc, zygotes = start_trainer("idle", tmp_path)  # exits right away: atexit closes the pool
    assert proc.wait(timeout=30) == 0
    assert len(zygotes) == 2
    assert not any(map(alive, zygotes))
    assert sandbox_dirs(tmp_path) == []


def test_close_and_killed_zygotes_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with ProgramExecutor(workers=1, grace=0.3) as ex:
        assert ex.run([GOOD]) == [ExecResult(42, "")]
        first = ex.worker_pids()[0]
        os.kill(first, signal.SIGKILL)  # killed while idle: its folder stays until the pool notices
        assert ex.run([GOOD, GOOD]) == [ExecResult(42, "")] * 2
        assert len(sandbox_dirs(tmp_path)) == 1 and first not in ex.worker_pids()
        # Killed while it runs a program: that program is "crashed", the rest run in a fresh zygote.
        second = ex.worker_pids()[0]
        killer = subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {second}"])
        assert ex.run([HANG, GOOD, GOOD], timeout=5) == [ExecResult(None, "crashed")] + [ExecResult(42, "")] * 2
        killer.wait()
        zygotes = ex.worker_pids()
        assert len(sandbox_dirs(tmp_path)) == 1 and second not in zygotes
    assert wait_until(lambda: not any(map(alive, [first, second] + zygotes)))
    assert sandbox_dirs(tmp_path) == []


@pytest.mark.parametrize("share_pure", [True, False])
def test_pure_programs_give_the_same_results_shared_or_forked(share_pure, tmp_path, monkeypatch):
    """The shared child for pure programs is an optimisation only: same results as a fork each."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = json.loads((ROOT.parent / "shared" / "data" / "reft" / "svamp_python_sdp.json").read_text())[:150]
    programs = [d["answer_cot"] for d in data]
    programs += [
        "def solution(acc=[]):\n    acc.append(1)\n    return len(acc)\n",  # fresh globals each time
        "def solution():\n    x = [0] * 10 ** 10\n",  # MemoryError: rerun in a fresh fork
        "def solution():\n    return solution()\n",
        HANG,
        "def solution():\n    return sum(i * i for i in range(10)) + int('7') + max([1, 5])\n",
        "def solution():\n    try:\n        return 1 / 0\n    except ZeroDivisionError as e:\n        return str(e)\n",
    ]
    with ProgramExecutor(workers=1, grace=0.3) as ex:
        ex._share_pure = share_pure
        results = ex.run(programs + programs[-6:], timeout=0.5)
    assert [r.value for r in results[:150]] == pytest.approx([float(d["answer_value"]) for d in data], abs=1e-2)
    assert results[150:156] == results[156:] == [
        ExecResult(1, ""), ExecResult(None, "memory"),
        ExecResult(None, "error: RecursionError: maximum recursion depth exceeded"), ExecResult(None, "timeout"),
        ExecResult(297, ""), ExecResult("division by zero", ""),
    ]  # fmt: skip
