"""What every online trainer does first in a step: pick the step's questions, sample CoTs for them
and score each: the task's grader, then the run's rewards (ReFT's correctness score and any
reward functions or reward model, reftune/rewards/functions.py). ReFT and Online self-training use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from reftune.engines.base import Generator, Rollout
from reftune.rewards.functions import RewardSet, RewardSource
from reftune.rewards.score import RewardSpec
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
    reward_means: dict[str, float] = field(default_factory=dict)
    """Per reward function: its mean over the rows it scored (0 when none), and the fraction it scored
    (`<name>_scored`); logged as `<trainer>/reward/...`."""


def sample_and_score(generator: Generator, task: Task, questions: list[Example], samples_per_prompt: int,
                     temperature: float, top_p: float, max_new_tokens: int,
                     reward: RewardSpec | RewardSet) -> ScoredRollout:
    """Sample `samples_per_prompt` CoTs per question, grade them, and score each with `reward`
    (a RewardSet, or a RewardSpec: ReFT's correctness score alone)."""
    rewards = RewardSet.correctness_only(reward) if isinstance(reward, RewardSpec) else reward
    prompts = [task.prompt(ex, for_generation=True) for ex in questions]
    rollout = generator.generate(prompts, num_samples=samples_per_prompt, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens)
    examples = [questions[i] for i in rollout.prompt_index]
    graded = task.grade(rollout.texts, examples)
    fn_prompts, completions, columns = reward_inputs(task, examples, rollout.texts, graded,
                                                     rollout.ended_with_eos.tolist())
    totals, means, scored = rewards.score(fn_prompts, completions, columns)
    reward_means = {**means, **{f"{name}_scored": frac for name, frac in scored.items()}}
    return ScoredRollout(rollout, examples, graded, torch.tensor(totals, dtype=torch.float32), reward_means)


RESERVED_COLUMNS = ("answer", "question", "id", "cot", "options", "prompt_text", "extracted", "correct", "ended")


def reward_inputs(task: Task, examples: list[Example], texts: list[str], graded: list[Graded],
                  ended: list[bool] | None = None) -> tuple[list, list, dict[str, list]]:
    """(prompts, completions, columns) for reward functions, in TRL's convention (see
    reftune/rewards/functions.py): message lists with a chat template, text otherwise."""
    completions = [task.completion_text(ex, t) for ex, t in zip(examples, texts)]
    if task.uses_chat:
        prompts = [task.messages(ex) for ex in examples]
        completions_in = [[{"role": "assistant", "content": c}] for c in completions]
    else:
        prompts = [task.prompt(ex, for_generation=True) for ex in examples]
        completions_in = completions
    names = dict.fromkeys(k for ex in examples for k in (ex.columns or {}) if k not in RESERVED_COLUMNS)
    columns = {k: [(ex.columns or {}).get(k) for ex in examples] for k in names}
    columns.update(answer=[ex.answer for ex in examples], question=[ex.question for ex in examples],
                   id=[ex.id for ex in examples], cot=[ex.cot for ex in examples],
                   options=[ex.options for ex in examples], prompt_text=[task.prompt(ex) for ex in examples],
                   extracted=[g.answer for g in graded], correct=[bool(g.correct) for g in graded],
                   ended=[bool(e) for e in ended] if ended is not None else [True] * len(examples))
    return prompts, completions_in, columns


def build_rewards(cfg, device: torch.device, dtype: torch.dtype) -> RewardSet:
    """The run's RewardSet from its `Rewards` section: the reward functions, and the reward model
    when one is given (loaded once, on `device`)."""
    sources = cfg.reward_sources()
    if cfg.reward_model:
        sources.append(reward_model_source(cfg.reward_model, cfg.reward_model_weight, device, dtype))
    return RewardSet(sources)


def reward_model_source(path: str, weight: float, device: torch.device, dtype: torch.dtype,
                        batch_size: int = 64, max_length: int = 1024) -> RewardSource:
    """A trained sequence classifier as a reward function: P(correct) of prompt + completion, read
    as reranking reads it (reftune/inference/rerank.py)."""
    from reftune.inference.rerank import load_reward_model, reward_model_path, score_candidates
    from reftune.model_files import check_model_source

    folder = reward_model_path(path)
    check_model_source(folder, key="reward_model")
    rm, rm_tokenizer = load_reward_model(folder, device, dtype)
    rm.requires_grad_(False)

    def reward_model(prompts, completions, prompt_text, **_) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return score_candidates(rm, rm_tokenizer, prompt_text, texts, batch_size, max_length).tolist()

    return RewardSource("reward_model", f"reward_model={path}", reward_model, float(weight))

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
                         scored.scores[index], scored.reward_means)


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
                         torch.cat([p.scores for p in parts]), _row_weighted_means(parts))


def _row_weighted_means(parts: list[ScoredRollout]) -> dict[str, float]:
    """The parts' reward means averaged with each part weighted by its rows."""
    rows = sum(len(p.graded) for p in parts) or 1
    keys = dict.fromkeys(k for p in parts for k in p.reward_means)
    return {k: sum(p.reward_means.get(k, 0.0) * len(p.graded) for p in parts) / rows for k in keys}


def step_metrics(prefix: str, scored: ScoredRollout, stats: dict[str, list[float]], **values: float) -> dict:
    """An online trainer's metrics of one step, each key under `prefix/`: of its samples (mean score,
    accuracy, answered fraction, mean response length, fraction cut at max_new_tokens without a stop
    token), the trainer's own `values`, and the mean of each of its update `stats` over the step's updates."""
    n_rows = max(len(scored.graded), 1)
    return {
        f"{prefix}/score": float(scored.scores.mean()),
        f"{prefix}/accuracy": sum(g.correct for g in scored.graded) / n_rows,
        f"{prefix}/answered": sum(g.answer is not None for g in scored.graded) / n_rows,
        f"{prefix}/response_length": float(scored.rollout.response_mask.sum(-1).float().mean()),
        f"{prefix}/truncated": float((~scored.rollout.ended_with_eos.bool()).sum()) / n_rows,
        **{f"{prefix}/{k}": v for k, v in values.items()},
        **{f"{prefix}/{k}": sum(v) / len(v) for k, v in stats.items()},
        **{f"{prefix}/reward/{k}": v for k, v in scored.reward_means.items()},
    }
