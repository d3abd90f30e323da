"""Where a ReFT step's rollout comes from: the seam between sampling and training.

    source.next(step, questions) -> StepRollout    # what step `step` trains on

`SyncRollouts` is the paper's loop: the step's questions sampled now, by the policy about to be
updated. A source that samples ahead (one step off, on another process or engine) returns rollouts
whose `policy_step` is below `step`, with the sampling policy's log-probs in the rollout's
`sampling_logprobs`; the trainer then takes PPO's old log-probs from its own pass over the batch.
`DynamicSampling` wraps any source and keeps only question groups whose samples got different
rewards, refilling from further questions (a fixed, seeded stream per step); the refills are
sampled now, by the policy about to be updated (a source sampling ahead cannot know, when it
samples, which of its groups will come out uniform).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from reftune.trainers import algorithms as A
from reftune.trainers.rollout import ScoredRollout, concat_scored, step_questions, take_rows
from reftune.types import Example


@dataclass
class StepRollout:
    scored: ScoredRollout
    """What the step trains on: B rows in groups of samples_per_prompt consecutive rows, scores (B,).
    `scored.rollout.sampling_logprobs` (B, R), where present, are the sampling policy's log-probs."""
    sampled: ScoredRollout
    """Everything sampled for the step (what its sample metrics describe): `scored` unless rows were dropped."""
    policy_step: int
    """Optimizer steps the sampling policy had taken: the step itself when it is the policy being
    updated (synchronous sampling), fewer when it was sampled ahead."""
    stats: dict[str, float] = field(default_factory=dict)
    """The source's own metrics (dynamic sampling: refill rounds, dropped and trained fractions)."""


class RolloutSource(Protocol):
    def next(self, step: int, questions: list[Example]) -> StepRollout:
        """The scored rollout step `step` trains on, for `questions` (this process's share). Called
        once per step with the step's questions, in step order (and again within a step by
        `DynamicSampling` with refill questions)."""
        ...

    def close(self) -> None:
        """Stop whatever sampling is still under way (end of the run, or an error)."""
        ...


Sample = Callable[[list[Example]], ScoredRollout]
"""Sample and score CoTs for a list of questions with the current policy (rollout.sample_and_score)."""


class SyncRollouts:
    """The paper's loop: each step's questions sampled when the step starts, by the current policy."""

    def __init__(self, sample: Sample):
        self.sample = sample

    def next(self, step: int, questions: list[Example]) -> StepRollout:
        scored = self.sample(questions)
        return StepRollout(scored, scored, step)

    def close(self) -> None:
        pass


def refill_questions(examples: list[Example], step: int, round_: int, per_step: int, seed: int,
                     max_rounds: int) -> list[Example]:
    """The questions of refill round `round_` (1-based) of step `step`: `per_step` questions from a
    second seeded stream of epochs over the training split, so a resumed run refills with exactly
    the questions the uninterrupted one did."""
    return step_questions(examples, step * max_rounds + round_ - 1, per_step, seed + 1_000_003)


class DynamicSampling:
    """DAPO's dynamic sampling around a source: keep the groups whose scores differ (a group whose
    samples all got the same reward has zero group-relative advantage), refill from further
    questions for at most `max_rounds` rounds, then train on the first `target` kept groups, or on
    fewer when the rounds run out. The refill questions (`refill(step, round)`) are sampled by
    `refills`, the source itself unless given (one that samples ahead gets a synchronous one).
    `agree` makes processes train on the same number of groups (the smallest; identity with one
    process), so they run the same number of optimizer steps."""

    def __init__(self, source: RolloutSource, refill: Callable[[int, int], list[Example]], group: int,
                 max_rounds: int, pad_id: int, agree: Callable[[int], int] = lambda n: n,
                 refills: RolloutSource | None = None):
        self.source, self.refill, self.group, self.max_rounds = source, refill, group, max_rounds
        self.pad_id, self.agree, self.refills = pad_id, agree, refills or source

    def next(self, step: int, questions: list[Example]) -> StepRollout:
        target = len(questions)
        got = [self.source.next(step, questions)]
        kept = [self._mixed_rows(got[0].scored)]
        while sum(len(k) for k in kept) < target * self.group and len(got) <= self.max_rounds:
            got.append(self.refills.next(step, self.refill(step, len(got))))
            kept.append(self._mixed_rows(got[-1].scored))
        n_sampled = sum(len(g.scored.graded) for g in got) // self.group
        n_mixed = sum(len(k) for k in kept) // self.group
        n_train = self.agree(min(n_mixed, target))
        parts, left = [], n_train * self.group
        for g, rows in zip(got, kept):
            if left > 0 and rows:
                parts.append(take_rows(g.scored, rows[:left]))
                left -= len(parts[-1].graded)
        sampled = concat_scored([g.sampled for g in got], self.pad_id)
        scored = concat_scored(parts, self.pad_id) if parts else take_rows(got[0].scored, [])
        stats = {**got[0].stats, "refill_rounds": float(len(got) - 1), "dropped_fraction": 1 - n_mixed / n_sampled,
                 "trained_fraction": n_train / max(target, 1)}
        return StepRollout(scored, sampled, min(g.policy_step for g in got), stats)

    def _mixed_rows(self, scored: ScoredRollout) -> list[int]:
        """Rows of the groups whose scores are not all equal."""
        mixed = A.mixed_groups(scored.scores, self.group)
        return [int(g) * self.group + i for g in torch.nonzero(mixed).flatten() for i in range(self.group)]

    def close(self) -> None:
        self.source.close()
        if self.refills is not self.source:
            self.refills.close()
