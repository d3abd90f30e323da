"""ReFT: PPO from the warm-up checkpoint with answer-correctness rewards (the paper's stage 2).

`run_reft` is the loop; each step runs five named stages over one `ReFTBatch`:

    rollout      source.next(step, questions)   sample and score the step's questions (rollout_source)
    scoring      score_batch                    old log-probs and values, reference log-probs, KL
    advantages   estimate_advantages            rewards -> advantages and returns (the estimator registry)
    update       ppo_update                     PPO epochs over mini- and micro-batches (batch_layout)
    metrics      reft_metrics

The math lives in `algorithms` (pure functions: losses, aggregations, KL, GAE) and `advantages`
(the estimator registry); the run folder, resume, evaluation and checkpoints in `loop`.
Defaults reproduce the authors' release; every option beyond it (docs/algorithms.md) is off by default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from reftune.models import autocast, is_peft, load_causal_lm
from reftune.options import Rewards
from reftune.tasks import Task
from reftune.trainers import algorithms as A
from reftune.trainers.advantages import Estimator, get_estimator
from reftune.trainers.async_rollout import correct_for_staleness, start_rollouts, validate_staleness
from reftune.trainers.batch_layout import BatchLayout, shuffled_groups  # noqa: F401  (shuffled_groups: re-exported)
from reftune.trainers.distributed import gradient_sync, scalar
from reftune.trainers.lora import reference_mode
from reftune.trainers.loop import Callbacks, OnlineConfig, OnlineRun
from reftune.trainers.policy import ValueHead, frozen_forward, policy_forward, sampled_logprobs
from reftune.trainers.rollout import ScoredRollout, build_rewards, sample_and_score, step_metrics
from reftune.trainers.rollout_source import DynamicSampling, RolloutSource, StepRollout, SyncRollouts, refill_questions

KL_COEF_BY_STYLE = {"nl": 0.05, "program": 0.01}  # the release's defaults (0.01 for MathQA-numeric N-CoT)
KL_ESTIMATORS = ("k1", "k3")
OVERLONG = ("none", "mask", "shape")


@dataclass
class ReFTConfig(Rewards, OnlineConfig):
    """`reftune train`: PPO from a warm-up SFT checkpoint (ReFT)."""

    model: str = ""
    """Warm-up SFT checkpoint (policy init and, unless ref_model is set, the frozen reference)."""
    ref_model: str = ""
    """Frozen reference for the KL penalty (empty: the same checkpoint as `model`)."""
    out_dir: str = "runs/reft"
    """Run folder: config, metrics, checkpoints."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    advantage: str = "gae"
    """gae (the paper: value head + GAE) | reinforce_pp | grpo | rloo | dr_grpo (no value head); see docs/algorithms.md."""
    gamma: float = 1.0
    """Discount of GAE and REINFORCE++ returns."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over all response tokens of the rollout batch."""
    whiten_min_std: float = 1e-4
    """Whitened advantages whose batch std is below this (reward units) are float noise and become 0, not unit-sized (no step on noise)."""
    policy_loss: str = "ppo"
    """ppo (clipped surrogate, the paper) | cispo (clipped, detached importance weight times log-prob)."""
    importance_level: str = "token"
    """token (the paper) | sequence (GSPO: each token's ratio is its sequence's exp(mean token log-ratio))."""
    loss_aggregation: str = "seq_mean_token_mean"
    """seq_mean_token_mean (the paper) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO: token sums / max_new_tokens)."""
    clip: float = 0.2
    """Policy ratio clip, both sides unless clip_low / clip_high are set."""
    clip_low: float | None = None
    """Lower ratio bound 1 - clip_low (null: clip)."""
    clip_high: float | None = None
    """Upper ratio bound 1 + clip_high (null: clip; DAPO's clip-higher, e.g. 0.28)."""
    dual_clip: float | None = None
    """Dual-clip c > 1: a token with negative advantage loses at most c * |A| (null: off)."""
    vf_clip: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 5.0
    """Weight of the value loss (the release: 5)."""
    value_dropout: float = 0.1
    """Dropout before the value head's linear layer."""
    dynamic_sampling: bool = False
    """Train only on question groups whose samples got different rewards, refilling from further questions (DAPO)."""
    dynamic_sampling_max_rounds: int = 3
    """Refill rounds per step at most, each sampling questions_per_step more questions; then the step trains on what it has."""
    overlong: str = "none"
    """Long responses: none (the paper) | mask (cut at max_new_tokens: left out of the loss) | shape (DAPO's soft length penalty)."""
    overlong_buffer: int = 64
    """overlong=shape: the penalty grows linearly over the last overlong_buffer tokens before max_new_tokens."""
    overlong_penalty: float = 1.0
    """overlong=shape: the penalty subtracted from the score of a response of max_new_tokens tokens."""
    engine_old_logprobs: bool = False
    """Take PPO's old log-probs and values from the engine's own decoding passes where it computes them (engine=static; not under mixed precision or fsdp2) instead of one more no-grad pass."""
    max_staleness: int = 0
    """Steps a rollout may lag the policy it trains: 0 samples each step when it starts (the paper); N >= 1 samples N steps ahead in a second CPU process while updates run (docs/async.md)."""
    rollout_threads: int = 0
    """max_staleness > 0: CPU threads of the rollout process (0: half of this process's; the trainer keeps the rest)."""
    staleness_weight_cap: float = 2.0
    """max_staleness > 0: each sampled token's importance weight pi_proximal / pi_behaviour is truncated at this (decoupled PPO)."""
    micro_batch_size: int = 0
    """Rows per forward and backward within each process's share of a mini-batch, gradients accumulated over them (0: the whole share at once); the same update to float rounding."""
    critic_warmup_steps: int = 0
    """First iterations that train only the value head (on detached hidden states; the policy stays put), so PPO starts with a fitted critic instead of V=0."""
    kl_coef: float | None = None
    """KL weight; None: 0.05 for nl, 0.01 for program CoTs (the release)."""
    kl_estimator: str = "k1"
    """k1 (log-ratio, the paper) | k3 (non-negative, low variance)."""
    kl_in_reward: bool = True
    """True: -kl_coef*KL in every token's reward (the paper). False: kl_coef*KL as a loss term."""

    @property
    def estimator(self) -> Estimator:
        return get_estimator(self.advantage, self.samples_per_prompt)

    @property
    def kl_in_loss(self) -> bool:
        """Where the KL acts, decided once: in the loss when asked, or when the estimator gives one
        advantage per sequence (no per-token credit for a KL-shaped reward)."""
        return not self.kl_in_reward or not self.estimator.token_rewards

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high): the ratio is clipped to [1 - low, 1 + high]."""
        return (self.clip if self.clip_low is None else self.clip_low,
                self.clip if self.clip_high is None else self.clip_high)

    def validate(self, prefix: str = "") -> None:
        from reftune.validate import Checks

        super().validate(prefix)
        c = Checks(self, prefix)
        c.str("ref_model").int("ppo_epochs", 1).float("gamma", 0.0, 1.0).float("lam", 0.0, 1.0)
        c.float("clip", 0.0, lo_open=True).float("vf_clip", 0.0, lo_open=True).float("vf_coef", 0.0)
        c.float("value_dropout", 0.0, 1.0, hi_open=True).choice("kl_estimator", KL_ESTIMATORS).int("critic_warmup_steps", 0)
        c.int("micro_batch_size", 0, note="0: no gradient accumulation")
        if self.micro_batch_size and self.mini_batch_size % self.micro_batch_size:
            c.fail("micro_batch_size", f"does not divide mini_batch_size={self.mini_batch_size}")
        if self.kl_coef is not None:
            c.float("kl_coef", 0.0, note="null: the release's default for the CoT style")
        c.bool("whiten_advantages", "kl_in_reward")
        c.float("whiten_min_std", 0.0)
        self.estimator  # noqa: B018  (raises on an unknown estimator or too few samples per question)
        if self.questions_per_step * self.samples_per_prompt < self.mini_batch_size:
            c.fail("mini_batch_size", f"is larger than the rollout batch (questions_per_step * samples_per_prompt = "
                                      f"{self.questions_per_step * self.samples_per_prompt})")
        self._validate_refinements(c)
        validate_staleness(self, c)

    def _validate_refinements(self, c) -> None:
        """The options beyond the paper, alone and in combination (docs/algorithms.md)."""
        c.choice("policy_loss", A.POLICY_LOSSES).choice("importance_level", A.IMPORTANCE_LEVELS)
        c.choice("loss_aggregation", A.LOSS_AGGREGATIONS).choice("overlong", OVERLONG)
        c.bool("dynamic_sampling").int("dynamic_sampling_max_rounds", 0).float("overlong_penalty", 0.0)
        for key in ("clip_low", "clip_high"):
            if getattr(self, key) is not None:
                c.float(key, 0.0, lo_open=True, note="null: clip")
        low, high = self.clip_range
        # CISPO's weight clip has no such order: MiniMax-M1 drops the lower bound (a large clip_low).
        if self.policy_loss == "ppo" and high < low:
            c.fail("clip_high", f"is below the lower clip {low}: clip-higher widens the upper bound (keeps "
                                f"exploration), a narrower one would do the opposite")
        if self.dual_clip is not None:
            c.float("dual_clip", 1.0, lo_open=True, note="the cap c * |A| must lie beyond the clipped loss; null: off")
        if self.policy_loss == "cispo" and self.dual_clip is not None:
            c.fail("dual_clip", "does not apply to policy_loss=cispo: its importance weight is already capped at 1 + clip_high")
        if self.policy_loss == "cispo" and self.importance_level != "token":
            c.fail("importance_level", "must be token with policy_loss=cispo: CISPO clips each token's weight so "
                                       "that every token keeps a gradient; a sequence ratio is GSPO, use policy_loss=ppo")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            c.fail("dynamic_sampling", "compares the rewards of a question's samples: set samples_per_prompt >= 2")
        if self.overlong == "shape":
            c.int("overlong_buffer", 1, self.max_new_tokens, note="a tail of the max_new_tokens budget")
        if not self.estimator.uses_value_head and self.critic_warmup_steps:
            c.fail("critic_warmup_steps", f"warms up a value head, and advantage={self.advantage} has none")
        if self.advantage == "reinforce_pp" and not self.whiten_advantages:
            c.fail("whiten_advantages", "must stay true with advantage=reinforce_pp: its batch normalisation is its baseline")


@dataclass
class Learner:
    """What the stages compute with: the policy, its frozen reference, the value head, the optimizer."""

    model: torch.nn.Module
    """The policy itself."""
    policy: torch.nn.Module
    """What training forwards and backwards go through: `model`, or its data-parallel wrapper."""
    ref_model: torch.nn.Module
    """The frozen reference: a separate model, or `model` with its LoRA adapter disabled."""
    value_head: ValueHead | None
    critic: torch.nn.Module | None
    """What value forwards go through: the value head, or its data-parallel wrapper."""
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    """What the optimizer steps (LoRA: the adapters) and the gradient is clipped over."""
    from_engine: bool
    """Old log-probs and values come from the engine's decoding passes (engine_old_logprobs)."""
    amp: bool
    """Forward passes under bf16 autocast."""
    device: torch.device

    def modes(self, train: bool) -> None:
        """Train (dropout on) or eval mode for the policy and the value head."""
        for m in (self.model, self.value_head):
            if m is not None:
                m.train(train)


@dataclass
class ReFTBatch:
    """One step's rollout on this process and what the stages add to it. B rows in groups of
    samples_per_prompt consecutive rows; P prompt columns (left-padded), R response columns
    (right-padded). Per-token tensors are (B, R), aligned on response positions."""

    input_ids: torch.Tensor
    """(B, P+R) prompt then response tokens."""
    attention_mask: torch.Tensor
    """(B, P+R) 1 on real tokens."""
    response_ids: torch.Tensor
    """(B, R) sampled tokens."""
    response_mask: torch.Tensor
    """(B, R) float, 1 on every sampled token up to and including EOS."""
    loss_mask: torch.Tensor
    """(B, R) float, 1 on the response tokens that train (response_mask without the rows overlong=mask leaves out)."""
    scores: torch.Tensor
    """(B,) sequence rewards (with the overlong shaping when on)."""
    prompt_len: int
    """P."""
    step: int
    """The (0-based) step this batch trains."""
    policy_step: int
    """Optimizer steps the sampling policy had taken (the step itself when sampled synchronously)."""
    sampling_logprobs: torch.Tensor | None = None
    """(B, R) the sampling policy's log-probs as its engine computed them, where it reports them."""
    sampling_values: torch.Tensor | None = None
    """(B, R) values from the engine's own hidden states, where it was given the value head."""
    old_logprobs: torch.Tensor | None = None
    """(B, R) under the policy before this step's update (scoring stage)."""
    old_values: torch.Tensor | None = None
    """(B, R) the value head's before this step's update; None without a value head (scoring stage)."""
    ref_logprobs: torch.Tensor | None = None
    """(B, R) under the frozen reference (scoring stage)."""
    kl: torch.Tensor | None = None
    """(B, R) per-token KL estimate of the policy to the reference, unmasked (scoring stage)."""
    old_from_engine: bool = False
    """The old log-probs and values are the engine's (else the trainer's own no-grad pass)."""
    advantages: torch.Tensor | None = None
    """(B, R) 0 outside loss_mask (advantages stage)."""
    returns: torch.Tensor | None = None
    """(B, R) value targets; None without a value head (advantages stage)."""

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def run_reft(cfg: ReFTConfig, resume: bool = False, task: Task | None = None,
             callbacks: Callbacks | None = None, overwrite: bool = False) -> dict:
    """Train with PPO; returns {"best_checkpoint", "best_accuracy", "last_checkpoint", "kl_coef", "history"}."""
    # Config checked, run folder, task, seeds, policy (warm-up model or last checkpoint), engine.
    run = OnlineRun(cfg, "reft", resume=resume, task=task, callbacks=callbacks, overwrite=overwrite, command="train")
    learner = build_learner(cfg, run)  # reference, value head, optimizer (restored when resuming)
    layout = BatchLayout.plan(cfg, run.dist.world_size)
    kl_coef = cfg.kl_coef if cfg.kl_coef is not None else KL_COEF_BY_STYLE[run.task.style]
    reduce = run.dist.all_reduce_sum if run.dist.enabled else None
    source = rollout_source(cfg, run)
    try:
        for step in run.steps():
            t0 = time.time()
            got = source.next(step, run.questions(step))                                 # 1. rollout
            t_gen = time.time() - t0
            batch = make_batch(got, step, cfg, run.device)
            stats: dict[str, list[float]] = {}
            trained: dict[str, float] = {}
            if batch.rows:  # (dynamic sampling may find no group worth training on)
                score_batch(batch, learner, cfg, layout)                                  # 2. scoring
                trained["kl"] = float(A.masked_sum(batch.kl, batch.response_mask) / batch.rows)
                if not math.isfinite(trained["kl"]):
                    run.fail("KL to the reference", trained["kl"], step)
                estimate_advantages(batch, cfg, kl_coef, reduce)                          # 3. advantages
                trained.update(correct_for_staleness(batch, cfg.staleness_weight_cap))    # (sampled ahead)
                stats = ppo_update(batch, learner, layout, cfg, kl_coef, step, run)       # 4. update
            metrics = reft_metrics(got, batch, learner, stats, **trained, seconds=time.time() - t0,  # 5. metrics
                                   seconds_generate=t_gen)
            metrics = run.average(metrics)  # over processes: every one holds the same number of rows
            run.logger.log_rollout(step + 1, got.sampled, run.tokenizer)  # every log_samples_every steps: a table
            # Engine sync, periodic evaluation + best policy, history, log, resumable checkpoint.
            run.end_step(step, metrics, postfix=dict(score=f"{metrics['reft/score']:.3f}",
                                                     kl=f"{metrics.get('reft/kl', float('nan')):.3f}"))
    finally:
        source.close()
    return run.finish(kl_coef=kl_coef)


def build_learner(cfg: ReFTConfig, run: OnlineRun) -> Learner:
    """The frozen reference, the value head on the shared backbone (with a critic), the optimizer
    (restored when resuming), and whether the engine computes the old log-probs and values."""
    model, device = run.model, run.device
    dtype = next(model.parameters()).dtype
    # With LoRA the reference is the policy with its adapter disabled: no second copy of the base.
    ref_model = model if is_peft(model) and not cfg.ref_model else \
        load_causal_lm(cfg.ref_model or cfg.model, device, dtype).eval().requires_grad_(False)
    value_head = None
    if cfg.estimator.uses_value_head:
        value_head = ValueHead.for_model(model, cfg.value_dropout).to(device, dtype)  # dtype: bf16 hidden states
    critic = run.wrap(value_head) if value_head is not None else None
    params = [p for p in model.parameters() if p.requires_grad] + \
        (list(value_head.parameters()) if value_head is not None else [])  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.attach(optimizer, value_head)
    # The static engine decodes with the live policy: its log-probs of the sampled tokens are the old
    # ones (up to float rounding; not so under bf16 autocast), and given the value head it also
    # returns the old values. (Under fsdp2 the value head is sharded: its forward is a collective.)
    from_engine = cfg.engine_old_logprobs and not run.amp and not run.dist.sharded and run.generator.supports_value_head
    if from_engine:
        run.generator.set_value_head(value_head)
    return Learner(model, run.train_model, ref_model, value_head, critic, optimizer, params, from_engine, run.amp,
                   device)


def rollout_source(cfg: ReFTConfig, run: OnlineRun) -> RolloutSource:
    """Synchronous sampling of each step's questions, scored by the run's rewards (correctness,
    reward functions, a reward model); or, with max_staleness, sampled ahead in a second process
    (async_rollout). Dynamic sampling around either, its refills sampled here by the current policy."""
    rewards = build_rewards(cfg, run.device, next(run.model.parameters()).dtype)

    def sample(questions) -> ScoredRollout:
        scored = sample_and_score(run.generator, run.task, questions, cfg.samples_per_prompt, cfg.temperature,
                                  cfg.top_p, cfg.max_new_tokens, rewards)
        ro = scored.rollout
        if cfg.max_staleness and ro.sampling_logprobs is None:  # beside stale rows: each row's behaviour log-probs
            ro.sampling_logprobs = sampled_logprobs(run.rollout_model, ro, cfg.temperature, cfg.logprob_chunk_size,
                                                    cfg.samples_per_prompt)
        return scored

    now = SyncRollouts(sample)
    source: RolloutSource = start_rollouts(cfg, run, rewards) if cfg.max_staleness else now
    if cfg.dynamic_sampling:
        def refill(step: int, round_: int) -> list:
            picked = refill_questions(run.task.train, step, round_, cfg.questions_per_step, cfg.seed,
                                      cfg.dynamic_sampling_max_rounds)
            return run.dist.slice(picked, "questions_per_step")

        source = DynamicSampling(source, refill, cfg.samples_per_prompt, cfg.dynamic_sampling_max_rounds,
                                 run.tokenizer.pad_token_id, agree=lambda n: min(run.dist.gather(n)), refills=now)
    return source


def make_batch(got: StepRollout, step: int, cfg: ReFTConfig, device: torch.device) -> ReFTBatch:
    """The rollout as PPO's batch: masks as floats, scores on the device, overlong handling applied."""
    ro = got.scored.rollout
    response_mask = ro.response_mask.float()
    loss_mask, scores = response_mask, got.scored.scores.to(device)
    if cfg.overlong == "mask":  # responses cut at max_new_tokens carry no gradient
        loss_mask = response_mask * ro.ended_with_eos.to(response_mask.device).float().unsqueeze(-1)
    elif cfg.overlong == "shape":
        lengths = response_mask.sum(-1).to(device)
        scores = scores + A.overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
    return ReFTBatch(ro.input_ids, ro.attention_mask, ro.response_ids, response_mask, loss_mask, scores,
                     ro.prompt_ids.shape[1], step, got.policy_step, ro.sampling_logprobs, ro.sampling_values,
                     ref_logprobs=getattr(got.scored, "ref_logprobs", None))  # sampled ahead: computed there


@torch.no_grad()
def score_batch(batch: ReFTBatch, learner: Learner, cfg: ReFTConfig, layout: BatchLayout) -> None:
    """Log-probs and values of the sampled tokens under the policy (old) and the reference; the
    per-token KL once, for the reward, the loss and the logs."""
    P, share, device = batch.prompt_len, layout.share_scoring, learner.device
    with autocast(learner.amp, device):
        learner.modes(train=False)
        # The engine's numbers are the old ones only when the policy being updated sampled the batch.
        if learner.from_engine and batch.policy_step == batch.step and batch.sampling_logprobs is not None and \
                (learner.value_head is None or batch.sampling_values is not None):
            batch.old_logprobs, batch.old_values = batch.sampling_logprobs.to(device), batch.sampling_values
            batch.old_from_engine = True
        else:
            batch.old_logprobs, batch.old_values, _ = policy_forward(
                learner.policy, learner.critic, batch.input_ids, batch.attention_mask, batch.response_ids, P,
                cfg.temperature, cfg.logprob_chunk_size, group_size=share)
        if batch.ref_logprobs is None:
            with reference_mode(learner.ref_model), frozen_forward(learner.ref_model is not learner.model):
                ref_logprobs, _, _ = policy_forward(learner.ref_model, None, batch.input_ids, batch.attention_mask,
                                                    batch.response_ids, P, cfg.temperature, cfg.logprob_chunk_size,
                                                    group_size=share)
            batch.ref_logprobs = ref_logprobs.clone()  # a normal tensor: an inference one cannot be saved for backward
        batch.kl = A.kl_penalty(batch.old_logprobs, batch.ref_logprobs, cfg.kl_estimator)


@torch.no_grad()
def estimate_advantages(batch: ReFTBatch, cfg: ReFTConfig, kl_coef: float,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Advantages and returns (GAE with the value head, or an estimator without) over the tokens that train."""
    batch.advantages, batch.returns = cfg.estimator.estimate(batch.scores, batch.kl, batch.old_values,
                                                             batch.loss_mask, cfg, kl_coef, reduce)


def ppo_update(batch: ReFTBatch, learner: Learner, layout: BatchLayout, cfg: ReFTConfig, kl_coef: float, step: int,
               run: OnlineRun) -> dict[str, list[float]]:
    """PPO epochs over shuffled mini-batches, one optimizer step each; returns each statistic per
    mini-batch. During the critic warm-up only the value loss trains, on detached hidden states."""
    learner.modes(train=True)
    # Critic warm-up: through the unwrapped LM (no gradient reaches it, so a DDP wrapper must not
    # wait for one).
    warming = learner.value_head is not None and step < cfg.critic_warmup_steps
    lm, value_fn = (learner.model, DetachedInput(learner.critic)) if warming else (learner.policy, learner.critic)
    # The loss of a mini-batch is the aggregate over all of its rows on every process: each
    # micro-batch's weighs its share of the aggregate's units (sequences or tokens).
    units = A.aggregation_units(batch.loss_mask, cfg.loss_aggregation)
    world = run.dist.world_size
    stats: dict[str, list[float]] = {}
    for _ in range(cfg.ppo_epochs):
        for idx in layout.mini_batches(batch.rows):
            # DDP averages the gradients of the processes: weigh by the units of all of them (a
            # device tensor: NCCL reduces no CPU ones)
            total = max(float(run.dist.all_reduce_sum(units[idx].sum())), 1.0)
            learner.optimizer.zero_grad(set_to_none=True)
            summed: dict[str, float] = {}
            micros = layout.micro_batches(idx)
            for i, micro in enumerate(micros):
                with gradient_sync((learner.policy, learner.critic), sync=i == len(micros) - 1):  # ddp: one all-reduce
                    weight = float(units[micro].sum()) * world / total
                    loss, micro_stats = micro_batch_loss(batch, micro, learner, lm, value_fn,
                                                         layout.update_share(warming), cfg, kl_coef, warming)
                    if not torch.isfinite(loss):
                        run.fail("loss", loss.item(), step)
                    (loss * weight).backward()
                    for k, v in micro_stats.items():
                        summed[k] = summed.get(k, 0.0) + weight * scalar(v)
            grad_norm = torch.nn.utils.clip_grad_norm_(learner.params, cfg.max_grad_norm)
            learner.optimizer.step()
            for k, v in {**summed, "grad_norm": scalar(grad_norm)}.items():
                stats.setdefault(k, []).append(v)
    return stats


def micro_batch_loss(batch: ReFTBatch, rows: torch.Tensor, learner: Learner, lm, value_fn, share: int,
                     cfg: ReFTConfig, kl_coef: float, warming: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of rows `rows` (policy + vf_coef * value + the KL term when it acts in the loss),
    from one forward with gradients, and its statistics (detached 0-dim tensors)."""
    P = batch.prompt_len
    # Cut to the longest response of these rows: the columns after it are padding of every row, and
    # causal attention keeps them out of the earlier positions.
    width = max(int(batch.response_mask[rows].sum(-1).max()), 1)
    mb = lambda t: t[rows][:, :width]  # noqa: E731  (a per-token tensor, these rows')
    mask = mb(batch.loss_mask)
    with autocast(learner.amp, learner.device):
        logprobs, values, token_entropy = policy_forward(
            lm, value_fn, batch.input_ids[rows][:, :P + width], batch.attention_mask[rows][:, :P + width],
            mb(batch.response_ids), P, cfg.temperature, cfg.logprob_chunk_size, with_entropy=True, group_size=share)
    low, high = cfg.clip_range
    norm = dict(aggregation=cfg.loss_aggregation, norm_length=cfg.max_new_tokens)
    pg_loss, stats = A.get_policy_loss(cfg.policy_loss)(
        logprobs, mb(batch.old_logprobs), mb(batch.advantages), mask, low, clip_high=high, dual_clip=cfg.dual_clip,
        importance_level=cfg.importance_level, **norm)
    loss = pg_loss.detach() * 0.0 if warming else pg_loss
    if values is not None:
        vf_loss, vf_stats = A.ppo_value_loss(values, mb(batch.old_values), mb(batch.returns), mask, cfg.vf_clip, **norm)
        loss = loss + cfg.vf_coef * vf_loss
        stats = {**stats, **vf_stats, "vf_loss": vf_loss.detach()}
    if cfg.kl_in_loss and not warming:
        policy_kl = A.kl_penalty(logprobs, mb(batch.ref_logprobs), cfg.kl_estimator)
        loss = loss + kl_coef * A.aggregate(policy_kl, mask, cfg.loss_aggregation, cfg.max_new_tokens)
    return loss, {**stats, "pg_loss": pg_loss.detach(), "entropy": A.masked_mean(token_entropy, mask)}


def reft_metrics(got: StepRollout, batch: ReFTBatch, learner: Learner, stats: dict[str, list[float]],
                 **values: float) -> dict:
    """This process's metrics of the step: of everything sampled, of the trained batch, of the
    update, the source's own, and `values` (KL, timings)."""
    values = {**values, **got.stats, "lr": learner.optimizer.param_groups[0]["lr"]}
    if batch.rows:
        if batch.returns is not None:
            values["value_explained_var"] = float(A.explained_variance(batch.old_values, batch.returns, batch.loss_mask))
        if batch.sampling_logprobs is not None and not batch.old_from_engine:
            # engines with their own numerics (vLLM): how far their log-probs are from the trainer's
            gap = (batch.sampling_logprobs.to(batch.old_logprobs.device) - batch.old_logprobs).abs()
            values["engine_logprob_gap"] = float(A.masked_mean(gap, batch.response_mask))
    return step_metrics("reft", got.sampled, stats, **values)


class DetachedInput(torch.nn.Module):
    """A value head that trains on hidden states without sending gradient into the backbone."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.detach())
