"""Resumable RL checkpoints: checkpoints/step-N/{policy/, value_head.pt, trainer_state.pt}, the
`latest.json` pointer, `checkpoints/best`, and the RNG state that makes a resume exact."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from reftune.models import save_hf
from reftune.runs import atomic_save, write_json

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
                       keep_last: int = 1) -> Path:
    """Write checkpoints/step-N atomically, then point `latest.json` at it, then prune old steps.

    The folder is written under a temporary name and renamed; `latest.json` is replaced
    atomically. A kill at any moment leaves `latest.json` naming a complete checkpoint.
    """
    ckpt_root = run_dir / "checkpoints"

    def write(d: Path) -> None:
        save_hf(model, tokenizer, d / "policy")
        if value_head is not None:
            torch.save(value_head.state_dict(), d / "value_head.pt")
        torch.save(trainer_state, d / "trainer_state.pt")

    path = atomic_save(write, ckpt_root / f"step-{step:06d}")
    write_json(run_dir / "latest.json", {"step": step, "path": str(path.relative_to(run_dir))})
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_best(run_dir: Path, model, tokenizer, value_head, info: dict) -> Path:
    """checkpoints/best: the policy (HF folder) with the best validation accuracy so far."""
    def write(d: Path) -> None:
        save_hf(model, tokenizer, d / "policy")
        if value_head is not None:
            torch.save(value_head.state_dict(), d / "value_head.pt")
        write_json(d / "info.json", info)

    return atomic_save(write, run_dir / "checkpoints" / "best")


def load_latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(checkpoint folder, trainer_state) of the last complete checkpoint, or None."""
    pointer = run_dir / "latest.json"
    if not pointer.exists():
        return None
    path = run_dir / json.loads(pointer.read_text())["path"]
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is incomplete or missing")
    return path, torch.load(path / "trainer_state.pt", weights_only=False)
