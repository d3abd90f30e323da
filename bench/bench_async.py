"""Samples per second of `reftune train` on the demo's warm-up model, max_staleness=0 against 1.

    .venv/bin/python bench/bench_async.py [--warmup CKPT] [--steps 14] [--repeats 3]
        [--settings sync:2 async:1+1] [--max-load 1.0]

Each measurement is a fresh process running `run_reft` with the demo's ReFT config (`_demo_reft()`:
32 questions x 4 samples = 128 rows a step, engine static, fp32; without dynamic sampling, whose
refills would make the rows per step vary), `steps=--steps`, no evaluation,
no checkpoint before the end, from the warm-up checkpoint. A setting is `sync:T` (max_staleness=0,
T threads) or `async:G+T` (max_staleness=1, G threads for the rollout process, T for the trainer).
On 2 cores each uses both: `sync:2` and `async:1+1`. Settings are interleaved within each repeat,
the order reversed every other repeat, so background load hits all alike. The figure of a run is
the median wall time between consecutive steps' log records after the first two (everything a
step costs: rollout or waiting for it, passes, update, weight push); samples/s = 128 / that.
Printed: per setting the median over repeats, its ratio to the first setting, and the split of
the median iteration: the trainer's rollout time (sync: sampling and scoring; async: waiting for
the rollout process), its own work and its CPU seconds (all its threads), and (async) what the
rollout process spent sampling, on the reference pass, and its CPU seconds. CPU seconds are what
a step's work costs even when other jobs share the cores (wall times are not: with one core taken
by another job, two processes of one thread each share the other). Before each measurement the bench
waits (up to --wait-minutes) for the 1-minute load average to drop below --max-load, and prints
the load seen with every figure.

Without --warmup the demo's warm-up model is built once (the demo's tiny model and its SFT, epoch
13 of 18, on its task; about 10 minutes on 2 quiet cores) into runs/bench-cache/demo-warmup.
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

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "bench-cache" / "demo-warmup"

# One measurement, in a fresh interpreter: argv = warmup, out, steps, max_staleness, rollout_threads.
CHILD = r'''
import dataclasses, json, os, statistics, sys, time
from reftune.runtime import configure_threads
configure_threads(0)  # OMP_NUM_THREADS from the bench: the threads of this process
warmup, out, steps, staleness, rollout_threads = sys.argv[1:6]
from reftune.demo import _demo_data, _demo_reft
from reftune.tasks import load_task
from reftune.trainers.loop import Callbacks
from reftune.trainers.reft import run_reft
cpu = []  # this process's CPU seconds at each step's end
cfg = dataclasses.replace(_demo_reft(), model=warmup, data=_demo_data(), out_dir=out, steps=int(steps), eval_every=0,
                          save_every=10**6, progress=False, tensorboard=False, max_staleness=int(staleness),
                          rollout_threads=int(rollout_threads), dynamic_sampling=False)  # the overlap alone
run_reft(cfg, task=load_task(cfg.data), callbacks=Callbacks(on_step_end=lambda done, m: cpu.append(time.process_time())))
rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
for row, a, b in zip(rows[1:], cpu, cpu[1:]):
    row["trainer_cpu"] = b - a
print("RESULT " + json.dumps({"rows": cfg.questions_per_step * cfg.samples_per_prompt, "records": rows}))
'''


def build_warmup(out: Path) -> Path:
    """The demo's warm-up model: its tiny model, then its SFT run (18 epochs), epoch 13 kept."""
    import dataclasses

    from reftune.runtime import configure_threads

    configure_threads(0)
    from reftune.demo import DemoConfig
    from reftune.tasks import load_task
    from reftune.tiny import build_tiny_model, tokenizer_corpus
    from reftune.trainers.sft import run_sft

    demo = DemoConfig()
    task = load_task(demo.data)
    model = build_tiny_model(out / "tiny", tokenizer_corpus(task), demo.tiny)
    cfg = dataclasses.replace(demo.sft, model=str(model), data=demo.data, out_dir=str(out / "sft"),
                              save_epochs=[demo.warmup_epoch], eval_split="none", progress=False, tensorboard=False)
    return Path(run_sft(cfg, task=task)["checkpoints"][demo.warmup_epoch])


def parse_setting(text: str) -> dict:
    kind, _, threads = text.partition(":")
    if kind == "sync" and threads.isdigit():
        return {"name": text, "staleness": 0, "rollout_threads": 0, "threads": int(threads)}
    gen, _, train = threads.partition("+")
    if kind == "async" and gen.isdigit() and train.isdigit():
        return {"name": text, "staleness": 1, "rollout_threads": int(gen), "threads": int(gen) + int(train)}
    raise argparse.ArgumentTypeError(f"{text!r}: a setting is sync:T or async:G+T (threads)")


def wait_quiet(max_load: float, minutes: float) -> float:
    deadline = time.time() + 60 * minutes
    while os.getloadavg()[0] > max_load and time.time() < deadline:
        time.sleep(15)
    return os.getloadavg()[0]


def measure(setting: dict, warmup: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(setting["threads"]),
           "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run([sys.executable, "-c", CHILD, str(warmup), str(Path(out) / "run"), str(steps),
                              str(setting["staleness"]), str(setting["rollout_threads"])],
                             capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"{setting['name']} failed:\n{run.stderr[-3000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    return summarize(result["records"], result["rows"])


def summarize(records: list[dict], rows: int) -> dict:
    """Median seconds per step after the first two, samples/s, and the split of that median step."""
    walls = [b["time"] - a["time"] for a, b in zip(records[1:], records[2:])]
    wall = statistics.median(walls)
    kept = records[2:]

    def med(key):
        values = [r[key] for r in kept if key in r]
        return statistics.median(values) if values else 0.0

    wait, own = med("reft/seconds_generate"), med("reft/seconds") - med("reft/seconds_generate")
    return {"wall": wall, "samples_per_s": rows / wall, "wait": wait, "trainer": own,
            "rollout_generate": med("reft/seconds_rollout_generate"),
            "rollout_reference": med("reft/seconds_rollout_reference"),
            "trainer_cpu": med("trainer_cpu"), "rollout_cpu": med("reft/seconds_rollout_cpu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", default="", help="warm-up checkpoint (default: build the demo's into runs/bench-cache)")
    ap.add_argument("--settings", nargs="+", type=parse_setting, default=None, metavar="SETTING",
                    help="sync:T and/or async:G+T (default: sync:2 async:1+1); ratios are against the first")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-load", type=float, default=1.0, help="wait for the 1-minute load average to drop below this")
    ap.add_argument("--wait-minutes", type=float, default=5.0, help="how long to wait for it before each measurement")
    args = ap.parse_args()
    settings = args.settings or [parse_setting("sync:2"), parse_setting("async:1+1")]
    if args.steps < 4:
        ap.error("--steps must be at least 4 (the first two steps are not timed)")
    warmup = Path(args.warmup) if args.warmup else CACHE / "sft" / "checkpoints" / "epoch-13"
    if not (warmup / "config.json").is_file():
        if args.warmup:
            ap.error(f"--warmup {args.warmup}: not a model folder (no config.json)")
        print(f"building the demo's warm-up model into {CACHE} ...", flush=True)
        warmup = build_warmup(CACHE)
    print(f"cpus {os.cpu_count()}, warm-up {warmup}, {args.steps} steps, {args.repeats} repeats", flush=True)
    results: dict[str, list[dict]] = {s["name"]: [] for s in settings}
    for r in range(args.repeats):
        for s in (settings if r % 2 == 0 else settings[::-1]):
            load = wait_quiet(args.max_load, args.wait_minutes)
            got = {**measure(s, warmup, args.steps), "load": load}
            results[s["name"]].append(got)
            print(f"[repeat {r + 1}] {s['name']:10s} {got['wall']:.3f} s/step  {got['samples_per_s']:6.1f} samples/s  "
                  f"(load before: {load:.2f})", flush=True)
    report(settings, results)


def report(settings: list[dict], results: dict[str, list[dict]]) -> None:
    print(f"\n{'setting':10s} {'s/step':>7s} {'samples/s':>9s} {'vs first':>8s} | trainer: {'rollout':>7s} {'own':>5s} "
          f"{'cpu':>5s} | rollout process: {'sample':>6s} {'ref':>5s} {'cpu':>5s} | loads")
    base = None
    for s in settings:
        runs = sorted(results[s["name"]], key=lambda x: x["wall"])
        mid = runs[len(runs) // 2]
        speed = statistics.median(x["samples_per_s"] for x in runs)
        base = base or speed
        loads = " ".join(f"{x['load']:.2f}" for x in results[s["name"]])
        print(f"{s['name']:10s} {mid['wall']:7.3f} {speed:9.1f} {speed / base:7.2f}x | trainer: {mid['wait']:7.2f} "
              f"{mid['trainer']:5.2f} {mid['trainer_cpu']:5.2f} | rollout process: {mid['rollout_generate']:6.2f} "
              f"{mid['rollout_reference']:5.2f} {mid['rollout_cpu']:5.2f} | {loads}")


if __name__ == "__main__":
    main()
