"""What the sandbox's test files share: programs, benign controls and the leftover checks of the
adversarial suites, and the check that an OS layer is in force.

A test of an OS layer (seccomp, Landlock, the network namespace, the private tmpfs...) skips where
this kernel does not apply the layer -- unless REFTUNE_REQUIRE_SANDBOX_LAYERS=1, which makes a
missing layer a failure (for machines known to have them all, as REFTUNE_REQUIRE_VLLM does for vLLM).
"""

from __future__ import annotations

import os

import pytest

from reftune.sandbox import ExecResult

REQUIRE_LAYERS = os.environ.get("REFTUNE_REQUIRE_SANDBOX_LAYERS") == "1"


def layer_in_force(executor, *names: str) -> bool:
    """True if any of `names` is among the executor's protections; False where none is, or a failure
    under REFTUNE_REQUIRE_SANDBOX_LAYERS=1."""
    if any(name in executor.protections for name in names):
        return True
    if REQUIRE_LAYERS:
        pytest.fail(f"sandbox layer {' / '.join(names)} is not in force here (in force: "
                    f"{', '.join(executor.protections)}) and REFTUNE_REQUIRE_SANDBOX_LAYERS=1")
    return False


def require_layer(executor, *names: str) -> None:
    """Skip the test unless one of `names` is in force (a failure under REFTUNE_REQUIRE_SANDBOX_LAYERS=1)."""
    if not layer_in_force(executor, *names):
        pytest.skip(f"sandbox layer {' / '.join(names)} is not in force here")


MARK = "PWNED"


def prog(body: str, header: str = "") -> str:
    """`header` at top level, then `def solution():` with `body` (dedented lines) as its body."""
    return header + "def solution():\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines())


# Benign programs (one per feature that must keep working) and their answers.
BENIGN = [
    (prog("a = 29\nb = 7\nreturn a * b"), 203),
    (prog("return helper(4)\n\n", header="def helper(n):\n\n    return n * SEVEN\n\nSEVEN = 7\n"), 28),
    (prog("return math.sqrt(16) + math.floor(2.5)", header="import math\n"), 6.0),
    (prog("return Fraction(1, 2) + Fraction(1, 3)", header="from fractions import Fraction\n"), 5 / 6),
    (prog("return str(Decimal(1) / 7)", header="from decimal import Decimal\n"), "0.1428571428571428571428571429"),
    (prog("return statistics.stdev([2, 4, 4, 4, 5, 5, 7, 9])", header="import statistics\n"), 2.138089935299395),
    (prog("random.seed(42)\nreturn random.randint(1, 1000)", header="import random\n"), 655),
    (prog("return random.random()", header="import random\n"), 0.8444218515250481),  # seed 0 in every program
    (prog("x = sympy.Symbol('x')\nreturn sympy.solve(sympy.Eq(2 * x, 7), x)[0]", header="import sympy\n"), 3.5),
    (prog("return len([1, 2]) + sum(range(4)) + round(2.6)"), 11),
]


LIVE = []  # the executors of the adversarial suites that are open


def children_of(pids) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in pids and fields[0] != "Z":
                out.append(int(entry))
    return out


def assert_no_leftovers(ex, tmp_root):
    zygotes = ex.worker_pids()
    assert len(children_of(set(zygotes))) <= len(zygotes)  # at most each zygote's shared child
    folders = {p for p in os.listdir(tmp_root) if p.startswith("reftune-sandbox-")}
    live = {os.path.basename(w.tmpdir) for e in LIVE + [ex] for w in e._workers if w is not None}
    assert folders == live  # one per live zygote, none left by dead ones
    for folder in folders:  # emptied after every program
        assert os.listdir(tmp_root / folder) == [], folder


def run_mixed(ex, tmp_root, attacks, benign=BENIGN, **kw) -> list[ExecResult]:
    """Attacks interleaved with benign programs, in two calls; returns the attacks' results."""
    programs, expected = [], {}
    for i, attack in enumerate(attacks):
        program, answer = benign[i % len(benign)]
        programs += [attack, program]
        expected[len(programs) - 1] = answer
    first = None
    for _ in range(2):  # the same call, and the next one
        results = ex.run(programs, **kw)
        for i, answer in expected.items():
            got = results[i].value
            assert got == pytest.approx(answer) if isinstance(answer, float) else got == answer, (i, results[i])
        for attack, result in zip(attacks, results[::2]):
            assert not (isinstance(result.value, str) and MARK in result.value), (attack, result)
        first = first or results[::2]
        assert_no_leftovers(ex, tmp_root)
    return first
