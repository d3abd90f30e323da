"""Greedy top-1 evaluation: generate one CoT per question, grade it, save every prediction."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune.engines.base import Generator
from reftune.options import Runtime, Sampling
from reftune.tasks import DataConfig, Example, Task
from reftune.validate import Checks
from reftune.runs import atomic_write_text, write_json


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
        {"id": ex.id, "question": ex.question, "prompt": prompt, "completion": task.completion_text(ex, text),
         "answer": g.answer, "gold": ex.answer, "correct": g.correct, **({"reason": g.reason} if g.reason else {})}
        for ex, prompt, text, g in zip(examples, prompts, rollout.texts, graded)
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
    """Both files atomically (temp file + rename): a kill leaves the old pair or the new one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}_predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    write_json(out_dir / f"{name}_summary.json", summary)


@dataclass
class ModelOnSplit(Runtime):
    """A checkpoint and the task split it is run on (`eval`, `sample`)."""

    model: str = ""
    """Checkpoint folder or Hugging Face id."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task whose split is read."""
    split: str = "test"
    """test | validation | train"""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).str("model").choice("split", EVAL_SPLITS)
        self.data.validate(prefix + "data.")


@dataclass
class EvalConfig(Sampling, ModelOnSplit):
    """`reftune eval`: greedy top-1 accuracy of a checkpoint on a split."""

    out_dir: str = "runs/eval"
    """Where predictions and the summary go."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).out_dir()


EVAL_SPLITS = ("test", "validation", "train")
# Settings that do not change what a greedy evaluation writes: an earlier eval in the folder may differ.
EVAL_FREE = ("split", "gen_batch_size", "device", "out_dir", "progress")


def run_eval(cfg: EvalConfig, overwrite: bool = False) -> dict:
    """Greedy top-1 on `cfg.split`: `{split}_predictions.jsonl` and `{split}_summary.json` in
    out_dir. Earlier predictions of that split, or an earlier eval of another model or data in
    the folder, are never replaced without `overwrite` (then atomically)."""
    from reftune.engines import make_generator
    from reftune.model_files import check_model_source
    from reftune.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from reftune.prompt_guard import guard_prompts, model_context
    from reftune.runs import RunFolderError, claim_run, config_changes
    from reftune.tasks import load_task

    # 1. Everything checked before the folder is touched: config, task, split, model files, prompts.
    cfg.validate()
    task = load_task(cfg.data)
    if not getattr(task, cfg.split):
        raise ValueError(f"task {task.name}: the {cfg.split} split is empty")
    check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    task = guard_prompts(task, tokenizer, model_context(cfg.model), cfg.data, (cfg.split,))
    with claim_run(cfg.out_dir, "reftune eval") as folder:
        outputs = [n for n in (f"{cfg.split}_predictions.jsonl", f"{cfg.split}_summary.json")
                   if (folder.path / n).exists()]
        changed = config_changes(folder.path, cfg, EVAL_FREE)
        if not overwrite and (outputs or changed):
            what = (f"predictions of the {cfg.split} split ({', '.join(outputs)})" if outputs else
                    f"an evaluation with other settings ({', '.join(changed)} differ)")
            raise RunFolderError(f"{folder.path} already holds {what}: choose another out_dir, or pass --overwrite "
                                 f"to replace them")
        run_dir = folder.begin(cfg)
        # 2. Model, greedy decoding, predictions written atomically.
        device = resolve_device(cfg.device)
        model = load_causal_lm(cfg.model, device, resolve_dtype(cfg.dtype, device))
        torch.manual_seed(cfg.seed)
        generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, model_path=cfg.model)
        summary, predictions = evaluate(generator, task, getattr(task, cfg.split), cfg.max_new_tokens)
        summary.update(model=cfg.model, task=task.name, split=cfg.split)
        if task.stats.get("skipped_long_prompts"):
            summary["skipped_long_prompts"] = task.stats["skipped_long_prompts"][cfg.split]
        save_predictions(run_dir, summary, predictions, cfg.split)
    return summary
