"""Online self-training (the paper's baseline): ReFT's loop and budget from the warm-up model, but
the update is supervised: cross-entropy on the model's own correct samples and on the gold CoTs
of the same questions, half and half. No value head, no reference model, no KL.

    loss = 0.5 * CE(own correct samples) + 0.5 * CE(gold CoTs of the step's questions)
    (only the gold term when no sample of the step is correct)

Each CE is a token mean over its part of the mini-batch (like SFT), so the two halves weigh the
same whatever their lengths and counts.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, fields

import torch

from reftune.models import autocast
from reftune.rewards.score import RewardSpec
from reftune.tasks import Task
from reftune.trainers.loop import Callbacks, OnlineConfig, OnlineRun
from reftune.trainers.distributed import scalar
from reftune.trainers.rollout import sample_and_score
from reftune.trainers.supervised import encode_sft_example, token_mean_ce


@dataclass
class OnlineSTConfig(OnlineConfig):
    """`reftune online-st`: ReFT's sampling loop with a cross-entropy update (own correct + gold)."""

    model: str = ""
    """Warm-up SFT checkpoint to start from."""
    out_dir: str = "runs/online_st"
    """Run folder: config, metrics, checkpoints."""
    update_epochs: int = 2
    """Passes over each step's data (ReFT's ppo_epochs)."""
    own_weight: float = 0.5
    """Weight of the own-samples CE; the gold CE gets 1 - own_weight (the paper: half and half)."""
    max_length: int = 1024
    """Prompt + CoT tokens kept in the cross-entropy."""

    def validate(self, prefix: str = "") -> None:
        from reftune.validate import Checks

        super().validate(prefix)
        Checks(self, prefix).int("update_epochs", 1).float("own_weight", 0.0, 1.0).int("max_length", 2)


def online_st_config_from_reft(reft_cfg, **overrides) -> OnlineSTConfig:
    """An OnlineSTConfig with ReFT's budget: every field of the shared base (steps, questions,
    samples, lr, sampling, eval...) taken from `reft_cfg`, ppo_epochs as update_epochs. A new
    object: `reft_cfg` is not changed."""
    shared = {f.name: copy.deepcopy(getattr(reft_cfg, f.name)) for f in fields(OnlineConfig)}
    return OnlineSTConfig(**{**shared, "update_epochs": reft_cfg.ppo_epochs, **overrides})


@dataclass
class CEBatch:
    """The cross-entropy data of one step, encoded as (ids, labels) pairs (labels IGNORE on prompts)."""

    own: list[tuple[list[int], list[int]]]
    """The model's own correct samples."""
    own_rows: list[int]
    """Rollout row of each own sample."""
    gold: list[tuple[list[int], list[int]]]
    """The gold CoT of each distinct question of the step."""
    gold_ids: list[str]
    """Example id of each gold CoT."""


def build_ce_batch(task: Task, scored, tokenizer, max_length: int) -> CEBatch:
    """Own correct samples (graded correct, i.e. reward == score_correct) and the gold CoTs of the
    step's questions, encoded like SFT data: prompt + full CoT + EOS, loss on the CoT and EOS.

    Samples are re-tokenised from their text (as SFT data would be), which the loss then teaches
    as the canonical tokenisation.
    """
    own, own_rows = [], []
    for row, (ex, text, graded) in enumerate(zip(scored.examples, scored.rollout.texts, scored.graded)):
        if graded.correct:
            own.append(encode_sft_example(tokenizer, task.prompt(ex), task.completion_text(ex, text), max_length))
            own_rows.append(row)
    gold, gold_ids = [], []
    for ex in scored.examples:
        if ex.id not in gold_ids:  # one gold CoT per question, whatever samples_per_prompt is
            gold.append(encode_sft_example(tokenizer, task.prompt(ex), task.target(ex), max_length))
            gold_ids.append(ex.id)
    return CEBatch(own, own_rows, gold, gold_ids)


def split_even(items: list, parts: int) -> list[list]:
    """`items` in `parts` consecutive chunks whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), parts)
    out, at = [], 0
    for i in range(parts):
        n = size + (i < extra)
        out.append(items[at:at + n])
        at += n
    return out


def run_online_st(cfg: OnlineSTConfig, resume: bool = False, task: Task | None = None,
                  callbacks: Callbacks | None = None, overwrite: bool = False) -> dict:
    """Train; returns {"best_checkpoint", "best_accuracy", "last_checkpoint", "history"}."""
    # 1. Config checked, run folder, task, seeds, policy (warm-up model or last checkpoint), engine.
    run = OnlineRun(cfg, "online-st", resume=resume, task=task, callbacks=callbacks, overwrite=overwrite)
    model, tokenizer, device, amp = run.model, run.tokenizer, run.device, run.amp

    # 2. Optimizer (restored when resuming). No value head, no reference model.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.attach(optimizer)
    shuffle_rng = random.Random(cfg.seed)

    for step in run.steps():
        t0 = time.time()
        # 3. Rollout: sample this step's questions and grade the answers (ReFT's reward, for the logs).
        questions = run.questions(step)  # this process's share
        scored = sample_and_score(run.generator, run.task, questions, cfg.samples_per_prompt, cfg.temperature,
                                  cfg.top_p, cfg.max_new_tokens, RewardSpec())
        t_gen = time.time() - t0

        # 4. Cross-entropy data: own correct samples and the gold CoTs of the same questions.
        data = build_ce_batch(run.task, scored, tokenizer, cfg.max_length)

        # 5. Update epochs: as many mini-batches as ReFT's PPO (but no more than there are gold CoTs,
        # so every mini-batch has its gold half), each mixing an even share of both halves.
        model.train()
        # (The same count on every process: the batch and mini_batch_size are global.)
        n_updates = max(1, min(math.ceil(len(scored.graded) * run.dist.world_size / cfg.mini_batch_size), len(data.gold)))
        stats: dict[str, list[float]] = {}
        shuffle_rng.seed(cfg.seed * 100_003 + step)  # a function of the step: resume sees the same order
        for _ in range(cfg.update_epochs):
            own, gold = list(data.own), list(data.gold)
            shuffle_rng.shuffle(own)
            shuffle_rng.shuffle(gold)
            for own_part, gold_part in zip(split_even(own, n_updates), split_even(gold, n_updates)):
                with autocast(amp, device):
                    gold_loss, own_loss = token_mean_ce(run.train_model, [gold_part, own_part], tokenizer.pad_token_id, device)
                if own_loss is None:
                    loss = gold_loss  # nothing correct in this share: only the gold term
                else:
                    loss = cfg.own_weight * own_loss + (1 - cfg.own_weight) * gold_loss
                if not torch.isfinite(loss):
                    run.fail("loss", loss.item(), step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                parts = {"loss": loss, "grad_norm": grad_norm, "loss_gold": gold_loss, "loss_own": own_loss}
                for k, v in parts.items():
                    if v is not None:
                        stats.setdefault(k, []).append(scalar(v.detach()))

        # 6. Metrics of this iteration (score and response length comparable with ReFT's).
        n_rows = len(scored.graded)
        metrics = {
            "online_st/score": float(scored.scores.mean()),
            "online_st/accuracy": sum(g.correct for g in scored.graded) / n_rows,
            "online_st/answered": sum(g.answer is not None for g in scored.graded) / n_rows,
            "online_st/own_examples": len(data.own),
            "online_st/response_length": float(scored.rollout.response_mask.sum(-1).float().mean()),
            "online_st/seconds": time.time() - t0,
            "online_st/seconds_generate": t_gen,
            **{f"online_st/{k}": sum(v) / len(v) for k, v in stats.items()},
        }
        metrics = run.average(metrics)  # over processes (each CE is a mean over its own share)
        # 7. Engine sync, periodic evaluation + best policy, history, log, resumable checkpoint.
        run.end_step(step, metrics, postfix=dict(score=f"{metrics['online_st/score']:.3f}", own=len(data.own)))
    return run.finish()
