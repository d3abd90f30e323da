"""Seconds per iteration of the demo's ReFT and Online-ST, for one or more source trees side by side.

    .venv/bin/python bench/bench_demo_iterations.py --warmup WARMUP_CKPT [--trees . /tmp/old]
        [--trainers reft online_st] [--precisions no auto] [--steps 10] [--repeats 2] [--threads 1]

Each measurement is a fresh process that imports reftune from its tree (`PYTHONPATH=TREE`) and runs
that tree's `run_reft` / `run_online_st` with that tree's demo config (`_demo_reft()`, Online-ST
from it), `steps=--steps`, no evaluation, from the same warm-up checkpoint (the demo's SFT epoch 13:
`runs/demo/sft/checkpoints/epoch-13`), at `--threads` threads; its figure is the median of the
iterations' own `seconds` metric after the first two. Trees, trainers and precisions are
interleaved within each repeat so background load hits all alike; printed: the median over
repeats per setting, and each tree's ratio against the first tree (first / this: > 1 is faster).
A tree whose code predates `reftune.trainers` (the layout up to commit 9f53c23, e.g. 9f53c23 in a
`git worktree`) is driven through its old module names.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in the measured tree's interpreter state: argv = tree, trainer, precision, steps, threads, warmup, out.
CHILD = r'''
import json, os, statistics, sys, dataclasses
tree, trainer, precision, steps, threads, warmup, out = sys.argv[1:8]
import torch
torch.set_num_threads(int(threads))
import reftune
assert reftune.__file__.startswith(tree), reftune.__file__
old = not os.path.isdir(os.path.join(tree, "reftune", "trainers"))
from reftune.demo import _demo_data, _demo_reft
from reftune.tasks import load_task
cfg = dataclasses.replace(_demo_reft(), model=warmup, data=_demo_data(), out_dir=out, steps=int(steps), eval_every=0,
                          save_every=10**6, mixed_precision=precision, progress=False, tensorboard=False)
if trainer == "reft":
    from importlib import import_module
    run = import_module("reftune.ppo" if old else "reftune.trainers.reft").run_reft
else:
    from importlib import import_module
    mod = import_module("reftune.online_st" if old else "reftune.trainers.online_st")
    cfg, run = mod.online_st_config_from_reft(cfg, out_dir=out), mod.run_online_st
run(cfg, task=load_task(cfg.data))
rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
seconds = [r[f"{trainer}/seconds"] for r in rows if f"{trainer}/seconds" in r][2:]
print("RESULT " + json.dumps(statistics.median(seconds)))
'''


def measure(tree: Path, trainer: str, precision: str, steps: int, threads: int, warmup: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run([sys.executable, "-c", CHILD, str(tree), trainer, precision, str(steps), str(threads),
                              warmup, str(Path(out) / "run")], capture_output=True, text=True, env=env, cwd=tree)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"{tree} {trainer} {precision} failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", required=True, help="warm-up checkpoint (the demo's SFT epoch 13)")
    ap.add_argument("--trees", nargs="+", default=[str(ROOT)], help="source trees; ratios are against the first")
    ap.add_argument("--trainers", nargs="+", choices=("reft", "online_st"), default=["reft", "online_st"])
    ap.add_argument("--precisions", nargs="+", choices=("no", "auto", "bf16"), default=["no", "auto"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3 (the first two iterations are not timed)")
    if not (Path(args.warmup) / "config.json").is_file():
        ap.error(f"--warmup {args.warmup}: not a model folder (no config.json)")
    trees = [Path(t).resolve() for t in args.trees]
    for tree in trees:
        if not (tree / "reftune" / "demo.py").is_file():
            ap.error(f"--trees {tree}: no reftune/demo.py there")
    settings = [(tree, trainer, p) for trainer in args.trainers for p in args.precisions for tree in trees]
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    for r in range(args.repeats):
        for s in (settings if r % 2 == 0 else settings[::-1]):  # order reversed every other repeat
            times[s].append(measure(*s, args.steps, args.threads, args.warmup))
            print(f"[repeat {r + 1}] {s[0].name:12s} {s[1]:10s} {s[2]:5s} {times[s][-1]:.3f} s", flush=True)
    print(f"\n{'tree':24s} {'trainer':10s} {'precision':9s} {'s/iteration':>11s} {'first / this':>12s}")
    for trainer in args.trainers:
        for p in args.precisions:
            base = statistics.median(times[(trees[0], trainer, p)])
            for tree in trees:
                med = statistics.median(times[(tree, trainer, p)])
                print(f"{str(tree)[-24:]:24s} {trainer:10s} {p:9s} {med:11.3f} {base / med:11.2f}x")


if __name__ == "__main__":
    main()
