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
from reftune.options import Runtime, SampleFile
from reftune.validate import Checks
from reftune.trainers.sft import SFTConfig  # Offline-ST is SFT on a rebuilt dataset: it composes that trainer


def _offline_sft() -> SFTConfig:
    return SFTConfig(epochs=20, lr=1e-5)


@dataclass
class OfflineSTConfig(SampleFile, Runtime):
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
    max_per_question: int = 10
    """Distinct correct samples kept per question, besides the gold CoT (the paper: 10)."""
    step_budget_epochs: int = 0
    """> 0: instead of sft.epochs, train as many steps as this many epochs of gold CoTs alone (0: sft.epochs)."""
    sft: SFTConfig = field(default_factory=_offline_sft)
    """SFT settings (model, data, out_dir and seed are set here; the paper: 20 epochs, lr 1e-5)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.str("base_model", "warmup_model", "samples").out_dir().int("max_per_question", 0).int("step_budget_epochs", 0)
        if not self.base_model:
            c.fail("base_model", "must be set: the model SFT starts from (the paper: the base model)")
        self.data.validate(prefix + "data.")
        d = _offline_sft()
        c.derived("sft", {"model": (d.model, self.base_model), "data": (d.data, self.data), "out_dir": (d.out_dir,),
                          "seed": (d.seed, self.seed)}, "offline-st (from base_model, data.*, out_dir and seed)")
        self.sft.validate(prefix + "sft.")


# Settings a rerun may change without changing what the run computes.
RESUME_FREE = ("progress", "chunk_size", "gen_batch_size", "device")


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
            out.append(dataclasses.replace(ex, id=f"{ex.id}/sample-{kept}", cot=text))  # its conversation kept
    return out


def run_offline_st(cfg: OfflineSTConfig, task: Task | None = None, samples: list[dict] | None = None,
                   overwrite: bool = False) -> dict:
    """Sample (or read) the warm-up model's CoTs, build the data, SFT from the base model.

    Returns the SFT result ({"best_checkpoint", "checkpoints", "history", ...}) plus the data
    statistics {"n_gold", "n_kept", "questions_with_kept"}. `samples` (records) skips sampling.
    """
    from reftune.model_files import check_model_source
    from reftune.models import load_tokenizer
    from reftune.prompt_guard import guard_prompts, model_context
    from reftune.runs import begin_resumable, claim_run
    from reftune.tasks import load_task

    # 1. Config, task, models and the samples file checked; then the run folder is claimed. A rerun
    # with the same settings resumes (sampling, then SFT); other settings need --overwrite.
    cfg.validate()
    sample_here = samples is None and not cfg.samples
    if sample_here and not cfg.warmup_model:
        raise ValueError("offline-st: set warmup_model (to sample from) or samples (a samples file)")
    task = task or load_task(cfg.data)
    check_model_source(cfg.base_model, key="base_model")
    if sample_here:
        check_model_source(cfg.warmup_model, key="warmup_model")
        task = guard_prompts(task, load_tokenizer(cfg.warmup_model), model_context(cfg.warmup_model), cfg.data,
                             ("train",))
    if samples is None and cfg.samples and not Path(cfg.samples).is_file():
        raise FileNotFoundError(f"offline-st: samples file not found: {cfg.samples}")
    folder = claim_run(cfg.out_dir, "reftune offline-st")
    try:
        run_dir = begin_resumable(folder, cfg, RESUME_FREE, "an offline-st run", overwrite)
        result = _offline_st_stages(cfg, task, samples, run_dir, sample_here)
    finally:
        folder.release()
    return result


def _offline_st_stages(cfg: OfflineSTConfig, task: Task, samples, run_dir: Path, sample_here: bool) -> dict:
    from reftune.inference.sample import check_samples_origin
    from reftune.engines import make_generator
    from reftune.inference.sample import read_samples, sample_to_file
    from reftune.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from reftune.runs import write_json
    from reftune.trainers.sft import run_sft

    # 2. The warm-up model's samples over the training split: given, read, or drawn here (resumable,
    # and only from the model and settings they were first drawn with).
    if samples is None and cfg.samples:
        samples = read_samples(cfg.samples)
    if sample_here:
        path = run_dir / "train_samples.jsonl"
        check_samples_origin(path, {"checkpoint": cfg.warmup_model, "k": cfg.k, "temperature": cfg.temperature,
                                    "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                                    "engine": cfg.engine, "data": dataclasses.asdict(cfg.data)})
        device = resolve_device(cfg.device)
        tokenizer = load_tokenizer(cfg.warmup_model)
        model = load_causal_lm(cfg.warmup_model, device, resolve_dtype(cfg.dtype, device))
        generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed,
                                   model_path=cfg.warmup_model)
        samples = sample_to_file(generator, task, task.train, path, cfg.k, cfg.temperature, cfg.top_p,
                                 cfg.max_new_tokens, cfg.chunk_size, cfg.seed, cfg.progress)
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
    # A rerun continues the SFT stage an earlier, interrupted run of these settings started.
    result = run_sft(sft_cfg, task=task, train_examples=examples, resume=(run_dir / "sft" / "config.yaml").exists())
    result = {**result, **stats}
    write_json(run_dir / "result.json", result)
    return result
