"""Resumable RL checkpoints: checkpoints/step-N/{policy/, value_head.pt, trainer_state.pt}, the
`latest.json` pointer, `checkpoints/best`, and the RNG state that makes a resume exact."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from reftune.models import save_hf
from reftune.runs import atomic_save, note, write_json
from reftune.trainers.distributed import Dist, load_optimizer_state

# ---------------------------------------------------------------------------------------------

def rng_state(generator) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(generator, "rng", None) is not None:
        state["sampler"] = generator.rng.get_state()
    return state


def set_rng_state(state: dict, generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "sampler" in state and getattr(generator, "rng", None) is not None:
        generator.rng.set_state(state["sampler"])


def save_rl_checkpoint(run_dir: Path, step: int, model, tokenizer, value_head, trainer_state: dict,
                       keep_last: int = 1, policy_state: dict | None = None, value_state: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically, then point `latest.json` at it, then prune old steps.

    The folder is written under a temporary name and renamed; `latest.json` is replaced
    atomically. A kill at any moment leaves `latest.json` naming a complete checkpoint.
    `policy_state` / `value_state`: whole state dicts to write instead of the modules' own (sharded
    modules under fsdp2).
    """
    ckpt_root = run_dir / "checkpoints"

    def write(d: Path) -> None:
        save_hf(model, tokenizer, d / "policy", policy_state)
        if value_head is not None:
            torch.save(value_state if value_state is not None else value_head.state_dict(), d / "value_head.pt")
        torch.save(trainer_state, d / "trainer_state.pt")

    path = atomic_save(write, ckpt_root / f"step-{step:06d}")
    write_json(run_dir / "latest.json", {"step": step, "path": str(path.relative_to(run_dir))})
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_best(run_dir: Path, model, tokenizer, value_head, info: dict, policy_state: dict | None = None,
              value_state: dict | None = None) -> Path:
    """checkpoints/best: the policy (HF folder) with the best validation accuracy so far."""
    def write(d: Path) -> None:
        save_hf(model, tokenizer, d / "policy", policy_state)
        if value_head is not None:
            torch.save(value_state if value_state is not None else value_head.state_dict(), d / "value_head.pt")
        write_json(d / "info.json", info)

    return atomic_save(write, run_dir / "checkpoints" / "best")


def load_latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(checkpoint folder, trainer_state) of the last complete checkpoint, or None."""
    pointer = run_dir / "latest.json"
    if not pointer.exists():
        return None
    try:
        path = run_dir / json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        # written atomically, so only damaged by hand: fall back to the newest complete checkpoint
        complete = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.pt").exists())
        if not complete:
            raise FileNotFoundError(f"{pointer} is damaged and no complete step checkpoint is left to resume from") from None
        path = complete[-1]
        note(f"{pointer} is damaged; resuming from the newest complete checkpoint, {path.name}")
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is incomplete or missing")
    try:
        return path, torch.load(path / "trainer_state.pt", weights_only=False)
    except Exception as e:  # a damaged pickle: say which file
        raise FileNotFoundError(f"{path / 'trainer_state.pt'} cannot be read ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------- SFT

SFT_STATE_DIR = "resume"
"""SFT's resume point, in the run folder: `resume/policy` (the weights after the last complete
epoch, whether or not `save_epochs` keeps that epoch) and `resume/trainer_state.pt`."""


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` as hard links to `src`'s files (no second copy on disk; checkpoint files are never
    rewritten in place, only replaced); copies where the file system has no hard links."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_dir():
            _link_tree(f, dst / f.name)
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def save_sft_state(run_dir: Path, model, tokenizer, *, epoch: int, step: int, optimizer_state: dict, scheduler,
                   order_rng, rngs: list[dict], history: list, checkpoints: dict, best_epoch, best_acc: float,
                   policy_state: dict | None = None, adapter: dict | None = None) -> Path:
    """After every SFT epoch: everything the next epoch depends on (weights, AdamW and LR-schedule
    state, the data-order RNG, each rank's torch/python RNG, history, best epoch; a LoRA run's
    adapter), written atomically, then `latest.json`. A kill at any moment leaves the previous
    epoch's complete state. The weights are hard links to this epoch's checkpoint when it is kept;
    `policy_state` replaces the model's own (gathered fsdp2 shards, merged LoRA weights)."""
    state = {"epoch": epoch, "step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "order_rng": order_rng.getstate(), "rng": rngs[0], "history": history,
             "checkpoints": dict(checkpoints), "best_epoch": best_epoch, "best_acc": best_acc,
             **({"rng_per_rank": rngs} if len(rngs) > 1 else {}), **({"adapter": adapter} if adapter else {})}

    kept = Path(checkpoints[epoch]) if epoch in checkpoints else None

    def write(d: Path) -> None:
        if kept is not None and kept.is_dir():
            _link_tree(kept, d / "policy")
        else:
            save_hf(model, tokenizer, d / "policy", policy_state)
        torch.save(state, d / "trainer_state.pt")

    path = atomic_save(write, run_dir / SFT_STATE_DIR)
    write_json(run_dir / "latest.json", {"epoch": epoch, "step": step, "path": SFT_STATE_DIR})
    return path


def restore_sft_state(state: dict, model, optimizer, scheduler, order_rng, generator, dist: Dist):
    """Load a `save_sft_state` state into the fresh optimizer (sharded again under fsdp2),
    scheduler and this rank's RNGs; returns (first epoch to run, step, best_epoch, best_acc,
    checkpoints, history)."""
    if "order_rng" not in state:
        raise FileNotFoundError("the resume state is not an SFT run's (no data-order state): is this an RL run folder?")
    rngs = state.get("rng_per_rank", [state["rng"]])
    if len(rngs) != dist.world_size:
        raise ValueError(f"the SFT run was written by {len(rngs)} process(es), this one has {dist.world_size}: "
                         f"resume with the same number of processes")
    load_optimizer_state(model, optimizer, state["optimizer"], dist)
    scheduler.load_state_dict(state["scheduler"])
    order_rng.setstate(state["order_rng"])
    set_rng_state(rngs[dist.rank], generator)
    checkpoints = {int(k): v for k, v in state["checkpoints"].items()}
    return (state["epoch"] + 1, state["step"], state["best_epoch"], state["best_acc"], checkpoints,
            list(state["history"]))
