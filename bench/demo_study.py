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

`--variants NAME:key=value,key=value ...` then trains ReFT again from each seed's warm-up
checkpoint (the `fp32` demo run of that seed, run first if missing) once per variant, with the
demo's ReFT settings and those overrides (`reft.*` keys), one thread each, and evaluates the best
checkpoint on validation on the test split as the demo does: the table gives, per variant and
seed, the best validation accuracy, test accuracy, ReFT - SFT on both, and ReFT's CPU seconds
(the process and its children: rollout process, sandbox). The demo run's own ReFT is the
`default` row. Variants go to `OUT/variants/<name>-seed-N`, finished ones are read back. A second
table (`--by-step`) gives each variant's mean validation margin had it stopped after N iterations:
ReFT's lr is constant, so a shorter run is a prefix of the logged one, and the table shows what a
smaller time budget would cost.

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
import time
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


def run_variant(base: Path, out: Path, seed: int, overrides: list[str]) -> dict:
    """ReFT with `overrides` from the warm-up of the demo run in `base`, then its test accuracy."""
    result = out / "result.json"
    if not result.exists():
        log = out.with_suffix(".log")
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"[study] {out.name}: {' '.join(overrides)} (log: {log})", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "w") as fh:
            rc = subprocess.call([sys.executable, __file__, "--variant-child", str(base), str(out), str(seed),
                                  *overrides], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if rc != 0:
            raise SystemExit(f"[study] {out.name} failed; see {log}")
    return json.loads(result.read_text())


def variant_child(base: Path, out: Path, seed: int, overrides: list[str]) -> None:
    """In a fresh process: the demo's step 3 with `overrides`, then step 6's greedy test accuracy."""
    import resource

    import torch

    from reftune.config import load_config
    from reftune.demo import DemoConfig, reft_stage_config, seeded
    from reftune.inference.evaluate import EvalConfig, run_eval
    from reftune.tasks import load_task
    from reftune.trainers.reft import run_reft

    torch.set_num_threads(1)
    cfg = seeded(load_config(DemoConfig, None, [f"seed={seed}", "threads=1", "reft.progress=false", *overrides]))
    cfg.validate()
    task = load_task(cfg.data)
    start = time.time()
    reft = run_reft(reft_stage_config(cfg, str(base / "sft" / "checkpoints" / f"epoch-{cfg.warmup_epoch}"), out),
                    task=task)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    test = run_eval(EvalConfig(model=reft["best_checkpoint"], data=cfg.data, split="test", engine=cfg.reft.engine,
                               max_new_tokens=cfg.reft.eval_max_new_tokens, gen_batch_size=cfg.reft.gen_batch_size,
                               seed=cfg.seed, out_dir=str(out / "eval"), progress=False))
    (out / "result.json").write_text(json.dumps({
        "overrides": overrides, "validation": reft["best_accuracy"], "test": test["accuracy"],
        "best_step": best_step(out / "reft" / "metrics.jsonl", reft["best_accuracy"]),
        "reft_cpu_seconds": round(cpu, 1), "reft_wall_seconds": round(time.time() - start, 1)}, indent=1))


def best_step(metrics: Path, best: float) -> int | None:
    """The first step whose validation accuracy is the run's best (the one its best checkpoint holds)."""
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if abs(record.get("eval/validation_accuracy", -1.0) - best) < 1e-12:
            return record["step"]
    return None


def best_by_step(metrics: Path, last: int) -> float | None:
    """The best validation accuracy logged at or before step `last` (None: no evaluation yet, or the
    run stopped before `last`). ReFT's lr is constant, so a run of `last` steps is this run's
    prefix: this is what it would have reached."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    seen = [r["eval/validation_accuracy"] for r in records if "eval/validation_accuracy" in r and r["step"] <= last]
    return max(seen) if seen and max(r["step"] for r in records) >= last else None


def by_step_table(out: Path, seeds: list[int], names: list[str], steps: list[int]) -> tuple[list[str], dict]:
    """Mean validation margin over SFT had each variant stopped after each of `steps` iterations."""
    bases = {seed: out / f"fp32-seed-{seed}" for seed in seeds}
    sft = {seed: sft_validation(bases[seed], json.loads((bases[seed] / "summary.json").read_text()))
           for seed in seeds}
    lines = ["### Validation margin over SFT by ReFT iteration", "",
             "Mean over seeds of (best validation accuracy up to that iteration) - (SFT's), in points: what a "
             "shorter run of the same settings would have chosen from (the lr is constant).", "",
             "| variant | " + " | ".join(f"by {n}" for n in steps) + " |", "|---|" + "---|" * len(steps)]
    report = {}
    for name in ["default", *names]:
        folder = {seed: bases[seed] if name == "default" else out / "variants" / f"{name}-seed-{seed}"
                  for seed in seeds}
        means = []
        for n in steps:
            best = [best_by_step(folder[seed] / "reft" / "metrics.jsonl", n) for seed in seeds]
            means.append(None if None in best else statistics.mean(100 * (b - sft[s]) for b, s in zip(best, seeds)))
        report[name] = dict(zip(steps, means))
        lines.append(f"| {name} | " + " | ".join("-" if m is None else f"{m:+.2f}" for m in means) + " |")
    return lines + [""], report


def demo_reft(base: Path, summary: dict) -> dict:
    """The `default` row from the demo run itself: its ReFT's best validation and test accuracy."""
    history = [json.loads(line) for line in (base / "reft" / "metrics.jsonl").read_text().splitlines()]
    best = max(r["eval/validation_accuracy"] for r in history if "eval/validation_accuracy" in r)
    return {"overrides": [], "validation": best, "test": summary["reft"]["accuracy"],
            "best_step": best_step(base / "reft" / "metrics.jsonl", best),
            "reft_cpu_seconds": None, "reft_wall_seconds": None}


def sft_validation(base: Path, summary: dict) -> float:
    history = json.loads((base / "sft" / "result.json").read_text())["history"]
    return next(h["validation_accuracy"] for h in history if h["epoch"] == summary["sft_best_epoch"])


def variants_table(out: Path, seeds: list[int], variants: dict[str, list[str]], jobs: int) -> tuple[list[str], dict]:
    bases = {seed: out / f"fp32-seed-{seed}" for seed in seeds}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {(name, seed): pool.submit(run_variant, bases[seed], out / "variants" / f"{name}-seed-{seed}",
                                             seed, overrides)
                   for name, overrides in variants.items() for seed in seeds}
        rows = {key: f.result() for key, f in futures.items()}
    summaries = {seed: json.loads((bases[seed] / "summary.json").read_text()) for seed in seeds}
    for seed in seeds:
        rows[("default", seed)] = demo_reft(bases[seed], summaries[seed])
    lines = ["### ReFT variants from each seed's warm-up (fp32)", "",
             "Validation / test accuracy (%) of the best-on-validation step; margins against the seed's SFT "
             "(best epoch on validation); CPU s: ReFT's training process and its children.", "",
             "| variant | overrides | seed | best step | validation | test | val - SFT | test - SFT | CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    report = {}
    for name in ["default", *variants]:
        margins = []
        for seed in seeds:
            row, summary = rows[(name, seed)], summaries[seed]
            val_gap = 100 * (row["validation"] - sft_validation(bases[seed], summary))
            test_gap = 100 * (row["test"] - summary["sft"]["accuracy"])
            margins.append((val_gap, test_gap, row["reft_cpu_seconds"]))
            cpu = "-" if row["reft_cpu_seconds"] is None else f"{row['reft_cpu_seconds']:.0f}"
            lines.append(f"| {name} | {' '.join(row['overrides']) or 'the demo'} | {seed} | {row['best_step']} | "
                         f"{100 * row['validation']:.2f} | {100 * row['test']:.2f} | {val_gap:+.2f} | "
                         f"{test_gap:+.2f} | {cpu} |")
        val_mean, test_mean = (statistics.mean(m[i] for m in margins) for i in (0, 1))
        cpus = [m[2] for m in margins if m[2] is not None]
        cpu_mean = f"{statistics.mean(cpus):.0f}" if cpus else "-"
        lines.append(f"| **{name}** | mean | | | | | **{val_mean:+.2f}** | **{test_mean:+.2f}** "
                     f"(worst {min(m[1] for m in margins):+.2f}) | {cpu_mean} |")
        report[name] = {"validation_margin": val_mean, "test_margin": test_mean,
                        "per_seed": {seed: rows[(name, seed)] for seed in seeds}}
    return lines + [""], report


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not name or not overrides or name == "default":
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is NAME:key=value[,key=value...] (NAME not 'default')")
    return name, overrides.split(",")


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
    ap.add_argument("--variants", nargs="+", type=parse_variant, default=[], metavar="NAME:K=V,...",
                    help="ReFT variants trained from each seed's fp32 warm-up (see above)")
    ap.add_argument("--by-step", type=int, nargs="*", default=[100, 200, 260, 300, 360, 450], metavar="N",
                    help="with --variants: also the mean validation margin had each run stopped at iteration N")
    if sys.argv[1:2] == ["--variant-child"]:
        base, out, seed, *overrides = sys.argv[2:]
        return variant_child(Path(base), Path(out), int(seed), overrides)
    args = ap.parse_args()
    if args.variants and "fp32" not in args.paths:
        ap.error("--variants starts from the fp32 demo runs: keep fp32 in --paths")

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
    if args.variants:
        variant_lines, report["variants"] = variants_table(out, args.seeds, dict(args.variants), args.jobs)
        lines += variant_lines
        if args.by_step:
            step_lines, report["variants_by_step"] = by_step_table(out, args.seeds, [n for n, _ in args.variants],
                                                                   args.by_step)
            lines += step_lines
    text = "\n".join(lines)
    print("\n" + text)
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
