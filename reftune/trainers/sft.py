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

import torch

from reftune.engines import check_engine
from reftune.inference.evaluate import evaluate
from reftune.models import autocast, save_hf
from reftune.runs import atomic_save, progress, write_json
from reftune.tasks import Example, Task
from reftune.trainers.loop import RunConfig, open_run
from reftune.trainers.supervised import IGNORE, collate, encode_sft_example, linear_schedule, sft_loss, shuffled_batches

SFT_EVAL_SPLITS = ("validation", "test", "none")


@dataclass
class SFTConfig(RunConfig):
    """`reftune sft`: fine-tune a causal LM on gold chains of thought."""

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
    """Generation engine for evaluation (reftune.engines.ENGINES)."""
    log_every: int = 10
    """Optimizer steps between metric records."""

    def validate(self) -> None:
        super().validate()
        if self.eval_split not in SFT_EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {', '.join(SFT_EVAL_SPLITS)}, got {self.eval_split!r}")
        check_engine(self.engine)


def run_sft(cfg: SFTConfig, task: Task | None = None, train_examples: list[Example] | None = None) -> dict:
    """Train; returns {"checkpoints": {epoch: path}, "best_epoch", "best_checkpoint", "history"}.

    `train_examples` replaces the task's training split (Offline self-training passes gold CoTs
    plus the model's own correct samples).
    """
    # 1. Config and task checked, run folder, seeds, model, evaluation engine.
    def check_task(task: Task) -> None:
        if not (train_examples if train_examples is not None else task.train):
            raise ValueError(f"task {task.name}: the training split is empty")

    run = open_run(cfg, task=task, engine=cfg.engine, gen_batch_size=cfg.eval_batch_size, check_task=check_task)
    task, model, tokenizer, device, amp, run_dir = run.task, run.model, run.tokenizer, run.device, run.amp, run.run_dir
    examples = train_examples if train_examples is not None else task.train
    model.train()

    # 2. Tokenise once: (ids, labels) per example.
    data = [encode_sft_example(tokenizer, task.prompt(ex), task.target(ex), cfg.max_length) for ex in examples]

    # 3. Optimizer and schedule over the whole run (the warm-up model shares this schedule).
    steps_per_epoch = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    eval_examples = {"validation": task.validation, "test": task.test, "none": []}[cfg.eval_split]
    logger = run.logger
    order_rng = random.Random(cfg.seed)
    checkpoints, history = {}, []
    best_epoch, best_acc = None, -1.0
    step = 0
    bar = progress(total_steps, "sft", disable=not cfg.progress)
    start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        # 4. One epoch: shuffled micro-batches, token-weighted accumulation, clip, step.
        micro = shuffled_batches(len(data), cfg.batch_size, order_rng)
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
        run.generator.sync_weights()  # engines with their own copy of the weights evaluate this epoch's
        if eval_examples:
            summary, _ = evaluate(run.generator, task, eval_examples, cfg.eval_max_new_tokens)
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
    write_json(run_dir / "result.json", result)
    return result
