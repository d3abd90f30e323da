"""Throughput of reftune.sandbox on the SVAMP P-CoT gold programs, against a naive baseline.

    .venv/bin/python bench/bench_sandbox.py [--n 3043] [--baseline-n 200] [--workers 2] [--repeats 3]

Baseline (measured in the same run): a fresh interpreter per program (`python -I -c RUNNER`, program
on stdin, value printed back), with the same parallelism as the pool -- what code that recreates its
process/pool on every call pays, minus any sandboxing. Pool: a new ProgramExecutor, first (cold) call
including zygote start-up, then warm calls on the same programs (median of --repeats). The SVAMP gold
programs are all pure (plain arithmetic, see reftune/sandbox/pure.py), so by default they run in each
zygote's shared child; "a fork per program" turns that off, which is what every other program (any
import, attribute or class) costs; sympy programs fork a zygote that has sympy loaded. Also reports
how many returned values match the gold `answer_value` within 1e-2, and the rate when a few hang.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reftune.sandbox import ProgramExecutor  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "reft" / "svamp_python_sdp.json"
RUNNER = "import sys, json\nns = {}\nexec(sys.stdin.read(), ns)\nprint(json.dumps(ns['solution']()))"
SYMPY = "import sympy\ndef solution():\n    x = sympy.Symbol('x')\n    return sympy.solve(sympy.Eq({a} * x + {b}, {c}), x)[0]\n"


def run_fresh_process(program: str, timeout: float) -> object:
    try:
        out = subprocess.run([sys.executable, "-I", "-c", RUNNER], input=program, capture_output=True,
                             text=True, timeout=timeout, env={})  # fmt: skip
        return json.loads(out.stdout) if out.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError):
        return None


def accuracy(values, gold) -> float:
    ok = sum(isinstance(v, (int, float)) and abs(v - g) <= 1e-2 for v, g in zip(values, gold))
    return ok / max(1, len(gold))


def timed(executor, programs, **kw):
    t = time.perf_counter()
    results = executor.run(programs, **kw)
    return len(programs) / (time.perf_counter() - t), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=None, help="programs for the pool runs (default: all)")
    ap.add_argument("--baseline-n", type=int, default=200, help="programs for the fresh-process baseline")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3, help="warm calls per setting (the median is reported)")
    args = ap.parse_args()

    data = json.loads(DATA.read_text())
    data = data[: args.n] if args.n else data
    programs = [d["answer_cot"] for d in data]
    gold = [float(d["answer_value"]) for d in data]
    print(f"{len(programs)} SVAMP programs, {args.workers} workers, {os.cpu_count()} CPUs, timeout {args.timeout}s")

    nb = min(args.baseline_n, len(programs))
    t = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        base_values = list(pool.map(lambda p: run_fresh_process(p, args.timeout), programs[:nb]))
    base_rate = nb / (time.perf_counter() - t)
    print(f"baseline, fresh process per program  : {base_rate:8.1f} programs/s  ({nb} programs, "
          f"match {accuracy(base_values, gold[:nb]):.1%})")  # fmt: skip

    def report(label, rates, results):
        failed = sum(not r.ok for r in results)
        spread = f" (of {', '.join(f'{r:.0f}' for r in rates)})" if len(rates) > 1 else ""
        print(f"pool, {label:32s}: {statistics.median(rates):8.1f} programs/s{spread}  ({len(results)} programs, "
              f"match {accuracy([r.value for r in results], gold):.1%}, {failed} failed)")  # fmt: skip
        return statistics.median(rates)

    for share in (True, False):
        with ProgramExecutor(workers=args.workers) as executor:
            executor._share_pure = share
            tag = "shared child" if share else "a fork per program"
            rate, results = timed(executor, programs, timeout=args.timeout)
            cold = report(f"cold, {tag}", [rate], results)
            runs = [timed(executor, programs, timeout=args.timeout) for _ in range(args.repeats)]
            warm = report(f"warm, {tag}", [r for r, _ in runs], runs[-1][1])
            print(f"    speed-up over baseline: cold {cold / base_rate:.0f}x, warm {warm / base_rate:.0f}x")
            if share:
                # What a few bad programs cost: 1% of programs hang until the timeout (0.5 s here).
                mixed = programs[:500] + ["def solution():\n    while True:\n        pass\n"] * 5
                rate, results = timed(executor, mixed, timeout=0.5)
                print(f"pool, 500 good + 5 hanging (0.5 s)     : {rate:8.1f} programs/s  "
                      f"({sum(r.reason == 'timeout' for r in results)} timeouts)")  # fmt: skip
                sym = [SYMPY.format(a=i % 7 + 1, b=i % 5, c=i % 11) for i in range(200)]
                timed(executor, sym[:4], timeout=30)  # the zygotes import sympy (outside the timeout)
                rate, results = timed(executor, sym, timeout=args.timeout)
                print(f"pool, 200 sympy programs (warm)        : {rate:8.1f} programs/s  "
                      f"({sum(not r.ok for r in results)} failed)")  # fmt: skip
                print(f"OS layers in force: {', '.join(executor.protections) or 'none'}")


if __name__ == "__main__":
    main()
