"""Supervised fine-tuning on (question, gold CoT): ReFT's warm-up stage and the SFT baseline.

One run gives both models the paper uses: the warm-up model is an early-epoch checkpoint of
the run, the SFT baseline its best epoch (chosen on the validation split, never on test).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune.tasks import DataConfig, Example, Task

IGNORE = -100  # label value that cross-entropy skips: prompt and padding positions


@dataclass
class SFTConfig:
    """`reftune sft`: fine-tune a causal LM on gold chains of thought."""

    model: str = ""
    """Base model: Hugging Face id or local folder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task and data files."""
    out_dir: str = "runs/sft"
    """Run folder: config, metrics, checkpoints."""
    epochs: int = 3
    """Passes over the training set (the paper: 40, warm-up = epoch 2)."""
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = batch_size * grad_accum)."""
    lr: float = 1e-5
    """Peak learning rate (the paper: 1e-5 for 7B models)."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up; linear decay to 0 after."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    max_length: int = 1024
    """Prompt + CoT tokens kept (longer examples are cut on the right)."""
    save_epochs: list[int] = field(default_factory=list)
    """Epochs to keep a checkpoint of (empty: every epoch)."""
    eval_split: str = "validation"
    """Split evaluated after each epoch to pick the best epoch (validation | test | none)."""
    eval_max_new_tokens: int = 256
    """Longest CoT generated in evaluation."""
    eval_batch_size: int = 64
    """Questions decoded at once in evaluation."""
    engine: str = "cached"
    """Generation engine for evaluation: cached | hf."""
    log_every: int = 10
    """Optimizer steps between metric records."""
    seed: int = 0
    """Seed for data order and initialisation of anything random."""
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


def encode_sft_example(tokenizer, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target + EOS and labels with the prompt masked out (IGNORE).

    The loss falls on the CoT and the EOS only, as in the paper; the model must learn to stop.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over labelled positions, and how many positions that was.

    Returning the sum (not the mean) lets gradient accumulation divide by the token count of the
    whole accumulated batch, so a micro-batch split never changes the loss.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((shift_labels != IGNORE).sum())


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak LR over `warmup_ratio` of the steps, then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_sft(cfg: SFTConfig, task: Task | None = None, train_examples: list[Example] | None = None) -> dict:
    """Train; returns {"checkpoints": {epoch: path}, "best_epoch", "best_checkpoint", "history"}.

    `train_examples` replaces the task's training split (Offline self-training passes gold CoTs
    plus the model's own correct samples).
    """
    from reftune.evaluate import evaluate
    from reftune.generation import make_generator
    from reftune.modeling import (atomic_save, autocast, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype,
                                   resolve_mixed_precision, save_hf)
    from reftune.tasks import load_task
    from reftune.tracking import RunLogger, progress, start_run, write_json

    # 1. Run folder, seed, task, model.
    device = resolve_device(cfg.device)
    amp = resolve_mixed_precision(cfg.mixed_precision, device)
    run_dir = start_run(cfg.out_dir, cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = task or load_task(cfg.data)
    examples = train_examples if train_examples is not None else task.train
    if not examples:
        raise ValueError(f"task {task.name}: the training split is empty")
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device, resolve_dtype(cfg.dtype, device))
    model.train()

    # 2. Tokenise once: (ids, labels) per example.
    data = [encode_sft_example(tokenizer, task.prompt(ex), task.target(ex), cfg.max_length) for ex in examples]

    # 3. Optimizer and schedule over the whole run (the warm-up model shares this schedule).
    steps_per_epoch = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    eval_examples = {"validation": task.validation, "test": task.test, "none": []}[cfg.eval_split]
    generator = make_generator(cfg.engine, model, tokenizer, cfg.eval_batch_size)

    logger = RunLogger(run_dir, cfg.tensorboard)
    order_rng = random.Random(cfg.seed)
    checkpoints, history = {}, []
    best_epoch, best_acc = None, -1.0
    step = 0
    bar = progress(total_steps, "sft", disable=not cfg.progress)
    start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        # 4. One epoch: shuffled micro-batches, token-weighted accumulation, clip, step.
        order = list(range(len(data)))
        order_rng.shuffle(order)
        micro = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        epoch_loss, epoch_tokens = 0.0, 0
        for group_start in range(0, len(micro), cfg.grad_accum):
            group = [collate([data[i] for i in idx], tokenizer.pad_token_id) for idx in micro[group_start:group_start + cfg.grad_accum]]
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
            loss_sum = 0.0
            for batch in group:
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(amp, device):
                    loss, _ = sft_loss(model, batch)
                (loss / max(n_tokens, 1)).backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"sft: loss is {loss_sum} at step {step + 1}; lower lr or check the data "
                                         f"(checkpoints saved so far are intact)")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr_used = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_loss, epoch_tokens = epoch_loss + loss_sum, epoch_tokens + n_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(n_tokens, 1):.3f}", epoch=epoch)
            if step % cfg.log_every == 0 or step == total_steps:
                logger.log(step, {"train/loss": loss_sum / max(n_tokens, 1), "train/grad_norm": float(grad_norm),
                                  "train/lr": lr_used, "train/epoch": epoch})

        # 5. End of epoch: evaluate, checkpoint, remember the best epoch.
        record = {"epoch": epoch, "train_loss": epoch_loss / max(epoch_tokens, 1), "elapsed": round(time.time() - start, 1)}
        if eval_examples:
            summary, _ = evaluate(generator, task, eval_examples, cfg.eval_max_new_tokens)
            record[f"{cfg.eval_split}_accuracy"] = summary["accuracy"]
            if summary["accuracy"] > best_acc:
                best_epoch, best_acc = epoch, summary["accuracy"]
        if not cfg.save_epochs or epoch in cfg.save_epochs or epoch == cfg.epochs:
            path = atomic_save(lambda d: save_hf(model, tokenizer, d), run_dir / "checkpoints" / f"epoch-{epoch}")
            checkpoints[epoch] = str(path)
        history.append(record)
        logger.log(step, {f"epoch/{k}": v for k, v in record.items()})
        bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  file=sys.stderr)
    bar.close()
    logger.close()

    # 6. The best epoch among the saved ones (validation accuracy; the last one without eval).
    saved = [e for e in checkpoints]
    if best_epoch not in checkpoints:
        scored = [(r.get(f"{cfg.eval_split}_accuracy", -1), r["epoch"]) for r in history if r["epoch"] in saved]
        best_epoch = max(scored)[1] if eval_examples else max(saved)
    result = {"checkpoints": checkpoints, "best_epoch": best_epoch, "best_checkpoint": checkpoints[best_epoch],
              "history": history, "seconds": round(time.time() - start, 1)}
    write_json(Path(run_dir) / "result.json", result)
    return result
