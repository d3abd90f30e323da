"""ReFT: PPO from the warm-up checkpoint with answer-correctness rewards (the paper's stage 2).

The whole algorithm is `run_reft`, a plain loop with numbered steps. The math lives in
`algorithms` (pure functions) and `advantages` (the estimator registry); the run folder, resume,
evaluation and checkpoints in `loop`; sampling and scoring in `rollout`.
Defaults reproduce the authors' release; the options beyond it (several samples per prompt,
k3 KL, KL as a loss, critic-free GRPO/RLOO advantages) are off by default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from reftune.models import autocast, load_causal_lm
from reftune.options import Rewards
from reftune.tasks import Task
from reftune.trainers import algorithms as A
from reftune.trainers.advantages import get_estimator
from reftune.trainers.distributed import gradient_sync, scalar
from reftune.trainers.lora import is_peft, reference_mode
from reftune.trainers.loop import Callbacks, OnlineConfig, OnlineRun
from reftune.trainers.policy import ValueHead, frozen_forward, policy_forward
from reftune.trainers.rollout import build_rewards, sample_and_score

KL_COEF_BY_STYLE = {"nl": 0.05, "program": 0.01}  # the release's defaults (0.01 for MathQA-numeric N-CoT)
KL_ESTIMATORS = ("k1", "k3")


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
    """gae (the paper: value head + GAE) | grpo | rloo (critic-free, no value head)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over all response tokens of the rollout batch."""
    clip: float = 0.2
    """Policy ratio clip."""
    vf_clip: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 5.0
    """Weight of the value loss (the release: 5)."""
    value_dropout: float = 0.1
    """Dropout before the value head's linear layer."""
    engine_old_logprobs: bool = False
    """Take PPO's old log-probs and values from the engine's own decoding passes where it computes them (engine=static; not under mixed precision or fsdp2) instead of one more no-grad pass."""
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
    def kl_in_loss(self) -> bool:
        """Where the KL acts, decided once: in the loss when asked, or when there is no critic
        (critic-free estimators have no per-token credit for a KL-shaped reward)."""
        return not self.kl_in_reward or not get_estimator(self.advantage, self.samples_per_prompt).uses_value_head

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
        get_estimator(self.advantage, self.samples_per_prompt)
        if self.questions_per_step * self.samples_per_prompt < self.mini_batch_size:
            c.fail("mini_batch_size", f"is larger than the rollout batch (questions_per_step * samples_per_prompt = "
                                      f"{self.questions_per_step * self.samples_per_prompt})")


def run_reft(cfg: ReFTConfig, resume: bool = False, task: Task | None = None,
             callbacks: Callbacks | None = None, overwrite: bool = False) -> dict:
    """Train with PPO; returns {"best_checkpoint", "best_accuracy", "last_checkpoint", "kl_coef", "history"}."""
    # 1. Config checked, run folder, task, seeds, policy (warm-up model or last checkpoint), engine.
    run = OnlineRun(cfg, "reft", resume=resume, task=task, callbacks=callbacks, overwrite=overwrite, command="train")
    model, device, amp = run.model, run.device, run.amp
    estimator = get_estimator(cfg.advantage, cfg.samples_per_prompt)
    kl_coef = cfg.kl_coef if cfg.kl_coef is not None else KL_COEF_BY_STYLE[run.task.style]

    # 2. Frozen reference, value head on the shared backbone, optimizer (restored when resuming).
    dtype = next(model.parameters()).dtype
    rewards = build_rewards(cfg, device, dtype)  # correctness, reward functions, reward model
    # With LoRA the reference is the policy with its adapter disabled: no second copy of the base.
    ref_model = model if is_peft(model) and not cfg.ref_model else \
        load_causal_lm(cfg.ref_model or cfg.model, device, dtype).eval().requires_grad_(False)
    value_head = None
    if estimator.uses_value_head:
        value_head = ValueHead(model.config.hidden_size, cfg.value_dropout).to(device, dtype)  # dtype: bf16 hidden states
    # What forwards and backwards go through: the modules themselves, or their data-parallel wrappers.
    policy, critic = run.train_model, (run.wrap(value_head) if value_head is not None else None)
    params = [p for p in model.parameters() if p.requires_grad] + \
        (list(value_head.parameters()) if value_head is not None else [])  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.attach(optimizer, value_head)
    mini_batch = cfg.mini_batch_size // run.dist.world_size  # rows per process in each mini-batch
    if mini_batch * run.dist.world_size != cfg.mini_batch_size:
        raise ValueError(f"mini_batch_size={cfg.mini_batch_size} does not split over {run.dist.world_size} processes")
    micro = cfg.micro_batch_size or mini_batch  # rows per forward + backward
    if mini_batch % micro:
        raise ValueError(f"micro_batch_size={micro} does not divide the {mini_batch} rows each of the "
                         f"{run.dist.world_size} processes takes from a mini-batch of {cfg.mini_batch_size}")
    reduce = run.dist.all_reduce_sum if run.dist.enabled else None
    # Each question's samples are one group of rows. (Micro-)batches hold whole groups, so the
    # forward passes can run each prompt once (policy.shared_prompt_forward): always without
    # gradients, and with them in one process (a DDP/FSDP wrapper expects one forward per backward).
    group = cfg.samples_per_prompt if mini_batch % cfg.samples_per_prompt == 0 else 1
    shared = group if group > 1 and not cfg.gradient_checkpointing and not cfg.logprob_chunk_size else 1
    shared_micro = shared if micro % shared == 0 else 1  # micro-batches of whole groups
    shared_grad = shared_micro if not run.dist.enabled else 1
    # The static engine decodes with the live policy: its log-probs of the sampled tokens are the old
    # ones (up to float rounding; not so under bf16 autocast), and given the value head it also
    # returns the old values. (Under fsdp2 the value head is sharded: its forward is a collective.)
    from_engine = cfg.engine_old_logprobs and not amp and not run.dist.sharded and hasattr(run.generator, "value_head")
    if from_engine:
        run.generator.value_head = value_head

    for step in run.steps():
        t0 = time.time()
        # 3. Rollout: sample CoTs for this step's questions and score the answers.
        questions = run.questions(step)  # this process's share
        scored = sample_and_score(run.generator, run.task, questions, cfg.samples_per_prompt, cfg.temperature,
                                  cfg.top_p, cfg.max_new_tokens, rewards)
        ro = scored.rollout
        input_ids, attention_mask = ro.input_ids, ro.attention_mask
        response_mask, P = ro.response_mask.float(), ro.prompt_ids.shape[1]
        t_gen = time.time() - t0

        # 4. Log-probs and values of the sampled tokens under the policy (old) and the reference;
        # the per-token KL once, for the reward and the logs.
        with torch.no_grad(), autocast(amp, device):
            model.eval()
            if value_head is not None:
                value_head.eval()
            if from_engine and ro.sampling_logprobs is not None and (value_head is None or ro.sampling_values is not None):
                old_logprobs, old_values = ro.sampling_logprobs.to(device), ro.sampling_values
            else:
                old_logprobs, old_values, _ = policy_forward(policy, critic, input_ids, attention_mask, ro.response_ids,
                                                             P, cfg.temperature, cfg.logprob_chunk_size, group_size=shared)
            with reference_mode(ref_model), frozen_forward(ref_model is not model):
                ref_logprobs, _, _ = policy_forward(ref_model, None, input_ids, attention_mask, ro.response_ids, P,
                                                    cfg.temperature, cfg.logprob_chunk_size, group_size=shared)
            ref_logprobs = ref_logprobs.clone()  # a normal tensor: an inference one cannot be saved for backward
            kl = A.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator)
            mean_kl = float(A.masked_sum(kl, response_mask) / max(len(questions) * cfg.samples_per_prompt, 1))
            if not math.isfinite(mean_kl):
                run.fail("KL to the reference", mean_kl, step)
            # 5. Rewards and advantages (GAE with the value head, or group-relative without).
            scores = scored.scores.to(device)
            advantages, returns = estimator.estimate(scores, kl, old_values, response_mask, cfg, kl_coef, reduce)

        # 6. PPO epochs over shuffled mini-batches.
        model.train()
        if value_head is not None:
            value_head.train()
        stats: dict[str, list[float]] = {}
        B = input_ids.shape[0]
        # Critic warm-up: the value loss alone, on detached hidden states, through the unwrapped LM
        # (no gradient reaches it, so a DDP wrapper must not wait for one).
        warming = value_head is not None and step < cfg.critic_warmup_steps
        lm, value_fn = (model, DetachedInput(critic)) if warming else (policy, critic)
        # The losses are means over non-empty responses: each micro-batch's is weighted by its share
        # of its mini-batch's, so the accumulated gradient is the whole mini-batch's.
        nonempty = (response_mask.sum(-1) > 0).float()
        for _ in range(cfg.ppo_epochs):
            for idx in shuffled_groups(B, group).split(mini_batch):
                total = max(float(nonempty[idx].sum()), 1.0)
                optimizer.zero_grad(set_to_none=True)
                summed: dict[str, float] = {}
                micros = idx.split(micro)
                for i, micro_idx in enumerate(micros):
                    with gradient_sync((policy, critic), sync=i == len(micros) - 1):  # ddp: one all-reduce
                        weight = float(nonempty[micro_idx].sum()) / total
                        # The micro-batch cut to its longest response: the columns after it are padding
                        # of every row, and causal attention keeps them out of the earlier positions.
                        width = max(int(response_mask[micro_idx].sum(-1).max()), 1)
                        mb = lambda t: t[micro_idx][:, :width]  # noqa: E731  (a per-token tensor, this micro-batch's)
                        mb_mask = mb(response_mask)
                        with autocast(amp, device):
                            logprobs, values, token_entropy = policy_forward(
                                lm, value_fn, input_ids[micro_idx][:, :P + width],
                                attention_mask[micro_idx][:, :P + width], mb(ro.response_ids), P, cfg.temperature,
                                cfg.logprob_chunk_size, with_entropy=True,
                                group_size=shared_micro if warming else shared_grad)
                        pg_loss, pg_stats = A.ppo_policy_loss(logprobs, mb(old_logprobs), mb(advantages), mb_mask,
                                                              cfg.clip)
                        loss = pg_loss.detach() * 0.0 if warming else pg_loss
                        if value_head is not None:
                            vf_loss, vf_stats = A.ppo_value_loss(values, mb(old_values), mb(returns), mb_mask,
                                                                 cfg.vf_clip)
                            loss = loss + cfg.vf_coef * vf_loss
                            pg_stats = {**pg_stats, **vf_stats, "vf_loss": vf_loss.detach()}
                        if cfg.kl_in_loss and not warming:
                            policy_kl = A.kl_penalty(logprobs, mb(ref_logprobs), cfg.kl_estimator)
                            kl_loss = A.sequence_mean(policy_kl, mb_mask)
                            loss = loss + kl_coef * kl_loss
                        if not torch.isfinite(loss):
                            run.fail("loss", loss.item(), step)
                        (loss * weight).backward()
                        entropy = A.masked_mean(token_entropy, mb_mask)
                        for k, v in {**pg_stats, "pg_loss": pg_loss.detach(), "entropy": entropy}.items():
                            summed[k] = summed.get(k, 0.0) + weight * scalar(v)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                for k, v in {**summed, "grad_norm": scalar(grad_norm)}.items():
                    stats.setdefault(k, []).append(v)

        # 7. Metrics of this iteration.
        n_rows = len(scored.graded)
        metrics = {
            "reft/score": float(scored.scores.mean()),
            "reft/accuracy": sum(g.correct for g in scored.graded) / n_rows,
            "reft/answered": sum(g.answer is not None for g in scored.graded) / n_rows,
            "reft/kl": mean_kl,
            "reft/response_length": float(response_mask.sum(-1).mean()),
            "reft/lr": optimizer.param_groups[0]["lr"],
            "reft/seconds": time.time() - t0,
            "reft/seconds_generate": t_gen,
            **{f"reft/{k}": sum(v) / len(v) for k, v in stats.items()},
            **{f"reft/reward/{k}": v for k, v in scored.reward_means.items()},
        }
        if value_head is not None:
            metrics["reft/value_explained_var"] = float(A.explained_variance(old_values, returns, response_mask))
        if ro.sampling_logprobs is not None and not from_engine:  # engines with their own numerics (vLLM): how far
            gap = (ro.sampling_logprobs.to(device) - old_logprobs).abs()
            metrics["reft/engine_logprob_gap"] = float(A.masked_mean(gap, response_mask))
        metrics = run.average(metrics)  # over processes: every one holds the same number of rows
        # 8. Engine sync, periodic evaluation + best policy, history, log, resumable checkpoint.
        run.end_step(step, metrics, postfix=dict(score=f"{metrics['reft/score']:.3f}", kl=f"{mean_kl:.3f}"))
    return run.finish(kl_coef=kl_coef)


class DetachedInput(torch.nn.Module):
    """A value head that trains on hidden states without sending gradient into the backbone."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.detach())


def shuffled_groups(rows: int, group: int) -> torch.Tensor:
    """A random order of `rows` row indices that keeps each group of `group` consecutive rows
    together and in order (group 1: a plain permutation)."""
    order = torch.randperm(rows // group)
    return (order[:, None] * group + torch.arange(group)).flatten()
