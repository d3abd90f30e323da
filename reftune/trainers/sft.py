"""Supervised fine-tuning on (question, gold CoT): ReFT's warm-up stage and the SFT baseline.

One run gives both models the paper uses: the warm-up model is an early-epoch checkpoint of
the run, the SFT baseline its best epoch (chosen on the validation split, never on test).
The run folder, resume, evaluation, checkpoints and distribution are the shared loop's
(trainers/loop.py); `SFTRun` adds the epochs it keeps and the best one.
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
from reftune.runs import atomic_save
from reftune.tasks import Example, Task
from reftune.trainers.checkpoints import RESUME_DIR
from reftune.trainers.loop import Callbacks, PolicyRun, RunConfig
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
            resume: bool = False, overwrite: bool = False, callbacks: Callbacks | None = None) -> dict:
    """Train; returns {"checkpoints": {epoch: path}, "best_epoch", "best_checkpoint", "history"}.

    `train_examples` replaces the task's training split (Offline self-training passes gold CoTs
    plus the model's own correct samples). `resume` continues at the last complete epoch with the
    data order, LR schedule, optimizer and RNG state the uninterrupted run would have had (saved
    after every epoch in `resume/`). `callbacks.on_step_end` is called after each epoch's checkpoint.
    """
    # 1. Config and task checked, run folder, seeds, model, evaluation engine.
    def check_task(task: Task) -> None:
        if not (train_examples if train_examples is not None else task.train):
            raise ValueError(f"task {task.name}: the training split is empty")

    with SFTRun(cfg, task=task, check_task=check_task, resume=resume, overwrite=overwrite, callbacks=callbacks) as run:
        run.model.train()

        # 2. Tokenise once: (ids, labels) per example.
        examples = train_examples if train_examples is not None else run.task.train
        data = [encode_task_example(run.tokenizer, run.task, ex, cfg.max_length) for ex in examples]

        # 3. Optimizer and schedule over the whole run (the warm-up model shares this schedule); when
        # resuming, they, the data order and the RNGs continue where the last complete epoch left them.
        steps_per_epoch = math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
        optimizer = torch.optim.AdamW(run.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = linear_schedule(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_ratio)
        run.attach(optimizer, scheduler=scheduler, order_rng=random.Random(cfg.seed))
        start = time.time()
        for epoch in run.epochs(cfg.epochs, steps_per_epoch):
            # 4. One epoch: shuffled micro-batches, token-weighted accumulation, clip, step.
            loss, tokens = train_epoch(run, data, epoch)
            # 5. End of epoch: evaluate, keep the epoch's checkpoint, remember the best epoch, resume state.
            run.end_epoch(epoch, {"epoch": epoch, "train_loss": loss / max(tokens, 1),
                                  "elapsed": round(time.time() - start, 1)})
        # 6. The best epoch among the kept ones (validation accuracy; the last one without eval).
        return run.finish(seconds=round(time.time() - start, 1))


def train_epoch(run: SFTRun, data: list[tuple[list[int], list[int]]], epoch: int) -> tuple[float, int]:
    """One pass over `data` in the run's shuffled order: each optimizer step accumulates
    `grad_accum` micro-batches. Returns (summed token loss, labelled tokens) of the epoch."""
    cfg = run.cfg
    micro = shuffled_batches(len(data), cfg.batch_size, run.order_rng)
    epoch_loss, epoch_tokens = 0.0, 0
    for group_start in range(0, len(micro), cfg.grad_accum):
        loss_sum, n_tokens = accumulate(run, data, micro[group_start:group_start + cfg.grad_accum])
        grad_norm, lr_used = run.optimizer_step(loss_sum, run.model.parameters())
        epoch_loss, epoch_tokens = epoch_loss + loss_sum, epoch_tokens + n_tokens
        run.set_postfix(loss=f"{loss_sum / max(n_tokens, 1):.3f}", epoch=epoch)
        if run.step % cfg.log_every == 0 or run.step == run.total_steps:
            run.logger.log(run.step, {"train/loss": loss_sum / max(n_tokens, 1), "train/grad_norm": grad_norm,
                                      "train/lr": lr_used, "train/epoch": epoch})
    return epoch_loss, epoch_tokens


def accumulate(run: SFTRun, data: list, indices: list[list[int]]) -> tuple[float, int]:
    """Forwards and backwards of one optimizer step's micro-batches (`indices`: rows of each), each
    process taking its share of every micro-batch. The token-summed loss is divided by the token
    count of the whole accumulated batch, so a split never changes the update. Returns (the loss
    summed over micro-batches and processes, that token count)."""
    pad_id, dist = run.tokenizer.pad_token_id, run.dist
    # The token count of the whole accumulated batch (every rank holds all the data), so each
    # rank's share divides by the same number and the ranks' gradients average to one batch's.
    n_tokens = sum(labelled(collate([data[i] for i in idx], pad_id)) for idx in indices) if dist.enabled else None
    shares = [run.share(idx) for idx in indices]
    group = [collate([data[i] for i in rows], pad_id) for rows, _ in shares]
    if n_tokens is None:
        n_tokens = sum(labelled(b) for b in group)
    loss_sum = 0.0
    for batch, (_, stand_in) in zip(group, shares):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with autocast(run.amp, run.device):
            loss, _ = sft_loss(run.train_model, batch)
        if stand_in:  # no row for this rank: a zero-weight stand-in
            loss = loss * 0.0
        (loss * dist.world_size / max(n_tokens, 1)).backward()
        loss_sum += loss.item()
    return dist.sum_floats(loss_sum)[0], n_tokens


def labelled(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a collated batch whose next token is trained on."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class SFTRun(PolicyRun):
    """SFT's run: the shared loop counted in epochs (loop.py). After every epoch it evaluates on
    `eval_split`, keeps the epoch as an HF folder `checkpoints/epoch-N` when `save_epochs` names it
    (or it is the last), and writes the resume state; the best epoch is the best kept one."""

    unit = "epoch"

    def __init__(self, cfg: SFTConfig, **options):
        super().__init__(cfg, "sft", **options)
        self.checkpoints: dict[int, str] = {}  # the kept epochs' HF folders
        self.best_epoch: int | None = None

    def restore_own(self, state: dict) -> None:
        self.checkpoints = {int(k): v for k, v in state["checkpoints"].items()}
        self.best_epoch = state["best_epoch"]

    def end_epoch(self, epoch: int, record: dict) -> None:
        """Engine sync, evaluation (best epoch), the kept epoch's folder, history, log, resume state."""
        cfg, dist = self.cfg, self.dist
        self.sync_weights()  # engines with their own copy of the weights evaluate this epoch's
        if self.eval_examples:
            accuracy = self.evaluate()
            record[f"{cfg.eval_split}_accuracy"] = accuracy
            if accuracy > self.best_accuracy:
                self.best_epoch, self.best_accuracy = epoch, accuracy
        states = self.weights()  # (a collective under fsdp2)
        kept = None
        if not cfg.save_epochs or epoch in cfg.save_epochs or epoch == cfg.epochs:
            kept = self.run_dir / "checkpoints" / f"epoch-{epoch}"
            if dist.is_main:
                atomic_save(lambda d: save_hf(self.model, self.tokenizer, d, states[0]), kept)
            self.checkpoints[epoch] = str(kept)
        self.epoch = epoch
        self.history.append(record)
        self.logger.log(self.step, {f"epoch/{k}": v for k, v in record.items()})
        # The resume state's weights are hard links to the kept epoch's files.
        self.save_checkpoint(RESUME_DIR, states=states, policy_from=kept,
                             own={"checkpoints": dict(self.checkpoints), "best_epoch": self.best_epoch})
        if dist.is_main:
            self._bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                            file=sys.stderr)
        if self.callbacks.on_step_end:
            self.callbacks.on_step_end(epoch, record)

    def finish(self, **extra) -> dict:
        """result.json: the kept epochs, the best of them (validation accuracy; without evaluation
        the last), history, `extra`."""
        best = self.best_epoch
        if best not in self.checkpoints:
            scored = [(r.get(f"{self.cfg.eval_split}_accuracy", -1), r["epoch"]) for r in self.history
                      if r["epoch"] in self.checkpoints]
            best = max(scored)[1] if self.eval_examples else max(self.checkpoints)
        return self.write_result({"checkpoints": self.checkpoints, "best_epoch": best,
                                  "best_checkpoint": self.checkpoints[best], "history": self.history, **extra})
