"""The RL math of ReFT as pure tensor-in, tensor-out functions (no state, no models).

Conventions used by every function here:
- `response_mask` (batch, seq), bool or 0/1 float: 1 on the response tokens the policy generated
  (including the EOS token when one was generated), 0 on the padding after the response. Any
  nonzero entry counts as 1; it is a selector, not a weight.
- Per-token tensors are (batch, seq) and aligned on response positions: index t is the t-th
  response token (prompt positions are not part of these tensors).
- Values at masked-out positions never influence any output (they may be garbage, even inf/nan):
  masking uses `torch.where`, not multiplication, because `inf * 0` is nan.
- Outputs are 0 at masked-out positions unless a docstring says otherwise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- masked reductions
def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of `x` where `mask` is nonzero. x, mask: same shape; dim=None sums everything (0-dim)."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of `x` over positions where `mask` is nonzero (dim=None: over everything -> 0-dim).

    An empty selection gives 0 (not nan), so empty rows cannot poison a batch statistic.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    # clamp avoids 0/0 without a host sync; the numerator is exactly 0 when count is 0
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance (0-dim) of `x` over all masked elements; Bessel-corrected when `unbiased`.

    Fewer than 2 masked elements give 0 rather than an error or nan.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(x.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True,
                  reduce: Optional[Callable[[Tensor], Tensor]] = None, min_std: float = 0.0) -> Tensor:
    """(x - mean) * rsqrt(var + 1e-8) with the masked mean and unbiased masked variance over all
    masked elements of the batch; the mean is added back when `shift_mean` is False (scale only).

    `reduce` (a sum over processes, e.g. an all-reduce) makes the statistics those of the whole
    batch when its rows are split over processes: the same two passes (mean, then the centred sum
    of squares) on the global sums, so W shares of B/W rows whiten like one batch of B.
    `min_std` > 0 guards against whitening noise: a spread below it is taken as none, so x becomes
    its mean (0 when shifted). Differences that small are float rounding (e.g. a KL of 1e-7 on a
    batch whose rewards are all equal); divided by their std they would be unit-sized advantages,
    and even left small, Adam would rescale their gradient to an lr-sized step.
    Output has the shape of `x` and is zeroed where `mask` is 0.
    """
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        totals = reduce(torch.stack([masked_sum(x, mask), mask.bool().sum().to(x.dtype)]))
        n = totals[1]
        mean = totals[0] / n.clamp(min=1)
        var = reduce(masked_sum((x - mean) ** 2, mask)) / n.clamp(min=1)
        var = var * n / (n - 1).clamp(min=1)
    scale = torch.rsqrt(var + 1e-8)
    if min_std > 0:  # a select, not a branch: no host sync, and the same numbers above the floor
        scale = torch.where(var < min_std**2, torch.zeros_like(scale), scale)
    whitened = (x - mean) * scale
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Token mean within each sequence, then mean over sequences -> 0-dim.

    x, mask: (batch, seq). Rows whose mask is all zero are excluded from the mean over sequences
    (they would otherwise drag it toward 0); if every row is empty the result is 0. Every sequence
    weighs the same regardless of length, as in ReFT's loss.
    """
    per_row = masked_mean(x, mask, dim=-1)
    nonempty = mask.bool().any(dim=-1)
    return per_row.sum() / nonempty.sum().clamp(min=1).to(per_row.dtype)


def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, norm_length: int) -> Tensor:
    """Token SUM within each sequence divided by the constant `norm_length`, then mean over the
    non-empty sequences -> 0-dim (Dr. GRPO: no per-sequence length normalisation, so a long wrong
    answer is not penalised less per token than a short one)."""
    if not norm_length or norm_length < 1:
        raise ValueError(f"seq_mean_token_sum_norm needs norm_length >= 1 (the generation budget); got {norm_length}")
    per_row = masked_sum(x, mask, dim=-1) / norm_length
    nonempty = mask.bool().any(dim=-1)
    return per_row.sum() / nonempty.sum().clamp(min=1).to(per_row.dtype)


LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def aggregate(x: Tensor, mask: Tensor, mode: str = "seq_mean_token_mean", norm_length: Optional[int] = None) -> Tensor:
    """A per-token loss (batch, seq) reduced to 0-dim:
    - seq_mean_token_mean (the paper): `sequence_mean`, every sequence weighs the same;
    - token_mean (DAPO): `masked_mean` over all tokens, every token weighs the same;
    - seq_mean_token_sum_norm (Dr. GRPO): `seq_mean_token_sum_norm` with `norm_length`.
    """
    if mode == "seq_mean_token_mean":
        return sequence_mean(x, mask)
    if mode == "token_mean":
        return masked_mean(x, mask)
    if mode == "seq_mean_token_sum_norm":
        return seq_mean_token_sum_norm(x, mask, norm_length)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")


def aggregation_units(mask: Tensor, mode: str = "seq_mean_token_mean") -> Tensor:
    """(batch,) float: what each row adds to `aggregate`'s denominator (1 per non-empty row for
    the sequence means, its token count for token_mean). A batch split into parts aggregates as
    the sum of the parts' aggregates, each weighted by its units over the whole batch's."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")
    counts = mask.bool().sum(-1)
    return (counts if mode == "token_mean" else counts > 0).float()


# --------------------------------------------------------------------------- KL and rewards
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log p - log p_ref: unbiased per-sample estimate of KL(p || p_ref), can be negative."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(d) - d - 1 with d = log p_ref - log p (Schulman): unbiased and always >= 0.

    expm1(d) - d is the same quantity, computed without cancellation when d is small.
    """
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


_KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL estimate (batch, seq) between the policy and the frozen reference.

    logprobs, ref_logprobs: (batch, seq) log-probs of the sampled tokens. Not masked: values at
    padding are meaningless and are dropped by `token_rewards` / `masked_*`.
    estimator: "k1" (`kl_k1`) or "k3" (`kl_k3`); anything else raises ValueError.
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {sorted(_KL_ESTIMATORS)}"
        )
    return _KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def token_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """ReFT's per-token reward (batch, seq): -kl_coef * kl on every response token, plus the
    sequence score (batch,) added at the LAST response token of each row (last position where
    `response_mask` is 1, which needs no right-padding assumption). 0 on padding.

    Rows whose mask is all zero get no score (all zeros). Rewards are constants for PPO: pass
    detached inputs (or call under torch.no_grad()).
    """
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(mask, -kl_coef * kl, zero)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    # argmax of position*mask is the last masked index; for an empty row it is 0, which `& mask`
    # then rejects, so empty rows get no score.
    last = (positions * mask).argmax(dim=-1, keepdim=True)
    is_last = (positions == last) & mask
    return rewards + torch.where(is_last, scores.to(kl.dtype).unsqueeze(-1), zero)


# --------------------------------------------------------------------------- advantages
@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens -> (advantages, returns), (batch, seq).

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1} * m_{t+1}
        returns = A + V

    The value after the last response token (after EOS, or where generation was cut) is
    bootstrapped as 0: the episode ends there. For right-padded responses this is standard GAE.
    Both outputs are zeroed where the mask is 0 and carry no gradient (computed under no_grad).
    Not whitened: the caller whitens advantages over all response tokens of the batch.
    """
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # sanitise padding first so garbage there can never reach a masked position
    rewards = torch.where(mask, rewards.to(values.dtype), zero)
    values = torch.where(mask, values, zero)
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1} * m_{t+1}
    next_adv = torch.zeros_like(values[:, 0])  # A_{t+1} * m_{t+1}
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_adv
        next_value = torch.where(mask[:, t], values[:, t], zero)
        next_adv = torch.where(mask[:, t], advantages[:, t], zero)
    advantages = torch.where(mask, advantages, zero)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    """(batch,) scores -> (n_prompts, group_size) float view; rows i*g..(i+1)*g-1 form group i."""
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"batch of {scores.numel()} scores is not divisible into groups of {group_size}")
    scores = scores if scores.is_floating_point() else scores.to(torch.get_default_dtype())
    return scores.reshape(-1, group_size)


def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: (s - group mean) / (group std + eps) -> (batch,), std UNBIASED (as GRPO's reference).

    A group whose scores are all equal gets 0. group_size 1 raises ValueError: a lone sample has
    no baseline and no spread, so it would silently produce no learning signal.
    """
    if group_size < 2:
        raise ValueError(f"grpo needs group_size >= 2 (samples_per_prompt); got {group_size}")
    s = _grouped(scores, group_size)
    mean, std = s.mean(dim=-1, keepdim=True), s.std(dim=-1, keepdim=True, unbiased=True)
    return ((s - mean) / (std + eps)).reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO: s_i - mean of the other g-1 samples of its group -> (batch,). group_size < 2 raises."""
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (samples_per_prompt); got {group_size}")
    s = _grouped(scores, group_size)
    leave_one_out = (s.sum(dim=-1, keepdim=True) - s) / (group_size - 1)
    return (s - leave_one_out).reshape(-1)


def dr_grpo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: s - group mean -> (batch,), no division by the group's std (which weighs questions
    that are almost always right or wrong up). group_size < 2 raises."""
    if group_size < 2:
        raise ValueError(f"dr_grpo needs group_size >= 2 (samples_per_prompt); got {group_size}")
    s = _grouped(scores, group_size)
    return (s - s.mean(dim=-1, keepdim=True)).reshape(-1)


_GROUP_ESTIMATORS: dict[str, Callable[[Tensor, int, float], Tensor]] = {
    "grpo": lambda s, g, eps: grpo_advantages(s, g, eps),
    "rloo": lambda s, g, eps: rloo_advantages(s, g),
    "dr_grpo": lambda s, g, eps: dr_grpo_advantages(s, g),
}


def group_advantages(scores: Tensor, group_size: int, method: str, eps: float = 1e-6) -> Tensor:
    """Critic-free advantages (batch,) from sequence scores (batch,) laid out in contiguous groups
    of `group_size` samples per question (batch = n_prompts * group_size).

    method: "grpo", "rloo" or "dr_grpo" (`*_advantages` above). Raises ValueError on an
    unknown method, a batch not divisible by group_size, or a group_size the method cannot use.
    """
    if method not in _GROUP_ESTIMATORS:
        raise ValueError(
            f"unknown group advantage method {method!r}; expected one of {sorted(_GROUP_ESTIMATORS)}"
        )
    _grouped(scores, group_size)  # divisibility is checked first so its error is the one reported
    return _GROUP_ESTIMATORS[method](scores, group_size, eps)


def mixed_groups(scores: Tensor, group_size: int) -> Tensor:
    """(n_prompts,) bool: the groups of `group_size` consecutive scores that are not all equal --
    the ones a group-relative advantage can learn from (dynamic sampling keeps only those)."""
    s = _grouped(scores, group_size)
    return s.amax(dim=-1) != s.amin(dim=-1)


def discounted_returns(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over response tokens (batch, seq), 0 after the last one and on
    padding: GAE with V = 0 and lam = 1 (REINFORCE++'s per-token return, no critic)."""
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    return gae(rewards, torch.zeros_like(rewards), response_mask, gamma, 1.0)[0]


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (batch,) for response lengths (batch,):
    0 up to max_length - buffer tokens, then falling linearly to -factor at max_length:
    factor * clamp((max_length - buffer - length) / buffer, -1, 0)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in 1..max_length={max_length}; got {buffer}")
    free = max_length - buffer
    return factor * torch.clamp((free - lengths.float()) / buffer, -1.0, 0.0)


def broadcast_sequence_advantages(adv: Tensor, response_mask: Tensor) -> Tensor:
    """(batch,) sequence advantages -> (batch, seq): the same value on every response token, 0
    elsewhere, so critic-free estimators feed the same token-level `ppo_policy_loss`."""
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    return torch.where(response_mask.bool(), adv.unsqueeze(-1), zero)


# --------------------------------------------------------------------------- losses
IMPORTANCE_LEVELS = ("token", "sequence")


def importance_log_ratio(logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor,
                         level: str = "token") -> Tensor:
    """log(pi / pi_old) per token (batch, seq), 0 on padding.

    token: log p_t - log p_old_t. sequence (GSPO): every token of a row carries the row's mean
    token log-ratio, log s_i = mean_t (log p_t - log p_old_t), as a value; its gradient is the
    token's own, d log p_t (GSPO-token: s_i,t = sg[s_i] * p_t / sg[p_t]). With one advantage per
    sequence, a sequence-mean loss of s_i,t * A_i has GSPO's gradient, s_i * A_i * mean_t d log p_t.
    """
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # zeroed on padding first, so exp() of garbage cannot produce inf/nan gradients
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"unknown importance level {level!r}; expected one of {', '.join(IMPORTANCE_LEVELS)}")
    per_sequence = masked_mean(log_ratio, mask, dim=-1).detach()
    own = torch.where(mask, logprobs, zero)
    return torch.where(mask, per_sequence.unsqueeze(-1) + own - own.detach(), zero)


def _ratio_stats(log_ratio: Tensor, ratio: Tensor, mask: Tensor, clipped: Tensor) -> dict[str, Tensor]:
    """The detached 0-dim statistics every policy loss reports, over masked tokens."""
    with torch.no_grad():
        return {
            "clipfrac": masked_mean(clipped.to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, clip: float,
    clip_high: Optional[float] = None, dual_clip: Optional[float] = None, aggregation: str = "seq_mean_token_mean",
    importance_level: str = "token", norm_length: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate -> (0-dim loss, stats). All inputs (batch, seq).

    ratio = exp(`importance_log_ratio`); per token: max(-A * ratio, -A * clip(ratio, 1-clip, 1+clip_high))
    (clip_high None: clip; above clip: DAPO's clip-higher). `dual_clip` c > 1 (Ye et al.): where A < 0
    the token loss is also capped at -A * c, so a huge ratio on a bad token cannot dominate.
    Reduced with `aggregate(aggregation)`; the default is `sequence_mean` (token mean per sequence,
    then mean over non-empty sequences). Where a clipped branch wins, the token's gradient is 0.
    stats (detached 0-dim, over masked tokens): `clipfrac` fraction where clipped loss > unclipped,
    `approx_kl` mean of 0.5 * log_ratio^2, `ratio_mean` mean ratio; with dual_clip also
    `dual_clipfrac`, the fraction capped by it.
    """
    mask = response_mask.bool()
    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, importance_level)
    ratio = torch.exp(log_ratio)
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    capped = None
    if dual_clip is not None:
        capped = (advantages < 0) & (per_token > -advantages * dual_clip)
        per_token = torch.where(capped, -advantages * dual_clip, per_token)
    loss = aggregate(per_token, mask, aggregation, norm_length)
    stats = _ratio_stats(log_ratio, ratio, mask, clipped > unclipped)
    if capped is not None:
        stats["dual_clipfrac"] = masked_mean(capped.to(ratio.dtype), mask).detach()
    return loss, stats


def cispo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, clip: float,
    clip_high: Optional[float] = None, dual_clip: Optional[float] = None, aggregation: str = "seq_mean_token_mean",
    importance_level: str = "token", norm_length: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1) -> (0-dim loss, stats). All inputs (batch, seq).

    Per token: -sg[clip(ratio, 1-clip, 1+clip_high)] * A * log p: the importance weight is clipped
    and detached, but every token keeps a gradient (-w * A on log p), where PPO's clip zeroes it.
    Same arguments and stats as `ppo_policy_loss` (`clipfrac`: tokens whose weight was clipped);
    token-level only, and no dual clip (the weight is already bounded): those raise ValueError.
    """
    if dual_clip is not None or importance_level != "token":
        raise ValueError("cispo takes a per-token weight, bounded by its clip: no dual_clip, importance_level=token")
    mask = response_mask.bool()
    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, "token")
    ratio = torch.exp(log_ratio)
    high = clip if clip_high is None else clip_high
    weight = torch.clamp(ratio, 1.0 - clip, 1.0 + high).detach()
    own = torch.where(mask, logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    loss = aggregate(-weight * advantages * own, mask, aggregation, norm_length)
    return loss, _ratio_stats(log_ratio, ratio, mask, weight != ratio.detach())


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "ppo": ppo_policy_loss,
    "cispo": cispo_policy_loss,
}


def get_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """The registered policy loss `name`, looked up in this module when called (so a substitute set
    on the module, as a test does to inject a nan, is the one used)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; expected one of {', '.join(POLICY_LOSSES)}")
    return globals()[POLICY_LOSSES[name].__name__]


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip: float,
    aggregation: str = "seq_mean_token_mean", norm_length: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss -> (0-dim loss, stats). All inputs (batch, seq).

    Per token: 0.5 * max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2), reduced with
    `aggregate(aggregation)` (default `sequence_mean`). stats: `vf_clipfrac`, fraction of masked
    tokens where the clipped term is larger.
    """
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values, old_values, returns = (torch.where(mask, t, zero) for t in (values, old_values, returns))
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped, clipped), mask, aggregation, norm_length)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


# --------------------------------------------------------------------------- logits helpers
def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probs (batch, seq) of `labels` (batch, seq) under `logits` (batch, seq, vocab), in float32+.

    Never materialises a full float32 (batch, seq, vocab) copy of low-precision logits: float32/64
    logits use logit[label] - logsumexp(logits); bf16/fp16 logits are upcast one row at a time.
    """
    labels = labels.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, labels).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = [
        torch.gather(torch.log_softmax(row.float(), dim=-1), -1, row_labels).squeeze(-1)
        for row, row_labels in zip(logits, labels)
    ]
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (batch, seq) of the softmax of `logits` (batch, seq, vocab), computed in float32+.

    H = logsumexp(z) - sum softmax(z) * z, which stays finite for very peaked distributions (logits
    must be finite). bf16/fp16 logits are upcast one row at a time, as in `logprobs_from_logits`.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        return torch.stack([entropy_from_logits(row.float()) for row in logits])
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over masked elements -> 0-dim (value-head diagnostic).

    1 is a perfect critic, 0 no better than a constant, negative worse. Returns nan when Var[R] is
    0 (including fewer than 2 masked elements): the ratio is undefined there. Never raises.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    nan = torch.full((), float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, nan)
