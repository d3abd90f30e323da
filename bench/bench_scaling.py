"""How the cost of one ReFT (PPO) iteration grows with model size and rollout batch size, same run.

    .venv/bin/python bench/bench_scaling.py [--grid "0.9m:32,64,128 10m:32,64,128 50m:32"] [--threads 2]
        [--new-tokens 32] [--repeats 3] [--engine cached] [--mini-batch 32]

Models (TinyModelConfig: hidden / intermediate / layers / heads, vocabulary 1024, tied embeddings):
0.9m = the demo's 128 / 384 / 4 / 4; 10m = 320 / 864 / 8 / 5; 50m = 640 / 1728 / 10 / 10.
They are untrained (built once into `--cache`), so a row practically never draws EOS and every row
generates exactly `--new-tokens` tokens (default 32: the mean CoT length of the demo's warm-up
model): every configuration then does the same work per row, and cost differences come from model
size and batch size alone. Rows = questions x 4 samples, one decode batch of all rows
(`gen_batch_size` = rows), the demo's ReFT settings otherwise (value head, GAE, one PPO epoch,
mini-batches of `--mini-batch`), fp32.

One worker process per configuration runs `run_reft` (bench_vs_trl.py's reftune worker, threads
pinned before torch loads); the parent runs one iteration of each in turn, all configurations
interleaved per round (order reversed every other round), so background load on the shared
machine hits all alike. The first iteration is a warm-up, then `--repeats` timed rounds; medians.
Split of the median iteration: generate (engine), reward (the grader), no-grad passes (old +
value head and reference forwards), update (mini-batch forward + backward + AdamW), as in
bench_vs_trl.py. GFLOP/s per phase counts 2 x linear parameters (incl. the LM head) per token
and pass, over the padded (rows, prompt + response) shape: generation 1 pass (prefill + decode),
no-grad 2 passes, update 3 (forward + backward); attention's own FLOPs are left out (under 3% at
these lengths). "% peak" is against an fp32 1024^3 matmul at the same thread count, measured in
this run. Peak RSS is each worker process's maximum resident set (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import ROOT, Worker, interleaved, machine_info, median_message, versions  # noqa: E402

SIZES = {  # TinyModelConfig overrides
    "0.9m": {},
    "10m": dict(hidden_size=320, intermediate_size=864, num_layers=8, num_heads=5),
    "50m": dict(hidden_size=640, intermediate_size=1728, num_layers=10, num_heads=10),
}
SAMPLES = 4


def parse_grid(text: str) -> list[tuple[str, int]]:
    """"0.9m:32,64 50m:32" -> [("0.9m", 32), ("0.9m", 64), ("50m", 32)]."""
    grid = []
    for item in text.split():
        size, _, rows = item.partition(":")
        if size not in SIZES:
            raise SystemExit(f"--grid: unknown size {size!r}; known: {', '.join(SIZES)}")
        for r in rows.split(","):
            if int(r) % SAMPLES:
                raise SystemExit(f"--grid: rows must be a multiple of {SAMPLES} (questions x {SAMPLES} samples), got {r}")
            grid.append((size, int(r)))
    return grid


def build_models(cache: str, sizes: list[str], seed: int) -> dict[str, str]:
    """Untrained models of each size (the demo task's tokenizer), built once into `cache`."""
    paths = {s: Path(cache) / f"scaling-{s}-seed{seed}" for s in sizes}
    missing = [s for s, p in paths.items() if not (p / "config.json").exists()]
    if missing:
        code = f"""
from pathlib import Path
from reftune.runtime import configure_threads
configure_threads(1)
from reftune.demo import _demo_data
from reftune.tasks import load_task
from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus
data = _demo_data(); data.seed = {seed}
texts = tokenizer_corpus(load_task(data))
for size, overrides in {[(s, SIZES[s]) for s in missing]!r}:
    build_tiny_model(Path({str(cache)!r}) / f"scaling-{{size}}-seed{seed}", texts, TinyModelConfig(seed={seed}, **overrides))
"""
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return {s: str(p) for s, p in paths.items()}


def linear_params(path: str) -> tuple[int, int]:
    """(all parameters, parameters of the linear layers incl. the tied LM head) from config.json."""
    c = json.loads((Path(path) / "config.json").read_text())
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    per_layer = 4 * h * h + 3 * h * i  # q, k, v, o (no GQA in these models) + gate, up, down
    return n * (per_layer + 2 * h) + v * h + h, n * per_layer + v * h


def matmul_peak_gflops(threads: int, n: int = 1024, repeats: int = 7) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="0.9m:32,64,128 10m:32,64,128 50m:32",
                    help='space-separated SIZE:ROWS,ROWS,... (sizes: 0.9m, 10m, 50m); the 50m at 128 rows takes '
                         'about 2 min an iteration on 2 shared cores')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens every row generates (max_new_tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="cached", help="reftune engine (the demo: cached)")
    ap.add_argument("--mini-batch", type=int, default=32, help="rows per optimizer step (the demo's mini_batch_size)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    grid = parse_grid(args.grid)
    models = build_models(args.cache, sorted({s for s, _ in grid}, key=list(SIZES).index), args.seed)
    peak = matmul_peak_gflops(args.threads)
    print(f"# one ReFT iteration vs model size and rollout rows: {args.new_tokens} new tokens per row, "
          f"engine {args.engine}, mini-batch {args.mini_batch}, fp32, {args.threads} thread(s)")
    print(f"machine: {machine_info()}; fp32 matmul peak {peak:.0f} GFLOP/s at {args.threads} thread(s)\n{versions()}\n",
          flush=True)
    workers = {}
    with tempfile.TemporaryDirectory() as logs:
        for size, rows in grid:  # started together; each waits for its first `go`
            mini = min(args.mini_batch, rows)
            argv = [str(Path(__file__).with_name("bench_vs_trl.py")), "--worker", "reftune", "--engine", args.engine,
                    "--model", models[size], "--questions", str(rows // SAMPLES), "--samples", str(SAMPLES),
                    "--max-new-tokens", str(args.new_tokens), "--mini-batch", str(mini),
                    "--gen-batch-size", str(rows), "--seed", str(args.seed)]
            workers[f"{size}/{rows}"] = Worker(f"{size}-{rows}", argv, logs, args.threads, wait=False)
        for w in workers.values():
            w.wait_ready()
        print(f"{len(workers)} workers ready in {max(w.setup_s for w in workers.values()):.0f} s", flush=True)
        first, timed, stops = interleaved(workers, args.repeats)

    base = next(iter(workers))
    base_s = statistics.median(m["wall"] for m in timed[base])
    print(f"\n| model | params | rows | s/iteration | x {base} | samples/s | generate | reward | no-grad passes "
          f"| update | generate GFLOP/s (% peak) | passes GFLOP/s | update GFLOP/s | first iteration s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, w in workers.items():
        size, rows = name.split("/")
        n_all, n_linear = linear_params(models[size])
        m = median_message(timed[name])
        B, P, R = m["shape"]
        pass_gflop = 2 * n_linear * B * (P + R) / 1e9  # one forward over the padded batch
        p = m["parts"]
        rate = {k: f * pass_gflop / p[k] if p[k] > 0 else float("nan") for k, f in
                (("generate", 1), ("passes", 2), ("update", 3))}
        cells = " | ".join(f"{p[k]:.2f} ({100 * p[k] / m['wall']:.0f}%)" for k in ("generate", "reward", "passes", "update"))
        print(f"| {size} | {n_all / 1e6:.1f} M | {rows} | {m['wall']:.2f} | {m['wall'] / base_s:.1f} "
              f"| {int(rows) / m['wall']:.1f} | {cells} | {rate['generate']:.1f} ({100 * rate['generate'] / peak:.0f}%) "
              f"| {rate['passes']:.1f} | {rate['update']:.1f} | {first[name][0]['wall']:.2f} "
              f"| {stops[name]['peak_rss_mib']:.0f} |")
    print("\nshapes (rows, prompt, response) of the median iterations: "
          + ", ".join(f"{n} {tuple(median_message(timed[n])['shape'])}" for n in workers))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
