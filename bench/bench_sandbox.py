"""Throughput of reftune.sandbox on the SVAMP P-CoT gold programs, against a naive baseline.

    .venv/bin/python bench/bench_sandbox.py [--n 3043] [--baseline-n 200] [--workers 2]

Baseline (measured in the same run): a fresh interpreter per program (`python -I -c RUNNER`, program
on stdin, value printed back), with the same parallelism as the pool -- what code that recreates its
process/pool on every call pays, minus any sandboxing. Pool: a new ProgramExecutor, first (cold) call
including worker start-up, then a warm call on the same programs. Also reports how many returned
values match the gold `answer_value` within 1e-2, and the rate when a few programs hang.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reftune.sandbox import ProgramExecutor  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "reft" / "svamp_python_sdp.json"
RUNNER = "import sys, json\nns = {}\nexec(sys.stdin.read(), ns)\nprint(json.dumps(ns['solution']()))"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=None, help="programs for the pool runs (default: all)")
    ap.add_argument("--baseline-n", type=int, default=200, help="programs for the fresh-process baseline")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--timeout", type=float, default=2.0)
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
    print(f"baseline, fresh process per program : {base_rate:8.1f} programs/s  ({nb} programs, "
          f"match {accuracy(base_values, gold[:nb]):.1%})")  # fmt: skip

    with ProgramExecutor(workers=args.workers) as executor:
        rates = []
        for label in ("cold (incl. worker start)", "warm"):
            t = time.perf_counter()
            results = executor.run(programs, timeout=args.timeout)
            rates.append(len(programs) / (time.perf_counter() - t))
            failed = sum(not r.ok for r in results)
            print(f"pool, {label:28s}: {rates[-1]:8.1f} programs/s  ({len(programs)} programs, "
                  f"match {accuracy([r.value for r in results], gold):.1%}, {failed} failed)")  # fmt: skip
        print(f"speed-up over baseline: cold {rates[0] / base_rate:.0f}x, warm {rates[1] / base_rate:.0f}x")

        # What a few bad programs cost: 1% of programs hang until the timeout (0.5 s here).
        mixed = programs[:500] + ["def solution():\n    while True:\n        pass\n"] * 5
        t = time.perf_counter()
        results = executor.run(mixed, timeout=0.5)
        rate = len(mixed) / (time.perf_counter() - t)
        print(f"pool, 500 good + 5 hanging (0.5 s)   : {rate:8.1f} programs/s  "
              f"({sum(r.reason == 'timeout' for r in results)} timeouts)")  # fmt: skip
        print(f"OS layers in force: {', '.join(executor.protections) or 'none'}")


if __name__ == "__main__":
    main()
