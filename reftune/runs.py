"""Run folders on disk: claiming one, the metrics log (JSONL, plus TensorBoard when installed),
atomic writes of JSON files and checkpoint folders, and the progress bar. No torch, no models."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from reftune.config import save_config


def _finite(v):
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


class RunLogger:
    """Appends one JSON object per `log` call to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except Exception:  # tensorboard missing or broken: JSONL still has everything
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: _finite(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint we resume from."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def start_run(run_dir: str | Path, cfg, resume: bool = False) -> Path:
    """Create the run folder and write the resolved config; refuse to overwrite another run's
    checkpoints by accident (pass a new out_dir, or resume)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (run_dir / "checkpoints").exists() and not resume:
        existing = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
        if existing:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints ({', '.join(sorted(existing)[:3])}...): "
                f"choose another out_dir, delete it, or resume with --resume {run_dir}"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def progress(total: int, desc: str, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def atomic_save(save_fn, final_dir: str | Path) -> Path:
    """Write a checkpoint folder into a temporary sibling, then rename it into place.

    A kill while saving leaves at worst a stray `.tmp-*` folder; `final_dir` is either the old
    complete checkpoint or the new complete one, never a half-written mix.
    """
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".tmp-{final_dir.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_fn(tmp)
    old = final_dir.with_name(f".old-{final_dir.name}-{os.getpid()}")
    if final_dir.exists():
        final_dir.rename(old)
    tmp.rename(final_dir)
    if old.exists():
        shutil.rmtree(old)
    return final_dir
