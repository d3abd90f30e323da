"""The demo's headline measured over seeds and both numeric paths, not one run.

    .venv/bin/python bench/demo_study.py [--seeds 0 1 2] [--paths fp32 fp32-avx2] [--out runs/study]
                                         [--jobs 1] [--no-baselines] [key=value ...]

Runs `reftune demo` once per (path, seed) into `OUT/<path>-seed-N` and prints one table per path:
each method's greedy test accuracy per seed, the mean, ReFT - SFT per seed with its mean, standard
error and worst seed, and the wall time of each stage. The two numeric paths are the demo's
`mixed_precision` choices for its RL stages: `fp32` (`reft.mixed_precision=no`: the demo's default,
on every CPU) and `bf16` (`reft.mixed_precision=bf16`: bf16 autocast, what `auto` picks on a GPU or
a CPU with AVX512-BF16/AMX; on a CPU without them torch emulates it, slower). A third, `fp32-avx2`,
is the fp32 path computed the way a CPU without AVX-512 computes it (torch's `ATEN_CPU_CAPABILITY`
and MKL's and oneDNN's ISA limits set to AVX2): float rounding differs between the two kinds, and
so do where SFT ends and how far ReFT gets. Default: `fp32 fp32-avx2`, the two the demo takes. The report
also goes to `OUT/study.md` and `OUT/study.json`, with the machine's CPU model, core count and bf16
features, so the README can show exactly what was run.

Finished runs (a `summary.json` in their folder) are read back, not re-run: a study continues
where it stopped; delete a half-finished run's folder to redo it. `--jobs 2` runs two demos at once
with one thread each (about 1.7x the throughput on 2 cores, but each run's wall time is then a
loaded one: time the 10-minute budget with `--jobs 1`). Extra `key=value` overrides go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each path: the demo override that picks its precision, and the environment its process runs in.
# `fp32-avx2` is the fp32 path with torch's own kernels (softmax, log-softmax, ...) and MKL's and
# oneDNN's held to AVX2: a CPU without AVX-512 rounds exactly so, which is how one machine measures
# both kinds. (On AMD CPUs MKL runs its AVX2 kernels anyway; torch's kernels are what differ.)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PATHS = {"fp32": ("reft.mixed_precision=no", {}), "bf16": ("reft.mixed_precision=bf16", {}),
         "fp32-avx2": ("reft.mixed_precision=no", AVX2_ENV)}
METHODS = ("warmup", "sft", "offline_st", "online_st", "reft")
LABELS = {"warmup": "warm-up", "sft": "SFT", "offline_st": "Offline-ST", "online_st": "Online-ST", "reft": "ReFT"}


def cpu_info() -> dict:
    flags, model = "", platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                     model)
    except OSError:
        pass
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"model": model, "cores": os.cpu_count(), "features": features}


def run_one(out: Path, seed: int, path: str, overrides: list[str], baselines: bool, threads: int) -> dict:
    summary = out / "summary.json"
    if not summary.exists():
        log = out.with_suffix(".log")
        precision, path_env = PATHS[path]
        cmd = [sys.executable, "-m", "reftune.cli", "demo", "--out", str(out), f"seed={seed}", precision,
               f"baselines={str(baselines).lower()}", *([f"threads={threads}"] if threads else []),
               "sft.progress=false", "reft.progress=false", *overrides]
        env = {**os.environ, **path_env, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        print(f"[study] {path} seed {seed}: {' '.join(cmd[3:])} (log: {log})", flush=True)
        with open(log, "w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if rc != 0:
            raise SystemExit(f"[study] {path} seed {seed} failed (exit {rc}); see {log}")
    return json.loads(summary.read_text())


def sem(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def table(path: str, runs: list[tuple[int, dict]]) -> tuple[list[str], dict]:
    methods = [m for m in METHODS if all(m in s for _, s in runs)]
    acc = {m: [100 * s[m]["accuracy"] for _, s in runs] for m in methods}
    gaps = [r - s for r, s in zip(acc["reft"], acc["sft"])]
    head = "| seed | " + " | ".join(LABELS[m] for m in methods) + " | ReFT - SFT | SFT best epoch | wall s |"
    # Runs from before summaries recorded their numerics show "?".
    kernels = sorted({s.get("numerics", {}).get("cpu_capability", "?") for _, s in runs})
    lines = [f"### {path}", "", f"torch's CPU kernels: {', '.join(kernels)}", "", head, "|" + "---|" * (len(methods) + 4)]
    for i, (seed, s) in enumerate(runs):
        lines.append(f"| {seed} | " + " | ".join(f"{acc[m][i]:.2f}" for m in methods)
                     + f" | {gaps[i]:+.2f} | {s['sft_best_epoch']} | {s['wall_seconds']:.0f} |")
    lines.append("| mean | " + " | ".join(f"{statistics.mean(acc[m]):.2f}" for m in methods)
                 + f" | **{statistics.mean(gaps):+.2f}**"
                 + (f" ± {sem(gaps):.2f} (s.e.)" if len(gaps) > 1 else " (one seed: no s.e.)") + " | | "
                 f"{statistics.mean(s['wall_seconds'] for _, s in runs):.0f} |")
    stages = sorted({k for _, s in runs for k in s["stage_seconds"]})
    lines += ["", "Wall seconds per stage (mean over seeds): " + ", ".join(
        f"{k} {statistics.mean(s['stage_seconds'].get(k, 0) for _, s in runs):.0f}" for k in stages), ""]
    stats = {"mean": {m: statistics.mean(v) for m, v in acc.items()}, "reft_minus_sft": gaps,
             "gap_mean": statistics.mean(gaps), "gap_sem": sem(gaps), "gap_worst": min(gaps),
             "per_seed": {seed: {m: acc[m][i] for m in methods} for i, (seed, _) in enumerate(runs)},
             "wall_seconds": {seed: s["wall_seconds"] for seed, s in runs}, "cpu_kernels": kernels}
    return lines, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=["fp32", "fp32-avx2"])
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--jobs", type=int, default=1, help="demos run at once (each with 1 thread when > 1)")
    ap.add_argument("--no-baselines", action="store_true", help="warm-up, SFT and ReFT only (faster)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every demo run")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = [(path, seed) for path in args.paths for seed in args.seeds]
    threads = 1 if args.jobs > 1 else 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(run_one, out / f"{key[0]}-seed-{key[1]}", key[1], key[0], args.overrides,
                                    not args.no_baselines, threads) for key in plan}
        results = {key: f.result() for key, f in futures.items()}

    cpu = cpu_info()
    lines = [f"Machine: {cpu['model']}, {cpu['cores']} cores, CPU features: {', '.join(cpu['features']) or 'none'}"
             f"; {args.jobs} demo(s) at a time. Greedy top-1 accuracy (%) on the "
             f"{next(iter(results.values()))['sft']['n']} test questions.", ""]
    report = {"cpu": cpu, "jobs": args.jobs, "overrides": args.overrides, "paths": {}}
    for path in args.paths:
        path_lines, stats = table(path, [(seed, results[(path, seed)]) for seed in args.seeds])
        lines += path_lines
        report["paths"][path] = stats
    text = "\n".join(lines)
    print("\n" + text)
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
