"""Greedy top-1 evaluation: generate one CoT per question, grade it, save every prediction."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune.engines.base import Generator
from reftune.tasks import DataConfig, Example, Task
from reftune.runs import write_json


def evaluate(generator: Generator, task: Task, examples: list[Example], max_new_tokens: int = 256) -> tuple[dict, list[dict]]:
    """Greedy decode every question; returns (summary, predictions). Summary: accuracy (a fraction),
    n, answered (fraction with a usable answer), mean_response_tokens, seconds."""
    if not examples:
        raise ValueError(f"task {task.name}: nothing to evaluate (empty split)")
    start = time.time()
    prompts = [task.prompt(ex, for_generation=True) for ex in examples]
    rollout = generator.generate(prompts, greedy=True, max_new_tokens=max_new_tokens)
    graded = task.grade(rollout.texts, examples)
    predictions = [
        {"id": ex.id, "question": ex.question, "completion": task.completion_text(ex, text), "answer": g.answer,
         "gold": ex.answer, "correct": g.correct, **({"reason": g.reason} if g.reason else {})}
        for ex, text, g in zip(examples, rollout.texts, graded)
    ]
    n = len(examples)
    summary = {
        "accuracy": sum(g.correct for g in graded) / n,
        "n": n,
        "answered": sum(g.answer is not None for g in graded) / n,
        "mean_response_tokens": float(rollout.response_mask.sum(-1).float().mean()),
        "seconds": round(time.time() - start, 2),
    }
    return summary, predictions


def save_predictions(out_dir: str | Path, summary: dict, predictions: list[dict], name: str = "test") -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}_predictions.jsonl.tmp"
    with tmp.open("w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    tmp.replace(out_dir / f"{name}_predictions.jsonl")
    write_json(out_dir / f"{name}_summary.json", summary)


@dataclass
class EvalConfig:
    """`reftune eval`: greedy top-1 accuracy of a checkpoint on a split."""

    model: str = ""
    """Checkpoint folder or Hugging Face id to evaluate."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task to evaluate on."""
    split: str = "test"
    """test | validation | train"""
    out_dir: str = "runs/eval"
    """Where predictions and the summary go."""
    max_new_tokens: int = 256
    """Longest CoT generated."""
    batch_size: int = 64
    """Questions decoded at once."""
    engine: str = "cached"
    """Generation engine: cached (built-in KV-cache sampler) or hf (model.generate)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"""
    seed: int = 0
    """Seed (greedy decoding is deterministic; kept for the record)."""


def run_eval(cfg: EvalConfig) -> dict:
    from reftune.engines import make_generator
    from reftune.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from reftune.tasks import load_task
    from reftune.runs import start_run

    run_dir = start_run(cfg.out_dir, cfg)
    task = load_task(cfg.data)
    splits = {"test": task.test, "validation": task.validation, "train": task.train}
    if cfg.split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {cfg.split!r}")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device, resolve_dtype(cfg.dtype, device))
    torch.manual_seed(cfg.seed)
    generator = make_generator(cfg.engine, model, tokenizer, cfg.batch_size, model_path=cfg.model)
    summary, predictions = evaluate(generator, task, splits[cfg.split], cfg.max_new_tokens)
    summary.update(model=cfg.model, task=task.name, split=cfg.split)
    save_predictions(run_dir, summary, predictions, cfg.split)
    return summary
