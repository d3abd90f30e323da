"""Reward-model reranking@k: a 2-class sequence classifier scores each sampled CoT; the sample
with the highest P(correct) among those with a parsable answer is the prediction.

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
from pathlib import Path

import torch

from reftune.tasks import Example, Task

POSITIVE = 1  # label index of "correct"


@dataclass
class RewardModelConfig:
    """Reward model for reranking: a 2-class classifier on question + sampled CoT."""

    model: str = ""
    """Initial checkpoint (the paper: the SFT or ReFT checkpoint); empty: the caller picks (compare: SFT)."""
    out_dir: str = "runs/reward_model"
    """Run folder: config, metrics, checkpoints/final."""
    epochs: int = 3
    """Passes over the deduplicated samples (the paper: 3)."""
    lr: float = 1e-6
    """Peak AdamW learning rate (the paper: 1e-6 for 7B; a tiny model from scratch needs ~1e-3)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up; linear decay to 0 after."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    max_length: int = 1024
    """Prompt + CoT tokens kept; longer inputs lose the start of the prompt (the CoT's end decides)."""
    max_examples: int = 0
    """Train on at most this many distinct (question, sample) pairs, a seeded random subset (0: all)."""
    balance_classes: bool = False
    """Weight the loss by inverse class frequency (see the module doc; the paper: off)."""
    score_batch_size: int = 64
    """Candidates scored at once at test time."""
    seed: int = 0
    """Seed of the head's initialisation and the data order."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"""
    progress: bool = True
    """Show a progress bar."""


def rm_training_data(task: Task, records: list[dict]) -> tuple[list[str], list[str], list[int]]:
    """(prompts, completions, labels) from samples records: each distinct completion of a question
    once (the first copy's label; the grader is deterministic, so copies agree)."""
    prompts, completions, labels = [], [], []
    for r in records:
        prompt = task.prompt(Example(r["id"], r["question"], r["gold"]))
        seen: set[str] = set()
        for s in r["samples"]:
            if s["completion"] in seen:
                continue
            seen.add(s["completion"])
            prompts.append(prompt)
            completions.append(s["completion"])
            labels.append(POSITIVE if s["correct"] else 1 - POSITIVE)
    return prompts, completions, labels


def encode_rm_input(tokenizer, prompt: str, completion: str, max_length: int) -> list[int]:
    """Token ids of prompt + completion, cut on the LEFT when too long: the classifier reads the
    last token's state, and the end of the CoT is where the answer is."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + \
        tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def rm_batch(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask. The HF classifier pools the rightmost non-pad
    token, which is then the last token of each row."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def load_reward_model(path: str, device: torch.device, dtype: torch.dtype):
    """(classifier, tokenizer) from a causal LM checkpoint (new score head) or a trained reward model."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from reftune.modeling import ModelLoadError, load_tokenizer

    tokenizer = load_tokenizer(path)  # also checks that a local path exists
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "score.weight newly initialised" table is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a sequence classifier from {path!r}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # Batched pooling finds each row's last token by the pad id: it must be the tokenizer's.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def train_reward_model(cfg: RewardModelConfig, prompts: list[str], completions: list[str], labels: list[int]) -> dict:
    """Train the classifier; returns {"checkpoint", "history", "n", "positive_fraction", "seconds"}."""
    from reftune.modeling import atomic_save, resolve_device, resolve_dtype, save_hf
    from reftune.sft import linear_schedule
    from reftune.tracking import RunLogger, progress, start_run, write_json

    # 1. Run folder, seeds, data checks.
    if not prompts or not (len(prompts) == len(completions) == len(labels)):
        raise ValueError(f"reward model: need equal, non-empty prompts/completions/labels, got "
                         f"{len(prompts)}/{len(completions)}/{len(labels)}")
    run_dir = start_run(cfg.out_dir, cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.max_examples and len(prompts) > cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(prompts)), cfg.max_examples))
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        labels = [labels[i] for i in keep]

    # 2. Classifier from the initial checkpoint; inputs tokenised once.
    model, tokenizer = load_reward_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
    model.train()
    rows = [encode_rm_input(tokenizer, p, c, cfg.max_length) for p, c in zip(prompts, completions)]
    targets = torch.tensor(labels, dtype=torch.long)
    n_pos = int((targets == POSITIVE).sum())
    class_weight = None
    if cfg.balance_classes and 0 < n_pos < len(labels):
        n = len(labels)
        counts = torch.tensor([n - n_pos, n_pos], dtype=torch.float32)  # indexed by label: 0 wrong, 1 correct
        class_weight = (n / (2 * counts)).to(device)

    # 3. Optimizer and linear schedule over the whole run.
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    logger = RunLogger(run_dir, tensorboard=False)
    order_rng = random.Random(cfg.seed)
    history, step, start = [], 0, time.time()
    bar = progress(total_steps, "reward model", disable=not cfg.progress)
    for epoch in range(1, cfg.epochs + 1):
        # 4. One epoch: shuffled batches, (weighted) cross-entropy on the pooled logits.
        order = list(range(len(rows)))
        order_rng.shuffle(order)
        loss_sum, hits = 0.0, 0
        for begin in range(0, len(order), cfg.batch_size):
            idx = order[begin:begin + cfg.batch_size]
            batch = {k: v.to(device) for k, v in rm_batch([rows[i] for i in idx], tokenizer.pad_token_id).items()}
            logits = model(**batch, use_cache=False).logits.float()
            y = targets[idx].to(device)
            loss = torch.nn.functional.cross_entropy(logits, y, weight=class_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reward model: loss is {loss.item()} at step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            hits += int((logits.argmax(-1) == y).sum())
            bar.update(1)
        # 5. Epoch record (training-set loss and accuracy: the held-out test is reranking itself).
        record = {"epoch": epoch, "train_loss": loss_sum / len(rows), "train_accuracy": hits / len(rows)}
        history.append(record)
        logger.log(step, {f"rm/{k}": v for k, v in record.items()})
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    bar.close()
    logger.close()

    # 6. Save the classifier (an ordinary HF folder: AutoModelForSequenceClassification loads it).
    model.eval()
    path = atomic_save(lambda d: save_hf(model, tokenizer, d), run_dir / "checkpoints" / "final")
    result = {"checkpoint": str(path), "history": history, "n": len(rows), "positive_fraction": n_pos / len(rows),
              "seconds": round(time.time() - start, 1)}
    write_json(run_dir / "result.json", result)
    return result


@torch.no_grad()
def score_candidates(rm, tokenizer, question_prompts: list[str], completions: list[str], batch_size: int = 64,
                     max_length: int = 1024) -> torch.Tensor:
    """P(correct) of each (prompt, completion) pair, a float32 CPU tensor in input order."""
    if len(question_prompts) != len(completions):
        raise ValueError(f"score_candidates: {len(question_prompts)} prompts for {len(completions)} completions")
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    rows = [encode_rm_input(tokenizer, p, c, max_length) for p, c in zip(question_prompts, completions)]
    # Score in length order (less padding), write back in input order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = torch.zeros(len(rows), dtype=torch.float32)
    for begin in range(0, len(order), batch_size):
        idx = order[begin:begin + batch_size]
        batch = {k: v.to(device) for k, v in rm_batch([rows[i] for i in idx], tokenizer.pad_token_id).items()}
        probs = torch.softmax(rm(**batch, use_cache=False).logits.float(), dim=-1)[:, POSITIVE]
        scores[torch.tensor(idx)] = probs.cpu()
    rm.train(was_training)
    return scores


def score_records(rm, tokenizer, task: Task, records: list[dict], batch_size: int = 64,
                  max_length: int = 1024) -> list[list[float]]:
    """P(correct) of every sample of every record, aligned with `record["samples"]`."""
    prompts, completions = [], []
    for r in records:
        prompt = task.prompt(Example(r["id"], r["question"], r["gold"]))
        for s in r["samples"]:
            prompts.append(prompt)
            completions.append(s["completion"])
    flat = score_candidates(rm, tokenizer, prompts, completions, batch_size, max_length).tolist()
    out, at = [], 0
    for r in records:
        out.append(flat[at:at + len(r["samples"])])
        at += len(r["samples"])
    return out


def rerank_index(scores: list[float], answers: list) -> int | None:
    """Index of the highest-scored candidate with a parsable answer (ties: the earliest), or None."""
    best = None
    for i, (score, answer) in enumerate(zip(scores, answers)):
        if answer is not None and (best is None or score > scores[best]):
            best = i
    return best


def rerank_accuracy(records: list[dict], scores: list[list[float]], k: int) -> float:
    """Reranking accuracy over the first `k` samples of each question; a question without any
    parsable answer counts as wrong."""
    if not records:
        raise ValueError("rerank_accuracy: no records")
    hits = 0
    for r, s in zip(records, scores):
        samples = r["samples"][:k]
        pick = rerank_index(s[:k], [x["answer"] for x in samples])
        hits += pick is not None and bool(samples[pick]["correct"])
    return hits / len(records)


def rerank_curve(records: list[dict], scores: list[list[float]], k: int) -> dict[int, float]:
    """Reranking accuracy for k' in 1, 2, 4, ..., k (the first k' samples of each question)."""
    from reftune.voting import ks_up_to

    return {kk: rerank_accuracy(records, scores, kk) for kk in ks_up_to(k)}


def reward_model_path(result_or_dir: str | Path) -> str:
    """The classifier folder inside a reward-model run folder (or the folder itself)."""
    path = Path(result_or_dir)
    return str(path / "checkpoints" / "final") if (path / "checkpoints" / "final").exists() else str(path)
