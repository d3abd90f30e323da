"""Training the reranking reward model: a 2-class sequence classifier on question + sampled CoT.
Scoring and reranking with it are `reftune.inference.rerank`.

As in the paper, the classifier is initialised from an SFT (or ReFT) checkpoint: the backbone of
the causal LM plus a new linear `score` head (`AutoModelForSequenceClassification` loads a causal
LM checkpoint that way; transformers reports the head as newly initialised). It is trained on
question + sampled CoT with label = the grader's verdict, from samples of the warm-up model over
the training set, each distinct completion of a question once.

Class balance: a weak model's samples are mostly wrong (a strong model's mostly right), so plain
cross-entropy first learns the prior. Reranking only compares candidates of one question, which a
constant bias does not change, so the paper trains unweighted (`balance_classes=False`). With
`balance_classes=True` each class is weighted n / (2 * n_class), so a rare class pulls as hard
on the shared backbone as the common one; worth trying when one class is under ~10 %.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from dataclasses import field
from pathlib import Path

from reftune.batching import pad_with_mask
from reftune.inference.rerank import POSITIVE, encode_rm_input, load_reward_model
from reftune.models import autocast, load_tokenizer, resolve_device, resolve_dtype, resolve_mixed_precision, save_hf
from reftune.model_files import check_model_source
from reftune.options import Optimizer, Schedule, TrainRuntime
from reftune.validate import Checks
from reftune.runs import RunLogger, atomic_save, progress, write_json
from reftune.tasks import DataConfig, Task, load_task
from reftune.trainers.distributed import device_for, full_state_dict, init_distributed, scalar, wrap
from reftune.trainers.loop import NullLogger, claim_folder
from reftune.trainers.supervised import linear_schedule, shuffled_batches


@dataclass
class RewardModelConfig(Schedule, Optimizer, TrainRuntime):
    """Reward model for reranking: a 2-class classifier on question + sampled CoT."""

    model: str = ""
    """Initial checkpoint (the paper: the SFT or ReFT checkpoint); empty: the caller picks (compare: SFT)."""
    out_dir: str = "runs/reward_model"
    """Run folder: config, metrics, checkpoints/final."""
    epochs: int = 3
    """Passes over the deduplicated samples (the paper: 3)."""
    lr: float = 1e-6  # the paper: 1e-6 for 7B; a tiny model from scratch needs ~1e-3
    batch_size: int = 32
    """Sequences per optimizer step."""
    max_length: int = 1024
    """Prompt + CoT tokens kept; longer inputs lose the start of the prompt (the CoT's end decides)."""
    max_examples: int = 0
    """Train on at most this many distinct (question, sample) pairs, a seeded random subset (0: all)."""
    balance_classes: bool = False
    """Weight the loss by inverse class frequency (see the module doc; the paper: off)."""
    score_batch_size: int = 64
    """Candidates scored at once at test time."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.str("model").out_dir().int("epochs", 1).int("batch_size", 1)
        c.int("max_length", 2).int("max_examples", 0).bool("balance_classes").int("score_batch_size", 1)


@dataclass
class RewardModelRunConfig(RewardModelConfig):
    """`reftune reward-model`: train the reranking reward model from a samples file."""

    samples: str = ""
    """Samples over the training split (`reftune sample split=train k=N`): each distinct completion once, labelled by its `correct`."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task whose prompt format the samples' questions are put in."""

    def validate(self, prefix: str = "") -> None:
        from reftune.validate import Checks

        super().validate(prefix)
        c = Checks(self, prefix)
        c.str("samples")
        if not self.samples:
            c.fail("samples", "is required: a samples file over the training split (reftune sample split=train)")
        self.data.validate(prefix + "data.")


def run_reward_model(cfg: RewardModelRunConfig, overwrite: bool = False) -> dict:
    """`reftune reward-model`: read the samples, then `train_reward_model`."""
    from reftune.inference.sample import read_samples

    cfg.validate()
    if not Path(cfg.samples).is_file():
        raise FileNotFoundError(f"samples: file not found: {cfg.samples}")
    task = load_task(cfg.data, load_tokenizer(cfg.model))  # prompts as the sampled model saw them
    prompts, completions, labels = rm_training_data(task, read_samples(cfg.samples))
    if len(set(labels)) < 2:
        raise ValueError(f"{cfg.samples}: every sample is {'correct' if labels and labels[0] == POSITIVE else 'wrong'}"
                         f" ({len(labels)} distinct completions): a classifier needs both kinds; sample more (k) "
                         f"or at a higher temperature")
    return train_reward_model(cfg, prompts, completions, labels, overwrite=overwrite, command="reward-model")


def rm_training_data(task: Task, records: list[dict]) -> tuple[list[str], list[str], list[int]]:
    """(prompts, completions, labels) from samples records: each distinct completion of a question
    once (the first copy's label; the grader is deterministic, so copies agree)."""
    prompts, completions, labels = [], [], []
    for r in records:
        prompt = task.record_prompt(r)
        seen: set[str] = set()
        for s in r["samples"]:
            if s["completion"] in seen:
                continue
            seen.add(s["completion"])
            prompts.append(prompt)
            completions.append(s["completion"])
            labels.append(POSITIVE if s["correct"] else 1 - POSITIVE)
    return prompts, completions, labels


def train_reward_model(cfg: RewardModelConfig, prompts: list[str], completions: list[str], labels: list[int],
                       overwrite: bool = False, command: str = "compare") -> dict:
    """Train the classifier; returns {"checkpoint", "history", "n", "positive_fraction", "seconds"}."""
    # 1. Config and data checked, run folder claimed (by rank 0), seeds.
    cfg.validate()
    if not prompts or not (len(prompts) == len(completions) == len(labels)):
        raise ValueError(f"reward model: need equal, non-empty prompts/completions/labels, got "
                         f"{len(prompts)}/{len(completions)}/{len(labels)}")
    check_model_source(cfg.model, key="model" if command == "reward-model" else "rm.model")
    dist = init_distributed(cfg.parallel)
    folder, _ = claim_folder(cfg.out_dir, dist, resume=False, overwrite=overwrite, command=command,
                             resumable=False)  # (epochs of a reward model are short: rerun, or --overwrite)
    try:
        run_dir = folder.begin(cfg) if folder is not None else Path(cfg.out_dir)
        dist.barrier()
        return _train(cfg, dist, run_dir, prompts, completions, labels)
    finally:
        if folder is not None:
            folder.release()


def _train(cfg: RewardModelConfig, dist, run_dir, prompts, completions, labels) -> dict:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = device_for(dist, resolve_device(cfg.device))
    amp = resolve_mixed_precision(cfg.mixed_precision, device)
    if cfg.max_examples and len(prompts) > cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(prompts)), cfg.max_examples))
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        labels = [labels[i] for i in keep]

    # 2. Classifier from the initial checkpoint; inputs tokenised once.
    model, tokenizer = load_reward_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    train_model = wrap(model, dist)  # DDP, or sharded in place (fsdp2): the optimizer comes after
    rows = [encode_rm_input(tokenizer, p, c, cfg.max_length) for p, c in zip(prompts, completions)]
    targets = torch.tensor(labels, dtype=torch.long)
    n_pos = int((targets == POSITIVE).sum())
    class_weight = torch.ones(2)
    if cfg.balance_classes and 0 < n_pos < len(labels):
        n = len(labels)
        counts = torch.tensor([n - n_pos, n_pos], dtype=torch.float32)  # indexed by label: 0 wrong, 1 correct
        class_weight = n / (2 * counts)

    # 3. Optimizer and linear schedule over the whole run.
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    logger = RunLogger(run_dir, tensorboard=False) if dist.is_main else NullLogger()
    order_rng = random.Random(cfg.seed)
    history, step, start = [], 0, time.time()
    bar = progress(total_steps, "reward model", disable=not cfg.progress or not dist.is_main)
    for epoch in range(1, cfg.epochs + 1):
        # 4. One epoch: shuffled batches, each split over the ranks; the (class-weighted)
        # cross-entropy summed over a rank's rows and divided by the weight of the whole batch.
        loss_sum, hits = 0.0, 0
        for idx in shuffled_batches(len(rows), cfg.batch_size, order_rng):
            batch_weight = float(class_weight[targets[idx]].sum())
            stand_in = dist.enabled and not dist.uneven_slice(idx)  # a rank left without rows (a last small batch)
            mine = idx[:1] if stand_in else dist.uneven_slice(idx)  # runs a zero-weight stand-in: all take part
            input_ids, attention_mask = pad_with_mask([rows[i] for i in mine], tokenizer.pad_token_id)
            y = targets[mine].to(device)
            with autocast(amp, device):
                logits = train_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, y, weight=class_weight.to(device), reduction="sum")
            if stand_in:
                loss = loss * 0.0
            optimizer.zero_grad(set_to_none=True)
            (loss * dist.world_size / batch_weight).backward()  # DDP averages over ranks: x W restores the sum
            batch_loss, batch_hits = dist.sum_floats(loss.item() / batch_weight,
                                                     0.0 if stand_in else float((logits.argmax(-1) == y).sum()))
            if not math.isfinite(batch_loss):
                raise FloatingPointError(f"reward model: loss is {batch_loss} at step {step}; lower lr")
            scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += batch_loss * len(idx)
            hits += int(batch_hits)
            bar.update(1)
        # 5. Epoch record (training-set loss and accuracy: the held-out test is reranking itself).
        record = {"epoch": epoch, "train_loss": loss_sum / len(rows), "train_accuracy": hits / len(rows)}
        history.append(record)
        logger.log(step, {f"rm/{k}": v for k, v in record.items()})
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    bar.close()
    logger.close()

    # 6. Save the classifier (an ordinary HF folder: AutoModelForSequenceClassification loads it);
    # under fsdp2 the shards are gathered first (a collective), rank 0 writes.
    model.eval()
    state = full_state_dict(model, dist) if dist.sharded else None
    path = run_dir / "checkpoints" / "final"
    result = {"checkpoint": str(path), "history": history, "n": len(rows), "positive_fraction": n_pos / len(rows),
              "seconds": round(time.time() - start, 1)}
    if dist.is_main:
        atomic_save(lambda d: save_hf(model, tokenizer, d, state), path)
        write_json(run_dir / "result.json", result)
    dist.barrier()
    return result


