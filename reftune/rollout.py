"""What every online trainer shares: which questions a step uses, sampling and scoring them,
and resumable RL checkpoints. ReFT (ppo.py) and Online self-training (online_st.py) both use it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from reftune.generation import Generator, Rollout
from reftune.tasks import Example, Graded, Task


def correctness_score(graded: Graded, correct: float = 1.0, wrong: float = 0.1, none: float = 0.0) -> float:
    """ReFT's reward: `correct` if the answer is right, `wrong` if an answer was extracted but is
    wrong, `none` if nothing usable was extracted (the paper: 1 / 0.1 / 0)."""
    if graded.correct:
        return correct
    return wrong if graded.answer is not None else none


def step_questions(examples: list[Example], step: int, per_step: int, seed: int) -> list[Example]:
    """The questions of optimizer step `step` (0-based): epochs over a seeded permutation.

    A pure function of (step, seed), so a resumed run sees exactly the questions the
    uninterrupted run would have seen, with no data-loader state to save.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("the training split is empty")
    picked, orders = [], {}
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed * 100_003 + epoch).shuffle(orders[epoch])
        picked.append(examples[orders[epoch][offset]])
    return picked


@dataclass
class ScoredRollout:
    rollout: Rollout
    examples: list[Example]
    """One entry per row (a question repeated `samples_per_prompt` times)."""
    graded: list[Graded]
    scores: torch.Tensor
    """(B,) float32 sequence scores."""


def sample_and_score(generator: Generator, task: Task, questions: list[Example], samples_per_prompt: int,
                     temperature: float, top_p: float, max_new_tokens: int, reward: dict) -> ScoredRollout:
    """Sample `samples_per_prompt` CoTs per question and score each with `correctness_score`."""
    prompts = [task.prompt(ex, for_generation=True) for ex in questions]
    rollout = generator.generate(prompts, num_samples=samples_per_prompt, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens)
    examples = [questions[i] for i in rollout.prompt_index]
    graded = task.grade(rollout.texts, examples)
    scores = torch.tensor([correctness_score(g, **reward) for g in graded], dtype=torch.float32)
    return ScoredRollout(rollout, examples, graded, scores)


# ---------------------------------------------------------------------------------------------
# resumable checkpoints: checkpoints/step-N/{policy/, value_head.pt, trainer_state.pt}
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
    from reftune.modeling import atomic_save, save_hf
    from reftune.tracking import write_json

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
    from reftune.modeling import atomic_save, save_hf
    from reftune.tracking import write_json

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
