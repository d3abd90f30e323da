"""Thread settings under load: torch's default thread pool vs `reftune.runtime.configure_threads`,
each timed alone and beside a busy competitor process.

    .venv/bin/python bench/bench_threads.py [--rounds 3] [--reps 5] [--competitors 1]

Workloads (the demo's tiny Llama shape, TinyModelConfig defaults, random weights and tokens):
- decode: 32 rows x 32 greedy tokens with a KV cache (the rollout loop's per-token cost),
- train: one ReFT-like optimizer step: forward + backward over 32 x 96 tokens, AdamW.
Settings (each in its own process, because OpenMP reads its wait policy when torch loads it):
- default: nothing set (torch: one thread per core, OpenMP's active wait policy),
- passive: OMP_WAIT_POLICY=PASSIVE only,
- 1-thread: torch.set_num_threads(1),
- auto: configure_threads() (passive, every CPU; see reftune/runtime.py).
Conditions: alone, and beside `--competitors` processes spinning on a core each. Rounds
interleave every (setting, condition), so background load hits all alike; each number is the
median over rounds of a process's median over `--reps` timed repetitions. "x alone-default" is
the slow-down against the default setting running alone.

Measured at commit 7accd29 on a 2-core AMD EPYC with AVX2 (which also ran a demo and other jobs,
load average 5-9, so "alone" is not idle): 3 rounds x 3 reps, --timeout 90; seconds:

    setting      decode alone  decode busy  train alone  train busy
    default       7.7 (>90)    14.5 (>90)     4.8          6.6
    passive       0.59          0.55          0.64         0.81
    1-thread      0.41          1.43          0.82         1.72
    free cores    0.42          1.17          1.02         1.78    (chose 1 thread: the load)

(>90: some of the default's processes ran past the timeout.) The default is 7-26x slower than
passive, over 100x in its worst runs; passive 2 threads stayed within 1.4x of the best setting
everywhere, 1 thread lost 2-2.6x beside a competitor. `configure_threads(0)` therefore picks
passive + every CPU (and falls back to free cores only where the wait policy cannot apply).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("default", "passive", "1-thread", "auto")
WORKLOADS = ("decode", "train")


def worker(setting: str, workload: str, reps: int) -> dict:
    """Runs in a fresh process: apply `setting` before torch loads, time `workload`."""
    if setting == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    info = {}
    if setting == "auto":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from reftune.runtime import configure_threads

        info = configure_threads(0)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if setting == "1-thread":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    prompt = torch.randint(0, 1024, (32, 40))
    batch = torch.randint(0, 1024, (32, 96))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def decode():
        from transformers import DynamicCache

        model.eval()
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
            for _ in range(32):
                tokens = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=tokens, cache=cache, use_cache=True)

    def train():
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    fn = decode if workload == "decode" else train
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "threads": torch.get_num_threads(), **info}


def run_worker(setting: str, workload: str, reps: int, timeout: float) -> dict:
    """One measurement in a fresh process; a process that outruns `timeout` counts as `timeout`
    seconds (a lower bound: the table marks it with >)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", setting, "--workload", workload, "--reps",
                              str(reps)], env=env, capture_output=True, text=True, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": float("inf"), "threads": -1}
    return json.loads(out.stdout.strip().splitlines()[-1])


def spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--competitors", type=int, default=1, help="busy processes in the 'busy' condition")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--timeout", type=float, default=120,
                    help="seconds per measuring process, its start-up (imports) included")
    ap.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    ap.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.spin:
        spin()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workload, args.reps)))
        return

    workloads = args.workloads.split(",")
    results: dict[tuple, list] = {}
    threads: dict[tuple, int] = {}
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}; {args.rounds} rounds x "
          f"{args.reps} reps; busy = {args.competitors} spinning process(es)", flush=True)
    for r in range(args.rounds):
        for condition in ("alone", "busy"):
            competitors = [subprocess.Popen([sys.executable, __file__, "--spin"]) for _ in range(args.competitors)] \
                if condition == "busy" else []
            try:
                time.sleep(0.5 if competitors else 0)
                for workload in workloads:
                    for setting in SETTINGS:
                        res = run_worker(setting, workload, args.reps, args.timeout)
                        results.setdefault((workload, setting, condition), []).append(res["seconds"])
                        if res["threads"] > 0:
                            threads[(workload, setting, condition)] = res["threads"]
            finally:
                for p in competitors:
                    p.kill()
                    p.wait()
        print(f"\nafter round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f}):")
        table(results, threads, workloads, args.reps, args.timeout)


def table(results: dict, threads: dict, workloads: list[str], reps: int, args_timeout: float) -> None:
    inf = float("inf")

    def sec(x: float) -> str:
        return "timeout" if x == inf else f"{x:.3f}"

    def ratio(a: float, b: float) -> str:  # a timeout is a lower bound on its time
        if a == inf and b == inf:
            return "?"
        if b == inf:
            return f"<{a / args_timeout:.2f}x"
        return f">{args_timeout / b:.1f}x" if a == inf else f"{a / b:.2f}x"

    print("| workload | setting  | threads alone/busy | alone s | busy s | busy / alone | busy / default alone |")
    print("|----------|----------|--------------------|---------|--------|--------------|----------------------|")
    for workload in workloads:
        base = statistics.median(results[(workload, "default", "alone")])
        for setting in SETTINGS:
            alone = statistics.median(results[(workload, setting, "alone")])
            busy = statistics.median(results[(workload, setting, "busy")])
            t = "/".join(str(threads.get((workload, setting, c), "?")) for c in ("alone", "busy"))
            print(f"| {workload:8s} | {setting:8s} | {t:18s} | {sec(alone):>7s} | {sec(busy):>6s} | "
                  f"{ratio(busy, alone):>12s} | {ratio(busy, base):>20s} |")
    print(f"(seconds: median over rounds of each process's median of {reps} repetitions; timeout: the "
          f"process ran past --timeout={args_timeout:.0f} s, so ratios with it are bounds)", flush=True)


if __name__ == "__main__":
    main()
