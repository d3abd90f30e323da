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

Training runs on the shared loop (trainers/loop.py: run folder, seeds, distribution, the optimizer
step with its non-finite stop, the result) counted in epochs; it writes no resume state (an epoch
is short next to the sampling that feeds it: rerun, or --overwrite).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune.batching import pad_with_mask
from reftune.inference.rerank import POSITIVE, encode_rm_input, load_reward_model
from reftune.models import autocast, enable_activation_checkpointing, load_tokenizer, save_hf
from reftune.model_files import check_model_source
from reftune.options import Optimizer, Schedule, TrainRuntime
from reftune.validate import Checks
from reftune.runs import atomic_save
from reftune.tasks import DataConfig, Task, load_task
from reftune.trainers.distributed import wrap
from reftune.trainers.loop import TrainingRun
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
    # 1. Config and data checked, run folder claimed (by rank 0), seeds, the classifier.
    cfg.validate()
    if not prompts or not (len(prompts) == len(completions) == len(labels)):
        raise ValueError(f"reward model: need equal, non-empty prompts/completions/labels, got "
                         f"{len(prompts)}/{len(completions)}/{len(labels)}")
    with RewardModelRun(cfg, key="model" if command == "reward-model" else "rm.model", overwrite=overwrite,
                        command=command) as run:
        return _train(run, prompts, completions, labels)


def _train(run: RewardModelRun, prompts: list[str], completions: list[str], labels: list[int]) -> dict:
    """The opened run's data (a seeded subset of at most `max_examples`), optimizer and epochs."""
    cfg = run.cfg
    if cfg.max_examples and len(prompts) > cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(prompts)), cfg.max_examples))
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        labels = [labels[i] for i in keep]

    # 2. Inputs tokenised once; class weights (see the module doc).
    rows = [encode_rm_input(run.tokenizer, p, c, cfg.max_length) for p, c in zip(prompts, completions)]
    targets = torch.tensor(labels, dtype=torch.long)
    class_weight = class_weights(targets, cfg.balance_classes)

    # 3. Optimizer and linear schedule over the whole run.
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_ratio)
    order_rng = random.Random(cfg.seed)
    run.attach(optimizer, scheduler=scheduler, order_rng=order_rng)
    start = time.time()
    for epoch in run.epochs(cfg.epochs, steps_per_epoch):
        # 4. One epoch of shuffled batches.
        loss_sum, hits = train_epoch(run, rows, targets, class_weight)
        # 5. Epoch record (training-set loss and accuracy: the held-out test is reranking itself).
        record = {"epoch": epoch, "train_loss": loss_sum / len(rows), "train_accuracy": hits / len(rows)}
        run.history.append(record)
        run.logger.log(run.step, {f"rm/{k}": v for k, v in record.items()})
        run.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    # 6. The classifier (an ordinary HF folder) and result.json.
    return run.finish(n=len(rows), positive_fraction=int((targets == POSITIVE).sum()) / len(rows),
                      seconds=round(time.time() - start, 1))


def class_weights(targets: torch.Tensor, balance: bool) -> torch.Tensor:
    """Loss weight of each class (indexed by label: 0 wrong, 1 correct): n / (2 n_class) with
    `balance` when both classes occur, else 1."""
    n, n_pos = len(targets), int((targets == POSITIVE).sum())
    if not balance or not 0 < n_pos < n:
        return torch.ones(2)
    counts = torch.tensor([n - n_pos, n_pos], dtype=torch.float32)
    return n / (2 * counts)


def train_epoch(run: RewardModelRun, rows: list[list[int]], targets: torch.Tensor,
                class_weight: torch.Tensor) -> tuple[float, int]:
    """One pass in the run's shuffled order, each batch split over the processes: the
    (class-weighted) cross-entropy summed over a process's rows and divided by the weight of the
    whole batch. Returns (the loss summed over rows, correct predictions) of the epoch."""
    dist, device = run.dist, run.device
    loss_sum, hits = 0.0, 0
    for idx in shuffled_batches(len(rows), run.cfg.batch_size, run.order_rng):
        batch_weight = float(class_weight[targets[idx]].sum())
        mine, stand_in = run.share(idx)
        input_ids, attention_mask = pad_with_mask([rows[i] for i in mine], run.tokenizer.pad_token_id)
        y = targets[mine].to(device)
        with autocast(run.amp, device):
            logits = run.train_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, y, weight=class_weight.to(device), reduction="sum")
        if stand_in:
            loss = loss * 0.0
        (loss * dist.world_size / batch_weight).backward()  # DDP averages over ranks: x W restores the sum
        batch_loss, batch_hits = dist.sum_floats(loss.item() / batch_weight,
                                                 0.0 if stand_in else float((logits.argmax(-1) == y).sum()))
        run.optimizer_step(batch_loss, run.model.parameters())
        loss_sum += batch_loss * len(idx)
        hits += int(batch_hits)
    return loss_sum, hits


class RewardModelRun(TrainingRun):
    """The reward model's run on the shared loop: a sequence classifier initialised from
    `cfg.model` (a new score head), no engine, no evaluation; the result is `checkpoints/final`."""

    unit = "epoch"

    use_trackers = False  # a few records per run: metrics.jsonl holds them

    def __init__(self, cfg: RewardModelConfig, *, key: str, **options):
        self._key = key  # the config key that names the initial checkpoint, for its error message
        super().__init__(cfg, "reward model", resumable=False, **options)

    def check_inputs(self) -> None:
        check_model_source(self.cfg.model, key=self._key)

    def load_models(self) -> None:
        self.model, self.tokenizer = load_reward_model(self.cfg.model, self.device, self.dtype)
        if self.cfg.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.model.train()
        self.train_model = wrap(self.model, self.dist)  # DDP, or sharded in place (fsdp2): the optimizer comes after

    def finish(self, **extra) -> dict:
        """Save the classifier (an ordinary HF folder: AutoModelForSequenceClassification loads it;
        under fsdp2 the shards are gathered first, a collective), then result.json."""
        self.model.eval()
        state, _ = self.weights()
        path = self.run_dir / "checkpoints" / "final"
        if self.dist.is_main:
            atomic_save(lambda d: save_hf(self.model, self.tokenizer, d, state), path)
        return self.write_result({"checkpoint": str(path), "history": self.history, **extra})
