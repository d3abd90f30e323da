"""What every online trainer does first in a step: pick the step's questions, sample CoTs for them
and score each with the task's grader and ReFT's reward. ReFT and Online self-training use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from reftune.engines.base import Generator, Rollout
from reftune.rewards.score import RewardSpec, correctness_score
from reftune.tasks import Task
from reftune.types import Example, Graded


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
                     temperature: float, top_p: float, max_new_tokens: int, reward: RewardSpec) -> ScoredRollout:
    """Sample `samples_per_prompt` CoTs per question and score each with `correctness_score`."""
    prompts = [task.prompt(ex, for_generation=True) for ex in questions]
    rollout = generator.generate(prompts, num_samples=samples_per_prompt, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens)
    examples = [questions[i] for i in rollout.prompt_index]
    graded = task.grade(rollout.texts, examples)
    scores = torch.tensor([correctness_score(g, reward) for g in graded], dtype=torch.float32)
    return ScoredRollout(rollout, examples, graded, scores)
