"""Resumable checkpoints, one format for every trainer, and the RNG state that makes a resume exact.

    <run>/latest.json            {"step": N, "path": FOLDER, ...}: the resume point, replaced atomically
    <run>/FOLDER/policy/         the policy as an HF folder (LoRA: the merged weights)
    <run>/FOLDER/NAME.pt         each other trained module (ReFT's value_head.pt)
    <run>/FOLDER/trainer_state.pt

FOLDER is `checkpoints/step-N` for the trainers counted in steps (ReFT, Online-ST: the last one is
kept) and `resume` for those counted in epochs (SFT: the epochs it keeps are `checkpoints/epoch-N`,
ordinary HF folders; `resume/policy` links to the epoch's files when that epoch is kept).
`trainer_state.pt` holds: trainer, step, optimizer, rng (rng_per_rank with several processes),
best_accuracy, history; a LoRA run's adapter; the scheduler and data-order states of trainers
with them; and the trainer's own keys (SFT: epoch, checkpoints, best_epoch). `checkpoints/best`
is the policy with the best evaluation accuracy so far, with its `info.json`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from reftune.models import save_hf
from reftune.runs import atomic_save, note, write_json

STATE_FILE = "trainer_state.pt"
RESUME_DIR = "resume"
"""The epoch trainers' checkpoint folder in the run folder (rewritten after every epoch)."""


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


def save_checkpoint(run_dir: Path, folder: str, model, tokenizer, trainer_state: dict, *,
                    modules: dict[str, dict] | None = None, policy_state: dict | None = None,
                    policy_from: Path | None = None, pointer: dict | None = None, keep_last: int = 0) -> Path:
    """Write the resumable checkpoint `run_dir/folder` atomically, then point `latest.json` at it.

    The folder is written under a temporary name and swapped in; `latest.json` is replaced
    atomically, so a kill at any moment leaves `latest.json` naming a complete checkpoint.
    `modules`: name -> state dict of each module saved beside the policy (NAME.pt).
    `policy_state`: a whole state dict to write instead of the model's own (gathered fsdp2 shards,
    merged LoRA weights); `policy_from`: an HF folder of these very weights to link instead.
    `pointer`: more keys for `latest.json` (SFT: the epoch). `keep_last` > 0: afterwards, remove
    all but the newest `keep_last` sibling folders that share the folder's name up to its last '-'.
    """
    def write(d: Path) -> None:
        if policy_from is not None and policy_from.is_dir():
            _link_tree(policy_from, d / "policy")
        else:
            save_hf(model, tokenizer, d / "policy", policy_state)
        for name, state in (modules or {}).items():
            torch.save(state, d / f"{name}.pt")
        torch.save(trainer_state, d / STATE_FILE)

    path = atomic_save(write, run_dir / folder)
    write_json(run_dir / "latest.json", {"step": trainer_state["step"], "path": folder, **(pointer or {})})
    if keep_last:
        stem = path.name.rsplit("-", 1)[0]
        siblings = sorted(p for p in path.parent.glob(f"{stem}-*") if p.is_dir())
        for old in siblings[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_best(run_dir: Path, model, tokenizer, modules: dict[str, dict], info: dict,
              policy_state: dict | None = None) -> Path:
    """checkpoints/best: the policy (HF folder) with the best evaluation accuracy so far, its other
    modules (`modules`: name -> state dict) and `info.json`."""
    def write(d: Path) -> None:
        save_hf(model, tokenizer, d / "policy", policy_state)
        for name, state in modules.items():
            torch.save(state, d / f"{name}.pt")
        write_json(d / "info.json", info)

    return atomic_save(write, run_dir / "checkpoints" / "best")


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders with a trainer state, oldest first (the step folders, then `resume`)."""
    found = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / STATE_FILE).exists())
    return found + ([run_dir / RESUME_DIR] if (run_dir / RESUME_DIR / STATE_FILE).exists() else [])


def load_latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(checkpoint folder, trainer state) of the last complete checkpoint, or None. A state written
    by an earlier layout (SFT's before the shared format) is read into this one (`upgrade_state`)."""
    pointer = run_dir / "latest.json"
    if not pointer.exists():
        return None
    try:
        path = run_dir / json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        # written atomically, so only damaged by hand: fall back to the newest complete checkpoint
        complete = _complete_checkpoints(run_dir)
        if not complete:
            raise FileNotFoundError(f"{pointer} is damaged and no complete checkpoint is left to resume from") from None
        path = complete[-1]
        note(f"{pointer} is damaged; resuming from the newest complete checkpoint, {path.name}")
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is incomplete or missing")
    try:
        state = torch.load(path / STATE_FILE, weights_only=False)
    except Exception as e:  # a damaged pickle: say which file
        raise FileNotFoundError(f"{path / STATE_FILE} cannot be read ({type(e).__name__}: {e})") from None
    return path, upgrade_state(state)


def upgrade_state(state: dict) -> dict:
    """A trainer state in the shared layout. SFT's earlier one named the best accuracy `best_acc`
    and keyed an fsdp2 run's gathered AdamW state by the policy's own parameter names, where the
    shared loop keys it by the tree of every optimized module (the policy is its entry "0")."""
    if "best_acc" not in state:
        return state
    state = {**{k: v for k, v in state.items() if k != "best_acc"}, "trainer": "sft", "best_accuracy": state["best_acc"]}
    state["optimizer"] = _prefix_parameter_names(state["optimizer"], "0.")
    return state


def _prefix_parameter_names(optimizer_state: dict, prefix: str) -> dict:
    """An optimizer state dict whose parameters are named (fsdp2's gathered form) with `prefix` put
    before every name; one keyed by parameter number (a plain `optimizer.state_dict()`) as it is."""
    if not any(isinstance(k, str) for k in optimizer_state.get("state", {})):
        return optimizer_state
    return {**optimizer_state,
            "state": {prefix + k: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [prefix + p for p in g["params"]]} for g in optimizer_state["param_groups"]]}
