"""Advantage estimators for ReFT's PPO, behind one registry that validation, construction and the
error message all read. Each estimator is a tensor-in, tensor-out function of the rollout:

    estimate(scores (B,), kl (B, R), old_values (B, R) | None, response_mask (B, R), cfg, kl_coef,
             reduce=None) -> (advantages (B, R), returns (B, R) | None)

`kl` is the per-token KL to the reference of the sampled tokens (computed once per step); `reduce`
sums a tensor over processes when the batch is split over several (None: one process).
`response_mask` selects the tokens that train (a row masked out entirely gets 0 advantages and
takes no part in the batch statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from reftune.trainers import algorithms as A


def _kl_for_rewards(kl, cfg):
    """The KL that shapes the token rewards: all of it when it acts in the reward, else none."""
    return kl if cfg.kl_in_reward else kl.new_zeros(kl.shape)


def gae_advantages(scores, kl, old_values, response_mask, cfg, kl_coef, reduce=None):
    """The paper: token rewards (score on the last token, -kl_coef*KL on every token when the KL
    is in the reward), GAE with the value head, whitened over the batch's response tokens."""
    rewards = A.token_rewards(scores, _kl_for_rewards(kl, cfg), response_mask, kl_coef)
    advantages, returns = A.gae(rewards, old_values, response_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = A.masked_whiten(advantages, response_mask, reduce=reduce, min_std=cfg.whiten_min_std)
    return advantages, returns


def reinforce_pp_advantages(scores, kl, old_values, response_mask, cfg, kl_coef, reduce=None):
    """REINFORCE++: the same token rewards as GAE's (KL in the reward), discounted returns with
    `gamma` and no critic, normalised over the whole batch's response tokens (always: the batch
    statistics are the method's baseline)."""
    rewards = A.token_rewards(scores, _kl_for_rewards(kl, cfg), response_mask, kl_coef)
    returns = A.discounted_returns(rewards, response_mask, cfg.gamma)
    return A.masked_whiten(returns, response_mask, reduce=reduce, min_std=cfg.whiten_min_std), None


def _group(method: str):
    def estimate(scores, kl, old_values, response_mask, cfg, kl_coef, reduce=None):
        """Critic-free: a sequence-level advantage from the samples of each question, on every token
        (a question's samples are always on one process: no reduction needed)."""
        seq_adv = A.group_advantages(scores, cfg.samples_per_prompt, method)
        return A.broadcast_sequence_advantages(seq_adv, response_mask), None

    return estimate


@dataclass(frozen=True)
class Estimator:
    estimate: Callable
    uses_value_head: bool
    """True: a value head is trained alongside the policy."""
    token_rewards: bool
    """True: the advantages come from per-token rewards, so the KL can act in the reward; False:
    one advantage per sequence, and the KL then acts through the loss."""
    min_samples_per_prompt: int
    summary: str


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae_advantages, True, True, 1, "value head + GAE (the paper)"),
    "reinforce_pp": Estimator(reinforce_pp_advantages, False, True, 1,
                              "REINFORCE++: batch-normalised discounted returns, KL in the reward, no value head"),
    "grpo": Estimator(_group("grpo"), False, False, 2, "group-normalised scores, no value head"),
    "rloo": Estimator(_group("rloo"), False, False, 2, "leave-one-out baseline, no value head"),
    "dr_grpo": Estimator(_group("dr_grpo"), False, False, 2, "Dr. GRPO: group mean baseline, no std division, "
                                                            "no value head"),
}


def get_estimator(name: str, samples_per_prompt: int) -> Estimator:
    """The registered estimator `name`, checked against the samples it needs per question."""
    if name not in ADVANTAGE_ESTIMATORS:
        known = ", ".join(f"{n} ({e.summary})" for n, e in ADVANTAGE_ESTIMATORS.items())
        raise ValueError(f"advantage must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {name!r}: {known}")
    est = ADVANTAGE_ESTIMATORS[name]
    if samples_per_prompt < est.min_samples_per_prompt:
        raise ValueError(f"advantage={name} compares samples of one question: set samples_per_prompt >= "
                         f"{est.min_samples_per_prompt}")
    return est
