"""The RL math (reftune.trainers.algorithms) against numbers worked out by hand in the comments."""

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

T = torch.tensor


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5, equal_nan=True)


def lengths_to_mask(lengths, seq):
    return (torch.arange(seq)[None, :] < T(lengths)[:, None]).float()


# ----------------------------------------------------------------------------- masked reductions
X = T([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
M = T([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])


def test_masked_sum_and_mean():
    # kept: 1 2 | 5 6 7 -> total 21 over 5 elements; rows 3/2 and 18/3
    close(masked_sum(X, M), 21.0)
    close(masked_mean(X, M), 4.2)
    close(masked_sum(X, M, dim=-1), [3.0, 18.0])
    close(masked_mean(X, M, dim=-1), [1.5, 6.0])
    close(masked_mean(X, M, dim=0), [3.0, 4.0, 7.0, 0.0])  # empty column -> 0, not nan
    close(masked_mean(X, M.bool()), 4.2)  # bool and 0/1 float masks mean the same


def test_masked_mean_ignores_inf_and_nan_at_padding():
    garbage = X.clone()
    garbage[0, 2], garbage[0, 3], garbage[1, 3] = float("inf"), float("nan"), -1e30
    close(masked_mean(garbage, M), 4.2)
    close(masked_sum(garbage, M, dim=-1), [3.0, 18.0])


def test_masked_var():
    # masked elements 1 2 3 4 (pad 99): mean 2.5, squared deviations 2.25 .25 .25 2.25 sum 5
    x = T([[1.0, 2.0, 99.0], [3.0, 4.0, 99.0]])
    m = T([[1, 1, 0], [1, 1, 0]])
    close(masked_var(x, m, unbiased=False), 5 / 4)
    close(masked_var(x, m), 5 / 3)
    close(masked_var(x, T([[1, 0, 0], [0, 0, 0]])), 0.0)  # a single element: 0, no error


def test_masked_whiten_hand_values():
    # mean 2.5, unbiased std sqrt(5/3) = 1.2909944: (1-2.5)/1.2909944 = -1.1618950, (2-2.5)/.. = -0.3872983
    x = T([[1.0, 2.0, 99.0], [3.0, 4.0, 99.0]])
    m = T([[1, 1, 0], [1, 1, 0]])
    close(masked_whiten(x, m), [[-1.1618950, -0.3872983, 0.0], [0.3872983, 1.1618950, 0.0]], atol=1e-5)
    # shift_mean=False only rescales: the mean 2.5 is added back
    close(masked_whiten(x, m, shift_mean=False),
          [[1.3381050, 2.1127017, 0.0], [2.8872983, 3.6618950, 0.0]], atol=1e-5)


def test_masked_whiten_mean0_var1_zeros_elsewhere():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g) * 3 + 7
    m = lengths_to_mask([9, 1, 4, 0, 7, 2], 9)
    w = masked_whiten(x, m)
    close(masked_mean(w, m), 0.0, atol=1e-5)
    close(masked_var(w, m), 1.0, atol=1e-5)
    assert torch.all(w[m == 0] == 0)


# ----------------------------------------------------------------------------- sequence_mean
def test_sequence_mean_excludes_empty_rows():
    # row means: (1+2)/2 = 1.5, empty row excluded, (7+8+9)/3 = 8 -> (1.5 + 8) / 2 = 4.75
    x = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = T([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    close(sequence_mean(x, m), 4.75)
    close(sequence_mean(x, torch.zeros_like(m)), 0.0)  # nothing at all -> 0, not nan
    # each sequence weighs the same: token mean over all 5 tokens would be 27/5 = 5.4 instead
    assert not torch.isclose(sequence_mean(x, m), masked_mean(x, m))


# ----------------------------------------------------------------------------- KL
def test_kl_hand_values():
    logp, ref = T([-1.0, -2.0]), T([-1.5, -1.0])
    # k1 = logp - ref = 0.5, -1.0
    close(kl_penalty(logp, ref, "k1"), [0.5, -1.0])
    close(kl_penalty(logp, ref), [0.5, -1.0])  # k1 is the default
    # k3 with d = ref - logp: d=-0.5 -> e^-0.5 + 0.5 - 1 = 0.6065307 - 0.5 = 0.1065307
    #                          d= 1.0 -> e - 1 - 1 = 0.7182818
    close(kl_penalty(logp, ref, "k3"), [0.1065307, 0.7182818])
    close(kl_k1(logp, ref), [0.5, -1.0])
    close(kl_k3(logp, ref), [0.1065307, 0.7182818])


def test_kl_k3_non_negative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(50, 20, generator=g) * 3, torch.randn(50, 20, generator=g) * 3
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(logp, logp, "k3") == 0)
    assert torch.all(kl_penalty(logp, logp, "k1") == 0)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(T([0.0]), T([0.0]), "k2")


# ----------------------------------------------------------------------------- token rewards
def test_token_rewards_score_at_last_masked_token_for_rows_of_different_lengths():
    # kl_coef 0.1: every response token gets -0.1*kl, the score lands on the last response token
    kl = T([[0.2, -0.1, 0.3, 9.0],    # len 3, score 1  -> -0.02 0.01 -0.03+1=0.97 | 0
            [0.5, 9.0, 9.0, 9.0],     # len 1, score -1 -> -0.05-1=-1.05 | 0 0 0
            [0.0, 0.0, 0.0, 0.1],     # len 4, score 2  -> 0 0 0 -0.01+2=1.99
            [1.0, 1.0, 1.0, 1.0]])    # len 0, score 5  -> no score, all 0
    m = lengths_to_mask([3, 1, 4, 0], 4)
    r = token_rewards(T([1.0, -1.0, 2.0, 5.0]), kl, m, kl_coef=0.1)
    close(r, [[-0.02, 0.01, 0.97, 0.0], [-1.05, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.99], [0.0] * 4])


def test_token_rewards_integer_scores_and_bool_mask():
    r = token_rewards(T([1, 0]), torch.zeros(2, 3), T([[True, True, False], [True, False, False]]), 0.05)
    close(r, [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- GAE
# One row: 3 response tokens + 1 pad; r = [0.1, -0.2, 1.0], V = [0.5, 0.4, 0.8]; V after EOS = 0.
R3 = T([[0.1, -0.2, 1.0, 0.0]])
V3 = T([[0.5, 0.4, 0.8, 0.0]])
M3 = T([[1.0, 1.0, 1.0, 0.0]])


def test_gae_gamma1_lam095():
    # gamma=1, lam=0.95 (gamma*lam = 0.95)
    # t=2: delta = 1.0 + 1*0   - 0.8 = 0.2    A2 = 0.2
    # t=1: delta = -0.2 + 0.8  - 0.4 = 0.2    A1 = 0.2 + 0.95*0.2  = 0.39
    # t=0: delta = 0.1 + 0.4   - 0.5 = 0.0    A0 = 0.0 + 0.95*0.39 = 0.3705
    # returns = A + V = 0.8705, 0.79, 1.0; pad -> 0
    adv, ret = gae(R3, V3, M3, gamma=1.0, lam=0.95)
    close(adv, [[0.3705, 0.39, 0.2, 0.0]])
    close(ret, [[0.8705, 0.79, 1.0, 0.0]])


def test_gae_gamma09_lam095():
    # gamma=0.9, lam=0.95 (gamma*lam = 0.855)
    # t=2: delta = 1.0 + 0.9*0   - 0.8 = 0.2     A2 = 0.2
    # t=1: delta = -0.2 + 0.9*0.8 - 0.4 = 0.12   A1 = 0.12 + 0.855*0.2 = 0.291
    # t=0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04   A0 = -0.04 + 0.855*0.291 = 0.208805
    # returns = 0.708805, 0.691, 1.0
    adv, ret = gae(R3, V3, M3, gamma=0.9, lam=0.95)
    close(adv, [[0.208805, 0.291, 0.2, 0.0]])
    close(ret, [[0.708805, 0.691, 1.0, 0.0]])


def test_gae_gamma1_lam1_is_monte_carlo():
    # gamma=lam=1: returns are the rewards-to-go 0.9, 0.8, 1.0; A = returns - V = 0.4, 0.4, 0.2
    adv, ret = gae(R3, V3, M3, gamma=1.0, lam=1.0)
    close(ret, [[0.9, 0.8, 1.0, 0.0]])
    close(adv, [[0.4, 0.4, 0.2, 0.0]])


def test_gae_rows_of_different_lengths_and_garbage_padding():
    # row 1 has a single token: r=2, V=0.5, next value 0 -> A = 1.5, return 2.0. Padding holds
    # garbage (large rewards/values) that must not leak into the bootstrap.
    rewards = T([[0.1, -0.2, 1.0, 123.0], [2.0, 50.0, -7.0, 1e6]])
    values = T([[0.5, 0.4, 0.8, 77.0], [0.5, 3.0, 3.0, 3.0]])
    mask = lengths_to_mask([3, 1], 4)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.3705, 0.39, 0.2, 0.0], [1.5, 0.0, 0.0, 0.0]])
    close(ret, [[0.8705, 0.79, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert not adv.requires_grad


def test_gae_is_not_whitened_and_carries_no_gradient():
    values = V3.clone().requires_grad_(True)
    adv, ret = gae(R3, values, M3, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert masked_mean(adv, M3).item() > 0.3  # would be 0 if whitened inside


# ----------------------------------------------------------------------------- PPO policy loss
def _policy_case():
    # one row of 4 tokens + 1 pad, clip 0.2; old logprob -1 everywhere
    #   token  A   ratio  unclipped -A*r  clipped -A*clip(r)   max    clipped branch taken?
    #   0     +1   1.5       -1.5            -1.2              -1.2    yes (r above band, A>0)
    #   1     +1   0.5       -0.5            -0.8              -0.5    no
    #   2     -1   0.5        0.5             0.8               0.8    yes (r below band, A<0)
    #   3     -1   1.5        1.5             1.2               1.5    no
    # loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15; clipfrac = 2/4; ratio_mean = 4/4 = 1
    # approx_kl = mean 0.5*log(r)^2 = 0.5*(2*ln(1.5)^2 + 2*ln(2)^2)/4 = 0.25*(0.1644019+0.4804530) = 0.1612137
    ratio = T([[1.5, 0.5, 0.5, 1.5, 1.0]])
    old = torch.full((1, 5), -1.0)
    logp = (old + ratio.log()).requires_grad_(True)
    adv = T([[1.0, 1.0, -1.0, -1.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_ppo_policy_loss_hand_values_and_stats():
    logp, old, adv, mask = _policy_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.0)
    close(stats["approx_kl"], 0.1612137)
    assert set(stats) == {"clipfrac", "approx_kl", "ratio_mean"}
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_ppo_policy_loss_gradient_zero_on_clipped_tokens():
    # d loss / d logp_t = -A_t * r_t / 4 on unclipped tokens: token 1 -> -0.5/4 = -0.125,
    # token 3 -> +1.5/4 = 0.375; clipped tokens 0 and 2 and the pad get exactly 0.
    logp, old, adv, mask = _policy_case()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    close(logp.grad, [[0.0, -0.125, 0.0, 0.375, 0.0]])


def test_ppo_policy_loss_ratio_one_is_minus_mean_advantage():
    # ratio 1 everywhere: loss = -(seq mean of A) averaged over sequences
    # rows: A = (1, 2) -> 1.5 and (3) -> 3; empty row excluded -> -(1.5 + 3) / 2 = -2.25
    logp = torch.randn(3, 3)
    adv = T([[1.0, 2.0, 40.0], [3.0, 40.0, 40.0], [40.0, 40.0, 40.0]])
    mask = lengths_to_mask([2, 1, 0], 3)
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, clip=0.2)
    close(loss, -2.25)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)


# ----------------------------------------------------------------------------- PPO value loss
def _value_case():
    # clip 0.2, old value 0.5 on every token (band [0.3, 0.7]); 1 pad
    #   token  v    R    (v-R)^2   v_clip  (v_clip-R)^2   max    clipped larger?
    #   0     1.0  1.0    0        0.7      0.09          0.09    yes
    #   1     0.6  1.0    0.16     0.6      0.16          0.16    no (equal)
    #   2     0.0  0.0    0        0.3      0.09          0.09    yes
    #   3     1.0  0.0    1.0      0.7      0.49          1.0     no
    # loss = 0.5 * (0.09 + 0.16 + 0.09 + 1.0) / 4 = 0.1675; vf_clipfrac = 2/4
    values = T([[1.0, 0.6, 0.0, 1.0, 5.0]]).requires_grad_(True)
    old = T([[0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = T([[1.0, 1.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return values, old, returns, mask


def test_ppo_value_loss_takes_the_max_branch():
    values, old, returns, mask = _value_case()
    loss, stats = ppo_value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.1675)
    close(stats["vf_clipfrac"], 0.5)
    assert not stats["vf_clipfrac"].requires_grad
    # clipped tokens 0 and 2 get no gradient; token 1: 0.5*2*(v-R)/4 = -0.1; token 3: 0.5*2*1/4 = 0.25
    loss.backward()
    close(values.grad, [[0.0, -0.1, 0.0, 0.25, 0.0]])


def test_ppo_value_loss_without_clipping_is_half_mse():
    # huge clip: 0.5 * mean((v - R)^2) = 0.5 * (0 + 0.16 + 0 + 1) / 4 = 0.145
    values, old, returns, mask = _value_case()
    loss, stats = ppo_value_loss(values, old, returns, mask, clip=100.0)
    close(loss, 0.145)
    close(stats["vf_clipfrac"], 0.0)


# ----------------------------------------------------------------------------- group advantages
SCORES_2x3 = T([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # 2 questions x 3 samples


def test_grpo_by_hand():
    # group (1,0,0): mean 1/3, unbiased var ((2/3)^2 + 2*(1/3)^2)/2 = 1/3, std 0.5773503
    #   -> (2/3)/0.5773503 = 1.1547005, (-1/3)/0.5773503 = -0.5773503
    # group (1,1,0): mean 2/3, same std -> 0.5773503, 0.5773503, -1.1547005
    expected = [1.1547005, -0.5773503, -0.5773503, 0.5773503, 0.5773503, -1.1547005]
    close(grpo_advantages(SCORES_2x3, 3, eps=0.0), expected)
    close(group_advantages(SCORES_2x3, 3, "grpo"), expected, atol=1e-5)  # eps=1e-6 barely moves it


def test_grpo_equal_scores_give_zero():
    close(group_advantages(T([1.0, 1.0, 0.0, 0.0]), 2, "grpo"), [0.0, 0.0, 0.0, 0.0])


def test_rloo_by_hand():
    # s_i - mean of the other two: (1,0,0) -> 1-0=1, 0-0.5=-0.5, -0.5; (1,1,0) -> 0.5, 0.5, 0-1=-1
    expected = [1.0, -0.5, -0.5, 0.5, 0.5, -1.0]
    close(rloo_advantages(SCORES_2x3, 3), expected)
    close(group_advantages(SCORES_2x3, 3, "rloo"), expected)
    close(group_advantages(T([1, 0, 0, 1, 1, 0]), 3, "rloo"), expected)  # integer scores too


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(T([1.0, 0.0]), 1, "rloo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(T([1.0, 0.0]), 1, "grpo")
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(T([1.0, 0.0, 1.0, 0.0, 1.0]), 2, "grpo")
    with pytest.raises(ValueError, match="not divisible"):
        rloo_advantages(T([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="unknown"):
        group_advantages(SCORES_2x3, 3, "ppo")


def test_broadcast_sequence_advantages():
    out = broadcast_sequence_advantages(T([2.0, -1.0, 7.0]), lengths_to_mask([2, 3, 0], 3))
    close(out, [[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])


def test_broadcast_then_policy_loss_at_ratio_one_is_minus_mean_sequence_advantage():
    # the critic-free path: per-token A = sequence A, so the loss is -(2 + -1)/2 = -0.5
    mask = lengths_to_mask([2, 3], 3)
    adv = broadcast_sequence_advantages(T([2.0, -1.0]), mask)
    loss, _ = ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), adv, mask, clip=0.2)
    close(loss, -0.5)


# ----------------------------------------------------------------------------- logits helpers
# logits (0, ln2, ln5): softmax = (1, 2, 5)/8
LOGITS = T([[[0.0, math.log(2.0), math.log(5.0)], [1.0, 1.0, 1.0]]])


def test_logprobs_from_logits_hand_values():
    # label 0 of (1,2,5)/8 -> ln(1/8) = -2.0794415; label 2 of uniform(3) -> ln(1/3) = -1.0986123
    close(logprobs_from_logits(LOGITS, T([[0, 2]])), [[-2.0794415, -1.0986123]])
    close(logprobs_from_logits(LOGITS, T([[2, 0]])), [[math.log(5 / 8), -1.0986123]])


def test_logprobs_from_logits_low_precision_and_gradient():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    reference = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(logprobs_from_logits(logits, labels), reference, atol=1e-5)
    bf16 = logits.bfloat16()
    out = logprobs_from_logits(bf16, labels)
    assert out.dtype == torch.float32
    ref_bf16 = torch.log_softmax(bf16.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    close(out, ref_bf16, atol=1e-5)
    leaf = logits.clone().requires_grad_(True)
    logprobs_from_logits(leaf, labels).sum().backward()
    # d log p(label) / d logits = onehot(label) - softmax, which sums to 0 over the vocab
    close(leaf.grad.sum(-1), torch.zeros(3, 5), atol=1e-5)


def test_entropy_from_logits_hand_values():
    # (1,2,5)/8: H = 1/8 ln 8 + 1/4 ln 4 + 5/8 ln(8/5) = 0.2599302 + 0.3465736 + 0.2937523 = 0.9002561
    # uniform over 3: ln 3 = 1.0986123
    close(entropy_from_logits(LOGITS), [[0.9002561, 1.0986123]])
    peaked = T([[[100.0, 0.0, 0.0]]])  # finite and ~0, no nan from exp underflow
    close(entropy_from_logits(peaked), [[0.0]], atol=1e-6)
    close(entropy_from_logits(LOGITS.bfloat16()), [[0.9002561, 1.0986123]], atol=2e-2)


# ----------------------------------------------------------------------------- explained variance
def test_explained_variance():
    # R = 1 2 3 4 (Var 1.25); V = 0 2 2 4 -> R - V = 1 0 1 0 (Var 0.25) -> 1 - 0.25/1.25 = 0.8
    returns = T([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    values = T([[0.0, 2.0, -9.0], [2.0, 4.0, -9.0]])
    mask = T([[1, 1, 0], [1, 1, 0]])
    close(explained_variance(values, returns, mask), 0.8)
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(torch.zeros_like(returns), returns, mask), 0.0)
    constant = explained_variance(values, torch.ones_like(returns), mask)  # Var[R] = 0 -> nan
    assert constant.dim() == 0 and torch.isnan(constant)


# ----------------------------------------------------------------------------- masks respected
def _all_outputs(logp, old, ref, values, old_values, rewards, adv, mask):
    """Every masked function on the same inputs; the losses' gradients included."""
    logp = logp.clone().requires_grad_(True)
    values = values.clone().requires_grad_(True)
    kl = kl_penalty(logp.detach(), ref, "k3")
    r = token_rewards(T([1.0, 0.0, 2.0, -1.0]), kl, mask, kl_coef=0.05)
    a, ret = gae(rewards, values.detach(), mask, gamma=0.9, lam=0.95)
    pl, ps = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    vl, vs = ppo_value_loss(values, old_values, ret, mask, clip=0.2)
    (pl + vl).backward()
    return [
        masked_sum(rewards, mask), masked_mean(rewards, mask), masked_mean(rewards, mask, dim=-1),
        masked_var(rewards, mask), masked_whiten(rewards, mask), sequence_mean(rewards, mask),
        r, a, ret, masked_whiten(a, mask), pl, vl, *ps.values(), *vs.values(), logp.grad, values.grad,
        broadcast_sequence_advantages(T([1.0, 2.0, 3.0, 4.0]), mask),
        explained_variance(values.detach(), ret, mask),
    ]


def test_values_at_masked_positions_change_nothing():
    # padding filled with inf/nan: masking must select (torch.where), not multiply (inf * 0 = nan),
    # in the forward pass and in the gradients
    g = torch.Generator().manual_seed(3)
    shape, inf, nan = (4, 6), float("inf"), float("nan")
    mask = lengths_to_mask([6, 3, 1, 0], 6)
    inputs = [torch.randn(shape, generator=g) for _ in range(7)]
    inputs[0] = inputs[1] + 0.3 * torch.randn(shape, generator=g)  # logp near old: some clipping
    before = _all_outputs(*inputs, mask)
    garbage = [torch.where(mask.bool(), x, torch.full(shape, v))
               for x, v in zip(inputs, [inf, -inf, inf, nan, -inf, inf, nan])]
    after = _all_outputs(*garbage, mask)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert all(torch.isfinite(t).all() for t in before[:-1])
