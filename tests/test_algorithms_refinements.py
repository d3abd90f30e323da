"""The PPO refinements beyond the paper (whitening guard, loss aggregation, asymmetric and dual clip,
GSPO, CISPO, Dr. GRPO, REINFORCE++, overlong shaping): hand-worked numbers, as tests/test_algorithms.py."""

from __future__ import annotations

import math

import pytest
import torch

from reftune.trainers import algorithms
from reftune.trainers.advantages import ADVANTAGE_ESTIMATORS, get_estimator
from reftune.trainers.algorithms import (
    aggregate, aggregation_units, broadcast_sequence_advantages, cispo_policy_loss, discounted_returns,
    dr_grpo_advantages, entropy_from_logits, explained_variance, gae, get_policy_loss, group_advantages,
    grpo_advantages, importance_log_ratio, kl_k1, kl_k3, kl_penalty, logprobs_from_logits, masked_mean, masked_sum,
    masked_var, masked_whiten, mixed_groups, overlong_penalty, ppo_policy_loss, ppo_value_loss, rloo_advantages,
    sequence_mean, token_rewards,
)

from test_algorithms import M3, R3, SCORES_2x3, T, _policy_case, _value_case, close, lengths_to_mask  # shared cases

# ----------------------------------------------------------------------------- whitening guard
def test_whitening_leaves_float_noise_at_zero():
    # +-3e-5 on 4 tokens: mean 0, unbiased var 4 * 9e-10 / 3 = 1.2e-9 (std 3.46e-5).
    # Plain whitening: 3e-5 * rsqrt(1.2e-9 + 1e-8) = 3e-5 * 9449.11 = 0.28347 -- noise made a signal.
    x = T([[3e-5, -3e-5, 7.0], [3e-5, -3e-5, 7.0]])
    m = T([[1, 1, 0], [1, 1, 0]])
    close(masked_whiten(x, m), [[0.28347, -0.28347, 0.0], [0.28347, -0.28347, 0.0]], atol=1e-5)
    # std 3.46e-5 < min_std 1e-4: no spread -> 0 everywhere (the mean is added back when not shifting)
    close(masked_whiten(x, m, min_std=1e-4), torch.zeros(2, 3))
    close(masked_whiten(x + 0.5, m, shift_mean=False, min_std=1e-4), [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    # a floor below the std changes nothing, bit for bit
    assert torch.equal(masked_whiten(x, m, min_std=1e-5), masked_whiten(x, m))


def test_gae_estimator_does_not_whiten_kl_noise():
    # every score 0, V = 0, KL 1e-7-ish rounding noise, kl_coef 0.05: rewards ~ -5e-9 per token,
    # advantages ~1e-8, their std far below whiten_min_std: they stay exactly 0 (no policy gradient,
    # so Adam takes no step), where plain whitening multiplies them by rsqrt(var + 1e-8) ~ 1e4
    cfg = _cfg()
    noise = T([[1e-7, -2e-7, 3e-7], [2e-7, 1e-7, 0.0]])
    mask = lengths_to_mask([3, 2], 3)
    adv, returns = ADVANTAGE_ESTIMATORS["gae"].estimate(torch.zeros(2), noise, torch.zeros(2, 3), mask, cfg, 0.05)
    assert torch.equal(adv, torch.zeros(2, 3))
    assert returns.abs().max() < 1e-7  # the value targets are the small true returns
    unguarded = ADVANTAGE_ESTIMATORS["gae"].estimate(torch.zeros(2), noise, torch.zeros(2, 3), mask,
                                                      _cfg(whiten_min_std=0.0), 0.05)[0]
    assert unguarded.abs().max() > 1e3 * returns.abs().max()  # what the guard prevents


# ----------------------------------------------------------------------------- loss aggregation
AGG_X = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
AGG_M = T([[1, 1, 0], [0, 0, 0], [1, 1, 1]])


def test_aggregations_by_hand():
    # kept: row 0 -> 1 2, row 1 empty, row 2 -> 7 8 9
    # seq_mean_token_mean: (1.5 + 8) / 2 = 4.75; token_mean: 27 / 5 = 5.4
    # seq_mean_token_sum_norm, norm 4: row sums 3 and 24 -> 0.75 and 6 -> (0.75 + 6) / 2 = 3.375
    close(aggregate(AGG_X, AGG_M), 4.75)
    close(aggregate(AGG_X, AGG_M, "seq_mean_token_mean"), 4.75)
    close(aggregate(AGG_X, AGG_M, "token_mean"), 5.4)
    close(aggregate(AGG_X, AGG_M, "seq_mean_token_sum_norm", norm_length=4), 3.375)
    for mode in ("seq_mean_token_mean", "token_mean"):
        close(aggregate(AGG_X, torch.zeros_like(AGG_M), mode), 0.0)  # nothing at all -> 0, not nan
    close(aggregate(AGG_X, torch.zeros_like(AGG_M), "seq_mean_token_sum_norm", 4), 0.0)
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(AGG_X, AGG_M, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(AGG_X, AGG_M, "sum")


def test_aggregation_units_split_a_batch_exactly():
    # units: sequences 1 0 1, tokens 2 0 3. Parts {0, 1} and {2}:
    #   token_mean: 3/2 = 1.5 (2 units) and 24/3 = 8 (3 units) -> 2/5 * 1.5 + 3/5 * 8 = 0.6 + 4.8 = 5.4
    #   sequence means: 1.5 (1 unit) and 8 (1 unit) -> (1.5 + 8) / 2 = 4.75
    close(aggregation_units(AGG_M), [1.0, 0.0, 1.0])
    close(aggregation_units(AGG_M, "seq_mean_token_sum_norm"), [1.0, 0.0, 1.0])
    close(aggregation_units(AGG_M, "token_mean"), [2.0, 0.0, 3.0])
    for mode in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        units = aggregation_units(AGG_M, mode)
        parts = [slice(0, 2), slice(2, 3)]
        split = sum(units[p].sum() / units.sum() * aggregate(AGG_X[p], AGG_M[p], mode, 4) for p in parts)
        close(split, aggregate(AGG_X, AGG_M, mode, 4))


def test_policy_and_value_losses_take_the_aggregation():
    # ratio 1, A = x: the policy loss is -aggregate(A); token_mean of the policy case's A = (1+1-1-1)/4 = 0
    # value loss of _value_case, token_mean over its 4 tokens = the sequence mean (one row): 0.1675;
    # seq_mean_token_sum_norm with norm 8: 0.5 * (0.09 + 0.16 + 0.09 + 1.0) / 8 = 0.08375
    loss, _ = ppo_policy_loss(torch.zeros(3, 3), torch.zeros(3, 3), AGG_X, AGG_M, 0.2, aggregation="token_mean")
    close(loss, -5.4)
    values, old, returns, mask = _value_case()
    close(ppo_value_loss(values, old, returns, mask, 0.2, aggregation="token_mean")[0], 0.1675)
    close(ppo_value_loss(values, old, returns, mask, 0.2, "seq_mean_token_sum_norm", 8)[0], 0.08375)


# ----------------------------------------------------------------------------- asymmetric and dual clip
def test_clip_higher_by_hand():
    # the policy case with clip 0.2 below and 0.6 above: band [0.8, 1.6]
    #   token  A   ratio  -A*r   -A*clip(r)   max    clipped?
    #   0     +1   1.5    -1.5    -1.5        -1.5   no (1.5 is inside the wider band now)
    #   1     +1   0.5    -0.5    -0.8        -0.5   no
    #   2     -1   0.5     0.5     0.8         0.8   yes
    #   3     -1   1.5     1.5     1.5         1.5   no
    # loss = (-1.5 - 0.5 + 0.8 + 1.5) / 4 = 0.075; clipfrac 1/4
    # gradient -A*r/4 on unclipped tokens: -0.375, -0.125, 0, 0.375
    logp, old, adv, mask = _policy_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2, clip_high=0.6)
    close(loss, 0.075)
    close(stats["clipfrac"], 0.25)
    loss.backward()
    close(logp.grad, [[-0.375, -0.125, 0.0, 0.375, 0.0]])
    # clip_high None is the symmetric clip, bit for bit
    logp2, *_ = _policy_case()
    assert torch.equal(ppo_policy_loss(logp2, old, adv, mask, 0.2, clip_high=None)[0],
                       ppo_policy_loss(logp2, old, adv, mask, 0.2, clip_high=0.2)[0])


def _dual_case():
    # one row, clip 0.2:  token (A, ratio) = (-1, 4), (-1, 2), (+1, 4)
    ratio = T([[4.0, 2.0, 4.0]])
    old = torch.zeros(1, 3)
    return ratio.log().requires_grad_(True), old, T([[-1.0, -1.0, 1.0]]), torch.ones(1, 3)


def test_dual_clip_by_hand():
    #   token  A   r   -A*r   -A*clip(r)  max    dual cap -A*c (c=3)  final
    #   0     -1   4    4      1.2         4      3                     3   (capped: gradient 0)
    #   1     -1   2    2      1.2         2      3                     2   (gradient -A*r/3 = 2/3)
    #   2     +1   4   -4     -1.2        -1.2    (A > 0: no cap)      -1.2 (clipped: gradient 0)
    # loss = (3 + 2 - 1.2) / 3 = 1.2666667; without dual clip (4 + 2 - 1.2) / 3 = 1.6
    # clipfrac 1/3 (token 2), dual_clipfrac 1/3 (token 0)
    logp, old, adv, mask = _dual_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2, dual_clip=3.0)
    close(loss, 1.2666667)
    close(stats["clipfrac"], 1 / 3)
    close(stats["dual_clipfrac"], 1 / 3)
    loss.backward()
    close(logp.grad, [[0.0, 0.6666667, 0.0]])
    close(ppo_policy_loss(*_dual_case(), clip=0.2)[0], 1.6)


# ----------------------------------------------------------------------------- GSPO: sequence-level ratio
def _gspo_case():
    # row 0: token log-ratios ln 2 and 0, A = +1 on both; row 1: one token, log-ratio ln 0.5, A = +1; 1 pad
    old = torch.full((2, 2), -1.0)
    logp = (old + T([[math.log(2.0), 0.0], [math.log(0.5), 0.0]])).requires_grad_(True)
    return logp, old, T([[1.0, 1.0], [1.0, 9.0]]), T([[1, 1], [1, 0]])


def test_sequence_level_ratio_by_hand():
    # row 0: s = exp((ln 2 + 0) / 2) = sqrt 2 = 1.4142136 on both tokens; row 1: s = 0.5
    # clip 0.5 (band [0.5, 1.5]): nothing clipped. Per token -A*s: row 0 -1.4142136 (mean -1.4142136),
    # row 1 -0.5 -> loss = (-1.4142136 - 0.5) / 2 = -0.9571068
    # gradient: each token's value is s_i, its gradient d log p_t: -A*s_i / (row tokens) / (rows)
    #   row 0: -1.4142136 / 2 / 2 = -0.3535534 each; row 1: -0.5 / 1 / 2 = -0.25
    # stats: ratio_mean (1.4142136 * 2 + 0.5) / 3 = 1.1094757;
    #   approx_kl 0.5 * mean(log s^2) = 0.5 * (2 * 0.3465736^2 + 0.6931472^2) / 3 = 0.1201133
    logp, old, adv, mask = _gspo_case()
    log_ratio = importance_log_ratio(logp, old, mask, "sequence")
    close(log_ratio, [[0.3465736, 0.3465736], [-0.6931472, 0.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.5, importance_level="sequence")
    close(loss, -0.9571068)
    close(stats["ratio_mean"], 1.1094757)
    close(stats["approx_kl"], 0.1201133)
    close(stats["clipfrac"], 0.0)
    loss.backward()
    close(logp.grad, [[-0.3535534, -0.3535534], [-0.25, 0.0]])
    # token level for comparison: row 0 ratios 2 (clipped to 1.5: -1.5) and 1 (-1) -> -1.25; row 1 -0.5
    # -> (-1.25 - 0.5) / 2 = -0.875
    close(ppo_policy_loss(*_gspo_case(), clip=0.5)[0], -0.875)
    with pytest.raises(ValueError, match="importance level"):
        importance_log_ratio(logp, old, mask, "segment")


# ----------------------------------------------------------------------------- CISPO
def test_cispo_by_hand():
    # old log-prob -1; ratios 1.5, 0.5, 1 -> log p = -0.5945349, -1.6931472, -1; A = 1, -1, 2
    # clip 0.2 below, 0.28 above: weights sg[clip(r, 0.8, 1.28)] = 1.28, 0.8, 1 (2 of 3 clipped)
    #   per token -w*A*log p: -1.28*1*(-0.5945349) = 0.7610047; -0.8*(-1)*(-1.6931472) = -1.3545178;
    #   -1*2*(-1) = 2 -> loss = 1.4064869 / 3 = 0.4688290
    # gradient -w*A/3 on EVERY token (PPO would give 0 to the two clipped ones):
    #   -1.28/3 = -0.4266667, 0.8/3 = 0.2666667, -2/3 = -0.6666667
    old = torch.full((1, 3), -1.0)
    logp = (old + T([[1.5, 0.5, 1.0]]).log()).requires_grad_(True)
    adv, mask = T([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    loss, stats = cispo_policy_loss(logp, old, adv, mask, clip=0.2, clip_high=0.28)
    close(loss, 0.4688290)
    close(stats["clipfrac"], 2 / 3)
    loss.backward()
    close(logp.grad, [[-0.4266667, 0.2666667, -0.6666667]])
    with pytest.raises(ValueError, match="dual_clip"):
        cispo_policy_loss(logp, old, adv, mask, 0.2, dual_clip=3.0)
    with pytest.raises(ValueError, match="importance_level"):
        cispo_policy_loss(logp, old, adv, mask, 0.2, importance_level="sequence")


def test_policy_loss_registry(monkeypatch):
    assert get_policy_loss("ppo") is ppo_policy_loss and get_policy_loss("cispo") is cispo_policy_loss
    with pytest.raises(ValueError, match="ppo, cispo"):
        get_policy_loss("reinforce")
    substitute = lambda *a, **k: (torch.zeros(()), {})  # noqa: E731
    monkeypatch.setattr(algorithms, "ppo_policy_loss", substitute)
    assert get_policy_loss("ppo") is substitute  # looked up when asked for


def test_new_losses_ignore_garbage_at_padding():
    # as test_values_at_masked_positions_change_nothing, for the refinements
    g = torch.Generator().manual_seed(4)
    shape = (3, 5)
    mask = lengths_to_mask([5, 2, 0], 5)
    old, adv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    logp = old + 0.4 * torch.randn(shape, generator=g)

    def outputs(logp, old, adv):
        out = []
        for fn, kw in [(ppo_policy_loss, dict(clip_high=0.3, dual_clip=2.0, aggregation="token_mean")),
                       (ppo_policy_loss, dict(importance_level="sequence", aggregation="seq_mean_token_sum_norm",
                                              norm_length=5)),
                       (cispo_policy_loss, dict(clip_high=0.3))]:
            leaf = logp.clone().requires_grad_(True)
            loss, stats = fn(leaf, old, adv, mask, 0.2, **kw)
            loss.backward()
            out += [loss, *stats.values(), leaf.grad]
        return out

    before = outputs(logp, old, adv)
    bad = lambda x, v: torch.where(mask.bool(), x, torch.full(shape, v))  # noqa: E731
    after = outputs(bad(logp, float("inf")), bad(old, float("nan")), bad(adv, float("-inf")))
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)
    assert all(torch.isfinite(t).all() for t in before)


# ----------------------------------------------------------------------------- more advantages
def test_dr_grpo_by_hand():
    # s - group mean, no std: (1,0,0) mean 1/3 -> 2/3, -1/3, -1/3; (1,1,0) mean 2/3 -> 1/3, 1/3, -2/3
    expected = [2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3]
    close(dr_grpo_advantages(SCORES_2x3, 3), expected)
    close(group_advantages(SCORES_2x3, 3, "dr_grpo"), expected)
    close(group_advantages(T([0.1, 0.1]), 2, "dr_grpo"), [0.0, 0.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        dr_grpo_advantages(T([1.0, 0.0]), 1)


def test_mixed_groups():
    # groups (1, 1) equal, (0, 1) mixed, (0.1, 0.1) equal
    assert mixed_groups(T([1.0, 1.0, 0.0, 1.0, 0.1, 0.1]), 2).tolist() == [False, True, False]


def test_discounted_returns_by_hand():
    # r = 0.1, -0.2, 1.0 (+ pad). gamma 1: rewards-to-go 0.9, 0.8, 1.0
    # gamma 0.9: G2 = 1.0, G1 = -0.2 + 0.9 * 1.0 = 0.7, G0 = 0.1 + 0.9 * 0.7 = 0.73
    close(discounted_returns(R3, M3, 1.0), [[0.9, 0.8, 1.0, 0.0]])
    close(discounted_returns(R3, M3, 0.9), [[0.73, 0.7, 1.0, 0.0]])


def _cfg(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{**dict(kl_in_reward=True, gamma=1.0, lam=0.95, whiten_advantages=True,
                                     whiten_min_std=1e-4, samples_per_prompt=2), **kw})


def test_reinforce_pp_by_hand():
    # scores 1, 0; KL row 0 = 0.5, 1.0, row 1 = 2.0 (1 token); kl_coef 0.1
    # token rewards: row 0 -0.05, -0.1 + 1 = 0.9; row 1 -0.2 + 0 = -0.2
    # returns (gamma 1): row 0 0.85, 0.9; row 1 -0.2. Mean 1.55 / 3 = 0.5166667; deviations 0.3333333,
    # 0.3833333, -0.7166667; unbiased var (0.1111111 + 0.1469444 + 0.5136111) / 2 = 0.3858333, std 0.6211548
    # -> 0.5366349, 0.6171282, -1.1537631; no returns (no value head)
    est = get_estimator("reinforce_pp", 1)
    assert not est.uses_value_head and est.token_rewards
    kl, mask = T([[0.5, 1.0], [2.0, 5.0]]), lengths_to_mask([2, 1], 2)
    adv, returns = est.estimate(T([1.0, 0.0]), kl, None, mask, _cfg(), 0.1)
    close(adv, [[0.5366349, 0.6171282], [-1.1537631, 0.0]], atol=1e-5)
    assert returns is None
    # with the KL as a loss instead, the rewards are the scores alone: returns 1, 1, 0 -> mean 2/3,
    # unbiased std 0.5773503 -> 0.5773503, 0.5773503, -1.1547005
    adv, _ = est.estimate(T([1.0, 0.0]), kl, None, mask, _cfg(kl_in_reward=False), 0.1)
    close(adv, [[0.5773503, 0.5773503], [-1.1547005, 0.0]], atol=1e-5)


def test_estimator_registry():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "reinforce_pp", "grpo", "rloo", "dr_grpo"}
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.uses_value_head] == ["gae"]
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.token_rewards] == ["gae", "reinforce_pp"]
    # dr_grpo through the registry: broadcast on the response tokens
    adv, returns = get_estimator("dr_grpo", 2).estimate(T([1.0, 0.0]), None, None, lengths_to_mask([2, 1], 2),
                                                        _cfg(), 0.1)
    close(adv, [[0.5, 0.5], [-0.5, 0.0]])
    assert returns is None
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        get_estimator("dr_grpo", 1)


# ----------------------------------------------------------------------------- overlong
def test_overlong_penalty_by_hand():
    # max 10 tokens, buffer 4: free up to 6; then (6 - L) / 4: L=7 -> -0.25, 9 -> -0.75, 10 -> -1
    lengths = T([3, 6, 7, 9, 10])
    close(overlong_penalty(lengths, 10, 4), [0.0, 0.0, -0.25, -0.75, -1.0])
    close(overlong_penalty(lengths, 10, 4, factor=0.5), [0.0, 0.0, -0.125, -0.375, -0.5])
    close(overlong_penalty(T([10]), 10, 10), [-1.0])  # the whole budget as the buffer
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 10, 0)
