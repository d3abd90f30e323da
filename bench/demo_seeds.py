"""The demo's headline (ReFT vs the full SFT baseline) over several seeds, not one.

    .venv/bin/python bench/demo_seeds.py --seeds 0 1 2 [--out runs/seeds] [--baselines] [key=value ...]

Each seed runs `reftune demo` with that seed (task draw, tiny model init, data order, sampling) into
`OUT/seed-N` (the default `baselines=false`: warm-up, SFT and ReFT with top-1 and voting only, about
8 minutes per seed on 2 cores), then one table: greedy test accuracy of warm-up, SFT and ReFT,
ReFT minus SFT, and the wall time. Finished seeds (a `summary.json` in their folder) are read back,
not re-run, so a sweep continues after its last finished seed; a seed killed mid-run leaves a
folder the demo refuses to overwrite (delete it to re-run that seed). Extra `key=value` overrides go
to every demo run.

A seed moves SFT by several points on its own (which epoch leaves the early plateau), so one run
says little about the gap; the mean and the worst seed say more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reftune.config import load_config  # noqa: E402
from reftune.demo import DemoConfig, load_summary, run_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--baselines", action="store_true", help="also run Offline-ST, Online-ST and reranking")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every demo run")
    args = ap.parse_args()

    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        if (out / "summary.json").exists():
            summary = load_summary(out)
        else:
            overrides = [*args.overrides, f"out_dir={out}", f"seed={seed}", f"baselines={str(args.baselines).lower()}"]
            summary = run_demo(load_config(DemoConfig, None, overrides))
        rows.append((seed, summary))

    print(f"\n{'seed':>4s} {'warm-up':>8s} {'SFT':>6s} {'ReFT':>6s} {'ReFT-SFT':>9s} {'seconds':>8s}")
    gaps = []
    for seed, s in rows:
        w, sft, reft = (100 * s[m]["accuracy"] for m in ("warmup", "sft", "reft"))
        gaps.append(reft - sft)
        print(f"{seed:4d} {w:8.1f} {sft:6.1f} {reft:6.1f} {reft - sft:+9.1f} {s['wall_seconds']:8.0f}")
    mean = {m: statistics.mean(100 * s[m]["accuracy"] for _, s in rows) for m in ("warmup", "sft", "reft")}
    print(f"{'mean':>4s} {mean['warmup']:8.1f} {mean['sft']:6.1f} {mean['reft']:6.1f} {statistics.mean(gaps):+9.1f}")
    print(f"ReFT - SFT: worst {min(gaps):+.1f}, best {max(gaps):+.1f} over {len(gaps)} seeds")


if __name__ == "__main__":
    main()
