"""Online self-training (the paper's baseline): ReFT's loop and budget from the warm-up model, but
the update is supervised: cross-entropy on the model's own correct samples and on the gold CoTs
of the same questions, half and half. No value head, no reference model, no KL.

    loss = 0.5 * CE(own correct samples) + 0.5 * CE(gold CoTs of the step's questions)
    (only the gold term when no sample of the step is correct)

Each CE is a token mean over its part of the mini-batch (like SFT), so the two halves weigh the
same whatever their lengths and counts.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from reftune.tasks import DataConfig, Task


@dataclass
class OnlineSTConfig:
    """`reftune online-st`: ReFT's sampling loop with a cross-entropy update (own correct + gold)."""

    model: str = ""
    """Warm-up SFT checkpoint to start from."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task: the same training questions as the warm-up SFT."""
    out_dir: str = "runs/online_st"
    """Run folder: config, metrics, checkpoints."""
    steps: int = 100
    """Iterations (each: one rollout batch, then update_epochs of updates); ReFT's budget: its `steps`."""
    questions_per_step: int = 32
    """Training questions sampled per iteration (as ReFT)."""
    samples_per_prompt: int = 1
    """CoTs sampled per question (as ReFT)."""
    mini_batch_size: int = 8
    """Sets the updates per epoch as in ReFT's PPO: rollout rows / mini_batch_size (capped at the gold CoTs)."""
    update_epochs: int = 2
    """Passes over each step's data (ReFT's ppo_epochs)."""
    lr: float = 3e-7
    """AdamW learning rate, constant (as ReFT)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    own_weight: float = 0.5
    """Weight of the own-samples CE; the gold CE gets 1 - own_weight (the paper: half and half)."""
    max_length: int = 1024
    """Prompt + CoT tokens kept in the cross-entropy."""
    temperature: float = 1.0
    """Sampling temperature for rollouts."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts (1: off)."""
    max_new_tokens: int = 400
    """Longest sampled CoT."""
    eval_every: int = 10
    """Iterations between greedy evaluations (0: only at the end)."""
    eval_split: str = "validation"
    """Split for periodic evaluation and best-checkpoint selection: validation | test."""
    eval_max_new_tokens: int = 400
    """Longest CoT in evaluation."""
    save_every: int = 10
    """Iterations between resumable checkpoints (0: only at the end)."""
    engine: str = "cached"
    """Generation engine: cached | hf."""
    gen_batch_size: int = 64
    """Sequences decoded at once."""
    seed: int = 0
    """Seed for question order and sampling."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"""
    mixed_precision: str = "no"
    """Forward passes under bf16 autocast, weights and optimizer in fp32: no | bf16 | auto (where bf16 is native)."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    progress: bool = True
    """Show a progress bar."""


def online_st_config_from_reft(reft_cfg, **overrides) -> OnlineSTConfig:
    """An OnlineSTConfig with ReFT's budget: every field the two configs share copied from
    `reft_cfg` (steps, questions, samples, lr, sampling, eval...), ppo_epochs as update_epochs."""
    import copy

    own = {f.name for f in fields(OnlineSTConfig)}
    shared = {f.name: copy.deepcopy(getattr(reft_cfg, f.name)) for f in fields(reft_cfg) if f.name in own}
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
    from reftune.sft import encode_sft_example

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


def token_mean_ce(model, parts: list[list[tuple[list[int], list[int]]]], pad_id: int, device) -> list[torch.Tensor | None]:
    """Token-mean cross-entropy of each list of encoded examples (0-dim tensors; None for an empty
    list), from ONE forward pass over all of them: one batched call instead of one per list."""
    from reftune.sft import IGNORE, collate

    encoded = [e for part in parts for e in part]
    batch = {k: v.to(device) for k, v in collate(encoded, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    token_ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE,
                                                 reduction="none")  # (B, L-1), 0 where IGNORE
    row_sum, row_tokens = token_ce.sum(-1), (labels != IGNORE).sum(-1)
    out, start = [], 0
    for part in parts:
        end = start + len(part)
        out.append(row_sum[start:end].sum() / row_tokens[start:end].sum().clamp(min=1) if part else None)
        start = end
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


def run_online_st(cfg: OnlineSTConfig, resume: bool = False, task: Task | None = None) -> dict:
    """Train; returns {"best_checkpoint", "best_accuracy", "last_checkpoint", "history"}."""
    from reftune.evaluate import evaluate
    from reftune.generation import make_generator
    from reftune.modeling import autocast, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype, resolve_mixed_precision
    from reftune.rollout import (load_latest, rng_state, sample_and_score, save_best, save_rl_checkpoint, set_rng_state,
                                 step_questions)
    from reftune.tasks import load_task
    from reftune.tracking import RunLogger, progress, start_run, write_json

    # 1. Run folder, task, seeds.
    if cfg.eval_split not in ("validation", "test"):
        raise ValueError(f"eval_split must be validation or test, got {cfg.eval_split!r}")
    if not 0.0 <= cfg.own_weight <= 1.0:
        raise ValueError(f"own_weight must be in [0, 1], got {cfg.own_weight}")
    device = resolve_device(cfg.device)
    amp = resolve_mixed_precision(cfg.mixed_precision, device)
    run_dir = start_run(cfg.out_dir, cfg, resume=resume)
    task = task or load_task(cfg.data)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # 2. Policy (warm-up model, or the last checkpoint when resuming), optimizer, generator.
    latest = load_latest(run_dir) if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint there (latest.json missing)")
    policy_path = str(latest[0] / "policy") if latest else cfg.model
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, device, resolve_dtype(cfg.dtype, device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed)
    start_step, best_acc, history = 0, -1.0, []
    if latest:
        _, state = latest
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        start_step, best_acc, history = state["step"], state["best_accuracy"], state["history"]
    logger = RunLogger(run_dir, cfg.tensorboard)
    logger.truncate_after(start_step)
    eval_examples = task.validation if cfg.eval_split == "validation" else task.test
    shuffle_rng = random.Random(cfg.seed)

    bar = progress(cfg.steps, "online-st", disable=not cfg.progress)
    bar.update(start_step)
    for step in range(start_step, cfg.steps):
        t0 = time.time()
        # 3. Rollout: sample this step's questions and grade the answers (ReFT's reward, for the logs).
        questions = step_questions(task.train, step, cfg.questions_per_step, cfg.seed)
        scored = sample_and_score(generator, task, questions, cfg.samples_per_prompt, cfg.temperature, cfg.top_p,
                                  cfg.max_new_tokens, dict(correct=1.0, wrong=0.1, none=0.0))
        t_gen = time.time() - t0

        # 4. Cross-entropy data: own correct samples and the gold CoTs of the same questions.
        data = build_ce_batch(task, scored, tokenizer, cfg.max_length)

        # 5. Update epochs: as many mini-batches as ReFT's PPO (but no more than there are gold CoTs,
        # so every mini-batch has its gold half), each mixing an even share of both halves.
        model.train()
        n_updates = max(1, min(math.ceil(len(scored.graded) / cfg.mini_batch_size), len(data.gold)))
        stats: dict[str, list[float]] = {}
        shuffle_rng.seed(cfg.seed * 100_003 + step)  # a function of the step: resume sees the same order
        for _ in range(cfg.update_epochs):
            own, gold = list(data.own), list(data.gold)
            shuffle_rng.shuffle(own)
            shuffle_rng.shuffle(gold)
            for own_part, gold_part in zip(split_even(own, n_updates), split_even(gold, n_updates)):
                with autocast(amp, device):
                    gold_loss, own_loss = token_mean_ce(model, [gold_part, own_part], tokenizer.pad_token_id, device)
                if own_loss is None:
                    loss = gold_loss  # nothing correct in this share: only the gold term
                else:
                    loss = cfg.own_weight * own_loss + (1 - cfg.own_weight) * gold_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"online-st: loss is {loss.item()} at step {step}; "
                                             f"last good checkpoint: {run_dir / 'latest.json'}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                parts = {"loss": loss, "grad_norm": grad_norm, "loss_gold": gold_loss, "loss_own": own_loss}
                for k, v in parts.items():
                    if v is not None:
                        stats.setdefault(k, []).append(float(v.detach()))

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
        done = step + 1
        # 7. Periodic greedy evaluation; keep the best policy by validation accuracy.
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            summary, _ = evaluate(generator, task, eval_examples, cfg.eval_max_new_tokens)
            metrics[f"eval/{cfg.eval_split}_accuracy"] = summary["accuracy"]
            if summary["accuracy"] > best_acc:
                best_acc = summary["accuracy"]
                save_best(run_dir, model, tokenizer, None, {"step": done, f"{cfg.eval_split}_accuracy": best_acc})
        history.append({"step": done, **{k: v for k, v in metrics.items() if "seconds" not in k}})
        logger.log(done, metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['online_st/score']:.3f}", own=len(data.own))
        # 8. Resumable checkpoint (atomic; latest.json always names a complete one).
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            state = {"step": done, "optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                     "best_accuracy": best_acc, "history": history}
            save_rl_checkpoint(run_dir, done, model, tokenizer, None, state)
    bar.close()
    logger.close()
    result = {
        "best_checkpoint": str(run_dir / "checkpoints" / "best" / "policy"),
        "best_accuracy": best_acc,
        "last_checkpoint": str(run_dir / (load_latest(run_dir)[0].relative_to(run_dir)) / "policy"),
        "history": history,
    }
    write_json(Path(run_dir) / "result.json", result)
    return result
