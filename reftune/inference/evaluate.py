"""Greedy top-1 evaluation: generate one CoT per question, grade it, save every prediction."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune.engines.base import Generator
from reftune.options import Runtime, SampleCount, Sampling
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


def sample_split(generator, task: Task, examples: list[Example], k: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256) -> list[dict]:
    """Sample `k` CoTs for each example and grade them; one record per example (see module doc)."""
    if not examples:
        return []
    prompts = [task.prompt(ex, for_generation=True) for ex in examples]
    rollout = generator.generate(prompts, num_samples=k, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens)
    row_examples = [examples[i] for i in rollout.prompt_index]
    graded = task.grade(rollout.texts, row_examples)
    records = [{"id": ex.id, "question": ex.question, "prompt": prompt, "gold": ex.answer, "samples": []}
               for ex, prompt in zip(examples, prompts)]
    for i, text, g in zip(rollout.prompt_index, rollout.texts, graded):
        records[i]["samples"].append({"completion": task.completion_text(examples[i], text), "answer": g.answer,
                                      "correct": bool(g.correct)})
    return records


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

    def checked_task(self):
        """(task, tokenizer) once the config, the split, the model files and the prompt lengths are
        checked: what a command knows before it touches its folder."""
        from reftune.model_files import check_model_source
        from reftune.models import load_tokenizer
        from reftune.prompt_guard import guard_prompts, model_context
        from reftune.tasks import load_task

        self.validate()
        task = load_task(self.data)
        if not getattr(task, self.split):
            raise ValueError(f"task {task.name}: the {self.split} split is empty")
        check_model_source(self.model)
        tokenizer = load_tokenizer(self.model)
        return guard_prompts(task, tokenizer, model_context(self.model), self.data, (self.split,)), tokenizer


@dataclass
class EvalConfig(SampleCount, Sampling, ModelOnSplit):
    """`reftune eval`: greedy top-1 accuracy of a checkpoint on a split; with k > 1 also k sampled
    CoTs per question and pass@1..k."""

    out_dir: str = "runs/eval"
    """Where predictions and the summary go."""
    k: int = 1  # 1: greedy top-1 only

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).out_dir()


EVAL_SPLITS = ("test", "validation", "train")
# Settings that do not change what a greedy evaluation writes: an earlier eval in the folder may differ.
EVAL_FREE = ("split", "gen_batch_size", "device", "out_dir", "progress")


def run_eval(cfg: EvalConfig, overwrite: bool = False) -> dict:
    """Greedy top-1 on `cfg.split`: `{split}_predictions.jsonl` and `{split}_summary.json` in
    out_dir; with k > 1 also `{split}_samples.jsonl` and pass@1..k in the summary. Earlier predictions of that split, or an earlier eval of another model or data in
    the folder, are never replaced without `overwrite` (then atomically)."""
    from reftune.engines import make_generator
    from reftune.models import load_causal_lm, resolve_device, resolve_dtype
    from reftune.runs import RunFolderError, claim_run, config_changes

    # 1. Everything checked before the folder is touched: config, task, split, model files, prompts.
    task, tokenizer = cfg.checked_task()
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
        generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed, model_path=cfg.model)
        examples = getattr(task, cfg.split)
        summary, predictions = evaluate(generator, task, examples, cfg.max_new_tokens)
        summary.update(model=cfg.model, task=task.name, split=cfg.split)
        if task.stats.get("skipped_long_prompts"):
            summary["skipped_long_prompts"] = task.stats["skipped_long_prompts"][cfg.split]
        if cfg.k > 1:  # 3. k sampled CoTs per question: pass@1..k beside greedy top-1
            summary.update(sampled_summary(generator, task, examples, cfg, run_dir))
        save_predictions(run_dir, summary, predictions, cfg.split)
    return summary


def sampled_summary(generator, task: Task, examples: list[Example], cfg: EvalConfig, run_dir: Path) -> dict:
    """Sample `cfg.k` CoTs per question, write them to `{split}_samples.jsonl` (the samples file
    format of `reftune sample`) and return the sample accuracy and the unbiased pass@1..k."""
    from reftune.inference.passk import pass_at_k_curve

    start = time.time()
    records = sample_split(generator, task, examples, cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    atomic_write_text(run_dir / f"{cfg.split}_samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    n_samples = sum(len(r["samples"]) for r in records)
    return {"k": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "sample_accuracy": sum(s["correct"] for r in records for s in r["samples"]) / max(n_samples, 1),
            **{f"pass@{k}": v for k, v in pass_at_k_curve(records).items()},
            "sampling_seconds": round(time.time() - start, 2)}
