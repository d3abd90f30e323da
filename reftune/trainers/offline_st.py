"""Offline self-training (the paper's baseline): SFT from the BASE model on the gold CoTs plus the
warm-up model's own correct CoTs.

1. sample k CoTs per training question from the warm-up model (the paper: k=100, T=1),
2. keep the correct ones, drop exact duplicates (the gold CoT counts as already present), keep at
   most `max_per_question` (the paper: 10),
3. add the gold CoT of every question,
4. SFT from the base model on the union (the paper: 20 epochs, lr 1e-5).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from reftune.inference.sample import check_same_questions
from reftune.tasks import DataConfig, Example, Task
from reftune.trainers.sft import SFTConfig  # Offline-ST is SFT on a rebuilt dataset: it composes that trainer


def _offline_sft() -> SFTConfig:
    return SFTConfig(epochs=20, lr=1e-5)


@dataclass
class OfflineSTConfig:
    """`reftune offline-st`: SFT from the base model on gold CoTs + the warm-up model's correct samples."""

    base_model: str = ""
    """Model the SFT starts from (the paper: the BASE model, not the warm-up checkpoint)."""
    warmup_model: str = ""
    """Checkpoint the training questions are sampled from (the warm-up model); unused with `samples`."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task: the training split is sampled, validation picks the best epoch."""
    out_dir: str = "runs/offline_st"
    """Run folder: train_samples.jsonl, the SFT run in sft/."""
    samples: str = ""
    """An existing samples file over the training split (`reftune sample split=train`); empty: sample here."""
    k: int = 100
    """Samples per training question (the paper: 100)."""
    max_per_question: int = 10
    """Distinct correct samples kept per question, besides the gold CoT (the paper: 10)."""
    step_budget_epochs: int = 0
    """> 0: instead of sft.epochs, train as many steps as this many epochs of gold CoTs alone (0: sft.epochs)."""
    temperature: float = 1.0
    """Sampling temperature (the paper: 1)."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    max_new_tokens: int = 256
    """Longest sampled CoT."""
    chunk_size: int = 64
    """Questions sampled and appended to the samples file at a time (resume granularity)."""
    gen_batch_size: int = 64
    """Sequences decoded at once."""
    engine: str = "cached"
    """Generation engine: cached | hf."""
    seed: int = 0
    """Seed of the sampler and of the SFT run."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"""
    progress: bool = True
    """Show progress bars."""
    sft: SFTConfig = field(default_factory=_offline_sft)
    """SFT settings (model, data, out_dir and seed are set here; the paper: 20 epochs, lr 1e-5)."""


def build_offline_st_examples(task_examples: list[Example], samples: list[dict],
                              max_per_question: int = 10) -> list[Example]:
    """Gold CoT of every question, then at most `max_per_question` distinct correct samples of it.

    `samples` are records of a samples file (`reftune.sample`): {"id", "question", "samples":
    [{"completion", "correct"}, ...]}; `completion` must be the full CoT. Duplicates are judged on the text with
    surrounding whitespace stripped; a sample equal to the gold CoT is a duplicate of it. Kept
    samples are the first distinct correct ones in sample order (samples are i.i.d., so that is a
    random subset).
    """
    by_id = {ex.id: ex for ex in task_examples}
    unknown = [r["id"] for r in samples if r["id"] not in by_id]
    if unknown:
        raise ValueError(f"offline-st: {len(unknown)} sampled question id(s) are not training questions "
                         f"(e.g. {unknown[0]!r}): the samples file belongs to another split or task")
    check_same_questions("offline-st samples", samples, by_id)
    samples_by_id = {r["id"]: r["samples"] for r in samples}
    out: list[Example] = []
    for ex in task_examples:
        if ex.cot is None:
            raise ValueError(f"offline-st: training example {ex.id} has no gold CoT")
        out.append(ex)
        seen = {ex.cot.strip()}
        kept = 0
        for s in samples_by_id.get(ex.id, []):
            text = s["completion"].strip()
            if kept >= max_per_question:
                break
            if not s["correct"] or text in seen:
                continue
            seen.add(text)
            kept += 1
            out.append(Example(f"{ex.id}/sample-{kept}", ex.question, ex.answer, text, ex.options))
    return out


def run_offline_st(cfg: OfflineSTConfig, task: Task | None = None, samples: list[dict] | None = None) -> dict:
    """Sample (or read) the warm-up model's CoTs, build the data, SFT from the base model.

    Returns the SFT result ({"best_checkpoint", "checkpoints", "history", ...}) plus the data
    statistics {"n_gold", "n_kept", "questions_with_kept"}. `samples` (records) skips sampling.
    """
    from reftune.engines import make_generator
    from reftune.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from reftune.inference.sample import read_samples, sample_to_file
    from reftune.trainers.sft import run_sft
    from reftune.tasks import load_task
    from reftune.runs import start_run, write_json

    # 1. Run folder and task.
    if not cfg.base_model:
        raise ValueError("offline-st: set base_model (the model SFT starts from)")
    run_dir = start_run(cfg.out_dir, cfg)
    task = task or load_task(cfg.data)

    # 2. The warm-up model's samples over the training split: given, read, or drawn here (resumable).
    if samples is None and cfg.samples:
        if not Path(cfg.samples).exists():
            raise FileNotFoundError(f"offline-st: samples file not found: {cfg.samples}")
        samples = read_samples(cfg.samples)
    if samples is None:
        if not cfg.warmup_model:
            raise ValueError("offline-st: set warmup_model (to sample from) or samples (a samples file)")
        device = resolve_device(cfg.device)
        tokenizer = load_tokenizer(cfg.warmup_model)
        model = load_causal_lm(cfg.warmup_model, device, resolve_dtype(cfg.dtype, device))
        generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed,
                                   model_path=cfg.warmup_model)
        samples = sample_to_file(generator, task, task.train, run_dir / "train_samples.jsonl", cfg.k,
                                 cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.chunk_size, cfg.seed,
                                 cfg.progress)
        del model, generator  # free it before SFT loads the base model

    # 3. Gold + distinct correct samples.
    examples = build_offline_st_examples(task.train, samples, cfg.max_per_question)
    n_gold = len(task.train)
    stats = {"n_gold": n_gold, "n_kept": len(examples) - n_gold,
             "questions_with_kept": len({ex.id.split("/sample-")[0] for ex in examples if "/sample-" in ex.id})}
    write_json(run_dir / "data_stats.json", stats)

    # 4. SFT from the base model on the union. With a step budget, Offline-ST gets the optimizer
    # steps of an SFT run on the gold CoTs alone (more data per epoch, so fewer epochs).
    epochs = cfg.sft.epochs
    if cfg.step_budget_epochs > 0:
        epochs = stats["epochs"] = max(1, round(cfg.step_budget_epochs * n_gold / len(examples)))
    sft_cfg = dataclasses.replace(cfg.sft, model=cfg.base_model, data=copy.deepcopy(cfg.data), seed=cfg.seed,
                                  epochs=epochs, out_dir=str(run_dir / "sft"), progress=cfg.sft.progress and cfg.progress)
    result = run_sft(sft_cfg, task=task, train_examples=examples)
    result = {**result, **stats}
    write_json(run_dir / "result.json", result)
    return result
