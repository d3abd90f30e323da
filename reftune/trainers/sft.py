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
from typing import ClassVar

import torch

from reftune.models import autocast, save_hf
from reftune.options import Decoding, Evaluation, Optimizer, Schedule
from reftune.validate import Checks
from reftune.runs import atomic_save, progress, write_json
from reftune.tasks import Example, Task
from reftune.trainers.checkpoints import restore_sft_state, rng_state, save_sft_state
from reftune.trainers.distributed import Dist, copy_into, full_state_dict, optimizer_state, scalar
from reftune.trainers.lora import adapter_state, is_peft, merged_state_dict
from reftune.trainers.loop import RunConfig, evaluate_split, open_run
from reftune.trainers.supervised import IGNORE, collate, encode_task_example, linear_schedule, sft_loss, shuffled_batches

@dataclass
class SFTConfig(Evaluation, Decoding, Schedule, Optimizer, RunConfig):
    """`reftune sft`: fine-tune a causal LM on gold chains of thought."""

    out_dir: str = "runs/sft"
    epochs: int = 3
    """Passes over the training set (the paper: 40, warm-up = epoch 2)."""
    batch_size: int = 32
    """Training sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = batch_size * grad_accum)."""
    max_length: int = 1024
    """Prompt + CoT tokens kept (longer examples are cut on the right)."""
    save_epochs: list[int] = field(default_factory=list)
    """Epochs to keep a checkpoint of (empty: every epoch)."""
    log_every: int = 10
    """Optimizer steps between metric records."""

    # `batch_size` is SFT's own training batch here, not the decoding batch Decoding renames.
    renamed: ClassVar[dict[str, str]] = {"eval_batch_size": "gen_batch_size"}

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.int("epochs", 1).int("batch_size", 1).int("grad_accum", 1).int("max_length", 2).int("log_every", 1)
        if not isinstance(self.save_epochs, list) or any(
                not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= self.epochs for e in self.save_epochs):
            c.fail("save_epochs", f"must be a list of epochs between 1 and epochs={self.epochs} (empty: every epoch)")


def run_sft(cfg: SFTConfig, task: Task | None = None, train_examples: list[Example] | None = None,
            resume: bool = False, overwrite: bool = False) -> dict:
    """Train; returns {"checkpoints": {epoch: path}, "best_epoch", "best_checkpoint", "history"}.

    `train_examples` replaces the task's training split (Offline self-training passes gold CoTs
    plus the model's own correct samples). `resume` continues at the last complete epoch with the
    data order, LR schedule, optimizer and RNG state the uninterrupted run would have had (saved
    after every epoch in `resume/`).
    """
    # 1. Config and task checked, run folder, seeds, model, evaluation engine.
    def check_task(task: Task) -> None:
        if not (train_examples if train_examples is not None else task.train):
            raise ValueError(f"task {task.name}: the training split is empty")

    run = open_run(cfg, task=task, engine=cfg.engine, gen_batch_size=cfg.gen_batch_size, check_task=check_task,
                   resume=resume, overwrite=overwrite, command="sft")
    task, model, tokenizer, device, amp, run_dir = run.task, run.model, run.tokenizer, run.device, run.amp, run.run_dir
    examples = train_examples if train_examples is not None else task.train
    dist, train_model = run.dist, run.train_model  # train_model: `model`, or its data-parallel wrapper
    model.train()

    # 2. Tokenise once: (ids, labels) per example.
    data = [encode_task_example(tokenizer, task, ex, cfg.max_length) for ex in examples]

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
    step, first_epoch = 0, 1
    if run.latest:  # the state after the last complete epoch: continue exactly where it stopped
        first_epoch, step, best_epoch, best_acc, checkpoints, history = restore_sft_state(
            run.latest[1], model, optimizer, scheduler, order_rng, run.generator, dist)
    logger.truncate_after(step)
    bar = progress(total_steps, "sft", disable=not cfg.progress or not dist.is_main)
    bar.update(step)
    start = time.time()
    for epoch in range(first_epoch, cfg.epochs + 1):
        # 4. One epoch: shuffled micro-batches, token-weighted accumulation, clip, step.
        micro = shuffled_batches(len(data), cfg.batch_size, order_rng)
        epoch_loss, epoch_tokens = 0.0, 0
        for group_start in range(0, len(micro), cfg.grad_accum):
            indices = micro[group_start:group_start + cfg.grad_accum]
            # The token count of the whole accumulated batch (every rank holds all the data), so each
            # rank's share divides by the same number and the ranks' gradients average to one batch's.
            n_tokens = sum(int((collate([data[i] for i in idx], tokenizer.pad_token_id)["labels"][:, 1:] != IGNORE).sum())
                           for idx in indices) if dist.enabled else None
            group = [collate([data[i] for i in rows], tokenizer.pad_token_id)
                     for rows in (share_rows(idx, dist) for idx in indices)]
            if n_tokens is None:
                n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
            loss_sum = 0.0
            for batch, idx in zip(group, indices):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(amp, device):
                    loss, _ = sft_loss(train_model, batch)
                if dist.enabled and not dist.uneven_slice(idx):  # no row for this rank: a zero-weight stand-in
                    loss = loss * 0.0
                (loss * dist.world_size / max(n_tokens, 1)).backward()
                loss_sum += loss.item()
            loss_sum = dist.sum_floats(loss_sum)[0]
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
                logger.log(step, {"train/loss": loss_sum / max(n_tokens, 1), "train/grad_norm": scalar(grad_norm),
                                  "train/lr": lr_used, "train/epoch": epoch})

        # 5. End of epoch: evaluate, checkpoint, remember the best epoch.
        record = {"epoch": epoch, "train_loss": epoch_loss / max(epoch_tokens, 1), "elapsed": round(time.time() - start, 1)}
        if dist.sharded:
            copy_into(run.rollout_model, train_model, dist)
        run.generator.sync_weights()  # engines with their own copy of the weights evaluate this epoch's
        if eval_examples:
            accuracy = evaluate_split(run.generator, task, eval_examples, cfg.eval_max_new_tokens, dist)
            record[f"{cfg.eval_split}_accuracy"] = accuracy
            if accuracy > best_acc:
                best_epoch, best_acc = epoch, accuracy
        # A collective under fsdp2; with LoRA the merged weights, so every epoch folder is a plain model.
        policy_state = merged_state_dict(model, device="cpu") if is_peft(model) else full_state_dict(model, dist) if dist.sharded else None
        if not cfg.save_epochs or epoch in cfg.save_epochs or epoch == cfg.epochs:
            path = run_dir / "checkpoints" / f"epoch-{epoch}"
            if dist.is_main:
                atomic_save(lambda d: save_hf(model, tokenizer, d, policy_state), path)
            checkpoints[epoch] = str(path)
        history.append(record)
        logger.log(step, {f"epoch/{k}": v for k, v in record.items()})
        # The resume state: AdamW's (gathered under fsdp2: a collective), every rank's RNG, a LoRA adapter.
        optim, rngs = optimizer_state(model, optimizer, dist), dist.gather(rng_state(run.generator))
        if dist.is_main:
            save_sft_state(run_dir, model, tokenizer, epoch=epoch, step=step, optimizer_state=optim,
                           scheduler=scheduler, order_rng=order_rng, rngs=rngs, history=history,
                           checkpoints=checkpoints, best_epoch=best_epoch, best_acc=best_acc,
                           policy_state=policy_state, adapter=adapter_state(model) if is_peft(model) else None)
        dist.barrier()
        if dist.is_main:
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
    if dist.is_main:
        write_json(run_dir / "result.json", result)
        run.folder.release()
    dist.barrier()
    return result


def share_rows(batch: list[int], dist: Dist) -> list[int]:
    """This rank's rows of a micro-batch; a rank left without any (a last batch smaller than the
    world) runs the first row as a zero-weight stand-in, since every rank must take part in backward."""
    return dist.uneven_slice(batch) or batch[:1]
