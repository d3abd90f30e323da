"""Online self-training (the paper's baseline): ReFT's loop and budget from the warm-up model, but
the update is supervised: cross-entropy on the model's own correct samples and on the gold CoTs
of the same questions, half and half. No value head, no reference model, no KL.

    loss = 0.5 * CE(own correct samples) + 0.5 * CE(gold CoTs of the step's questions)
    (only the gold term when no sample of the step is correct)

Each CE is a token mean over its part of the mini-batch (like SFT), so the two halves weigh the
same whatever their lengths and counts. Mini-batches hold whole questions (as ReFT's): a
question's gold CoT and its correct samples train together, identical CoTs form one row counted as
often as they occur (late in a run most correct samples equal the gold CoT), and each question's
prompt runs once for its rows.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, fields

import torch

from reftune.models import autocast
from reftune.options import Rewards
from reftune.tasks import Task
from reftune.trainers.loop import Callbacks, OnlineConfig, OnlineRun
from reftune.trainers.distributed import scalar
from reftune.trainers.rollout import build_rewards, sample_and_score, step_metrics
from reftune.batching import pad, pad_with_mask
from reftune.trainers.policy import forward_logits_values, shared_prompt_forward
from reftune.trainers.supervised import IGNORE, encode_task_example


@dataclass
class OnlineSTConfig(Rewards, OnlineConfig):
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
    samples, lr, sampling, eval, rewards...) taken from `reft_cfg`, ppo_epochs as update_epochs. A new
    object: `reft_cfg` is not changed."""
    shared = {f.name: copy.deepcopy(getattr(reft_cfg, f.name)) for f in fields(OnlineConfig) + fields(Rewards)}
    return OnlineSTConfig(**{**shared, "update_epochs": reft_cfg.ppo_epochs, **overrides})


@dataclass
class QuestionCE:
    """One question's cross-entropy rows: its gold CoT and its distinct correct samples, each once,
    with how many times each row counts in the gold term and in the own term (a sample equal to the
    gold CoT shares its row)."""

    id: str
    """Example id of the question."""
    prompt: list[int]
    """Prompt token ids (no loss on them)."""
    targets: list[list[int]]
    """Distinct CoT + EOS token ids, the gold CoT first."""
    gold_count: list[int]
    """Times each target counts in the gold CE: 1 for the gold CoT, 0 for the others."""
    own_count: list[int]
    """Times each target counts in the own CE: how many of the question's correct samples it is."""


def build_ce_batch(task: Task, scored, tokenizer, max_length: int) -> list[QuestionCE]:
    """Per distinct question of the step (in rollout order): its gold CoT and its own correct samples
    (graded correct by the task's grader, whatever the reward functions say), encoded like SFT data
    (prompt + full CoT + EOS, loss on the CoT and EOS) and merged where their tokens are equal.

    Samples are re-tokenised from their text (as SFT data would be), which the loss then teaches
    as the canonical tokenisation. Merging changes no loss: a row counted n times in a token-mean
    CE is n copies of it.
    """
    by_id: dict[str, QuestionCE] = {}
    for ex in scored.examples:
        if ex.id not in by_id:  # one gold CoT per question, whatever samples_per_prompt is
            prompt, target = _split_encoded(encode_task_example(tokenizer, task, ex, max_length))
            by_id[ex.id] = QuestionCE(ex.id, prompt, [target], [1], [0])
    for ex, text, graded in zip(scored.examples, scored.rollout.texts, scored.graded):
        if graded.correct:
            q = by_id[ex.id]
            _, target = _split_encoded(encode_task_example(tokenizer, task, ex, max_length,
                                                           task.completion_text(ex, text)))
            if target in q.targets:
                q.own_count[q.targets.index(target)] += 1
            else:
                q.targets.append(target)
                q.gold_count.append(0)
                q.own_count.append(1)
    return list(by_id.values())


def _split_encoded(encoded: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of `encode_sft_example` -> (prompt ids, target ids)."""
    ids, labels = encoded
    n_prompt = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
    return ids[:n_prompt], ids[n_prompt:]


def question_ce(model, questions: list[QuestionCE], pad_id: int, device, share_prompts: bool):
    """Token-mean cross-entropies (gold, own) of `questions`' rows weighted by their counts (0-dim
    tensors; own is None when no row counts in it), from one forward pass: each question's prompt
    once when `share_prompts` (policy.shared_prompt_forward), else prompt + CoT per row."""
    rows = [(i, target) for i, q in enumerate(questions) for target in q.targets]
    prompt_ids, prompt_mask = pad_with_mask([q.prompt for q in questions], pad_id, side="left")
    # At least one column: with max_length under the prompt's length every target is empty (loss 0).
    width = max(1, max(len(target) for _, target in rows))
    target_ids = pad([target for _, target in rows], pad_id, width=width)
    target_mask = pad([[1] * len(target) for _, target in rows], 0, width=width)
    prompt_index = torch.tensor([i for i, _ in rows])
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids[prompt_index], target_ids], 1).to(device)
    attention_mask = torch.cat([prompt_mask[prompt_index], target_mask], 1).to(device)
    target_ids, target_mask = target_ids.to(device), target_mask.to(device)
    if share_prompts:
        logits, _ = shared_prompt_forward(model, None, input_ids, attention_mask, target_ids, P,
                                          prompt_index=prompt_index.to(device))
    else:
        logits, _ = forward_logits_values(model, None, input_ids, attention_mask, P)
    labels = target_ids.masked_fill(target_mask == 0, IGNORE)
    token_ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE,
                                                 reduction="none")  # (rows, R), 0 on padding
    row_ce, row_tokens = token_ce.sum(-1), target_mask.sum(-1).to(token_ce.dtype)
    out = []
    for counts in ([c for q in questions for c in q.gold_count], [c for q in questions for c in q.own_count]):
        weight = torch.tensor(counts, dtype=token_ce.dtype, device=token_ce.device)
        out.append((weight * row_ce).sum() / (weight * row_tokens).sum().clamp(min=1) if sum(counts) else None)
    return out


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
    rewards = build_rewards(cfg, device, next(model.parameters()).dtype)  # scored and logged; the update keeps correct samples

    # 2. Optimizer (restored when resuming). No value head, no reference model.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.attach(optimizer)
    shuffle_rng = random.Random(cfg.seed)
    # Each question's prompt runs once for its rows, except where one forward per backward is needed
    # (DDP / FSDP gradient hooks) or the KV cache is off (gradient checkpointing).
    share_prompts = not run.dist.enabled and not cfg.gradient_checkpointing

    for step in run.steps():
        t0 = time.time()
        # 3. Rollout: sample this step's questions and grade the answers (ReFT's reward, for the logs).
        questions = run.questions(step)  # this process's share
        scored = sample_and_score(run.generator, run.task, questions, cfg.samples_per_prompt, cfg.temperature,
                                  cfg.top_p, cfg.max_new_tokens, rewards)
        t_gen = time.time() - t0

        # 4. Cross-entropy data: per question, its gold CoT and its distinct own correct samples.
        data = build_ce_batch(run.task, scored, tokenizer, cfg.max_length)
        n_own = sum(sum(q.own_count) for q in data)

        # 5. Update epochs: as many mini-batches as ReFT's PPO (but no more than there are questions),
        # each of whole questions (as ReFT's), so each question's prompt runs once for its rows.
        model.train()
        # (The same count on every process: the batch and mini_batch_size are global.)
        n_updates = max(1, min(math.ceil(len(scored.graded) * run.dist.world_size / cfg.mini_batch_size), len(data)))
        stats: dict[str, list[float]] = {}
        shuffle_rng.seed(cfg.seed * 100_003 + step)  # a function of the step: resume sees the same order
        for _ in range(cfg.update_epochs):
            order = list(data)
            shuffle_rng.shuffle(order)
            for part in split_even(order, n_updates):
                with autocast(amp, device):
                    gold_loss, own_loss = question_ce(run.train_model, part, tokenizer.pad_token_id, device,
                                                      share_prompts)
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
        metrics = step_metrics("online_st", scored, stats, own_examples=n_own,
                               ce_rows=sum(len(q.targets) for q in data), seconds=time.time() - t0,
                               seconds_generate=t_gen)
        metrics = run.average(metrics)  # over processes (each CE is a mean over its own share)
        run.logger.log_rollout(step + 1, scored, run.tokenizer)  # every log_samples_every steps: a table of CoTs
        # 7. Engine sync, periodic evaluation + best policy, history, log, resumable checkpoint.
        run.end_step(step, metrics, postfix=dict(score=f"{metrics['online_st/score']:.3f}", own=n_own))
    return run.finish()
