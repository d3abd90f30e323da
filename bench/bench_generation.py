"""Superseded by bench/bench_rollout.py (every engine, rollout and greedy workloads, memory, share of
the fp32 peak); kept so `make bench` and older notes keep working: runs bench_rollout with the
same arguments."""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("bench_rollout.py")), run_name="__main__")
