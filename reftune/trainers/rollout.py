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


def take_rows(scored: ScoredRollout, rows: list[int]) -> ScoredRollout:
    """Rows `rows` of a scored rollout, in that order: prompts renumbered in order of first use,
    response columns cut to the longest kept response."""
    ro = scored.rollout
    index = torch.tensor(rows, dtype=torch.long)
    width = int(ro.response_mask[index.to(ro.response_mask.device)].sum(-1).max()) if rows else 0

    def pick(t, per_token=False):
        if t is None:
            return None
        t = t[index.to(t.device)]
        return t[:, :width] if per_token else t

    renumber: dict[int, int] = {}
    prompt_index = [renumber.setdefault(ro.prompt_index[i], len(renumber)) for i in rows]
    rollout = Rollout(pick(ro.prompt_ids), pick(ro.prompt_mask), pick(ro.response_ids, True),
                      pick(ro.response_mask, True), [ro.texts[i] for i in rows], prompt_index, pick(ro.ended_with_eos),
                      pick(ro.sampling_logprobs, True), pick(ro.sampling_values, True))
    return ScoredRollout(rollout, [scored.examples[i] for i in rows], [scored.graded[i] for i in rows],
                         scored.scores[index])


def concat_scored(parts: list[ScoredRollout], pad_id: int) -> ScoredRollout:
    """Scored rollouts one after the other (engines.base.concat_rollouts: prompts re-left-padded,
    responses re-right-padded), each part's prompt numbers shifted past the previous parts'."""
    import dataclasses

    from reftune.engines.base import concat_rollouts

    if len(parts) == 1:
        return parts[0]
    rollout = concat_rollouts([p.rollout for p in parts], pad_id)
    prompt_index, offset = [], 0
    for p in parts:
        prompt_index += [offset + i for i in p.rollout.prompt_index]
        offset += max(p.rollout.prompt_index, default=-1) + 1
    return ScoredRollout(dataclasses.replace(rollout, prompt_index=prompt_index),
                         [e for p in parts for e in p.examples], [g for p in parts for g in p.graded],
                         torch.cat([p.scores for p in parts]))


def step_metrics(prefix: str, scored: ScoredRollout, stats: dict[str, list[float]], **values: float) -> dict:
    """An online trainer's metrics of one step, each key under `prefix/`: of its samples (mean score,
    accuracy, answered fraction, mean response length), the trainer's own `values`, and the mean of
    each of its update `stats` over the step's updates."""
    n_rows = max(len(scored.graded), 1)
    return {
        f"{prefix}/score": float(scored.scores.mean()),
        f"{prefix}/accuracy": sum(g.correct for g in scored.graded) / n_rows,
        f"{prefix}/answered": sum(g.answer is not None for g in scored.graded) / n_rows,
        f"{prefix}/response_length": float(scored.rollout.response_mask.sum(-1).float().mean()),
        **{f"{prefix}/{k}": v for k, v in values.items()},
        **{f"{prefix}/{k}": sum(v) / len(v) for k, v in stats.items()},
    }
