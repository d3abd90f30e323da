"""`reftune compare`: the paper's tables on your own checkpoints and data.

For each method with a checkpoint (warm-up, SFT, Offline-ST, Online-ST, ReFT; missing ones are
skipped) on one split:
- greedy top-1 accuracy (Table 1),
- k samples per question, majority voting@k and reward-model reranking@k (Table 2), and both
  against k' = 1, 2, 4, ..., k (the first k' of the same samples),
then `compare.json`, `compare.md` and a self-contained `compare.html` (plots embedded), with the
paper's numbers beside ours where the dataset and CoT style match.

Every sampling stage appends to a JSONL file under `out_dir/samples/`, so a rerun into the same
folder resumes instead of starting over; a trained reward model in `out_dir/rm/` is reused.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from reftune.inference.sample import check_samples_origin  # noqa: F401  (re-exported)
from reftune.compare.methods import DATASET_OF, METHOD_NAMES, METHODS, PAPER_RESULTS  # noqa: F401  (re-exported)
from reftune.options import Runtime, SampleFile
from reftune.tasks import DataConfig, Task
from reftune.validate import Checks
from reftune.trainers.reward_model import RewardModelConfig

def paper_reference(data_name: str, style: str) -> list[dict]:
    """The paper's rows for this dataset and CoT style (empty when the paper has none)."""
    dataset = DATASET_OF.get(data_name)
    return [row for row in PAPER_RESULTS if row["dataset"] == dataset and row["style"] == style]


@dataclass
class CompareConfig(SampleFile, Runtime):
    """`reftune compare`: top-1, voting@k and reranking@k of each method's checkpoint, with a report."""

    data: DataConfig = field(default_factory=DataConfig)
    """Task: `split` is evaluated; the training split feeds the reward model."""
    out_dir: str = "runs/compare"
    """Run folder: compare.{json,md,html}, plots, samples/, eval/, rm/."""
    warmup: str = ""
    """Warm-up checkpoint (empty: skipped); also the model the reward model's training samples come from."""
    sft: str = ""
    """SFT baseline checkpoint (empty: skipped); also the reward model's initialisation."""
    offline_st: str = ""
    """Offline self-training checkpoint (empty: skipped)."""
    online_st: str = ""
    """Online self-training checkpoint (empty: skipped)."""
    reft: str = ""
    """ReFT checkpoint (empty: skipped)."""
    reft_run: str = ""
    """ReFT run folder for training curves (metrics.jsonl); empty: inferred from `reft` (run/checkpoints/x/policy)."""
    split: str = "test"
    """Split evaluated: test | validation."""
    rerank: bool = True
    """Rerank with a reward model (given, or trained here); False: top-1 and voting only."""
    reward_model: str = ""
    """A trained reward model (a folder, or a reward-model run folder); empty: train one here."""
    rm_samples: str = ""
    """Samples file over the training split to train the reward model on; empty: sample the warm-up model."""
    rm_k: int = 100
    """Samples per training question drawn from the warm-up model for the reward model (the paper: 100)."""
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Reward-model training (model empty: the SFT checkpoint, else the warm-up one; out_dir is set here)."""
    eval_dir: str = ""
    """Where each method's greedy predictions go (empty: out_dir/eval)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.out_dir().str(*METHODS, "reft_run", "reward_model", "rm_samples", "eval_dir")
        c.choice("split", ("test", "validation")).bool("rerank").int("rm_k", 1)
        if not any(getattr(self, m) for m in METHODS):
            c.fail("sft", "no checkpoint given: set at least one of " + ", ".join(METHODS))
        self.data.validate(prefix + "data.")
        d = RewardModelConfig()
        c.derived("rm", {"out_dir": (d.out_dir,), "seed": (d.seed, self.seed)}, "compare (out_dir/rm, seed)")
        self.rm.validate(prefix + "rm.")


# Settings a rerun may change without changing what the comparison computes.
RESUME_FREE = ("progress", "chunk_size", "gen_batch_size", "device")


def reft_metrics(cfg: CompareConfig) -> list[dict]:
    """The ReFT run's metrics.jsonl rows that have rollout metrics (empty when not found)."""
    run = Path(cfg.reft_run) if cfg.reft_run else None
    if run is None and cfg.reft:
        # .../RUN/checkpoints/{best,step-N}/policy -> RUN
        candidate = Path(cfg.reft).parents[2] if len(Path(cfg.reft).parents) > 2 else None
        run = candidate if candidate and (candidate / "metrics.jsonl").exists() else None
    if run is None or not (run / "metrics.jsonl").exists():
        return []
    from reftune.runs import read_jsonl

    return [r for r in read_jsonl(run / "metrics.jsonl") if "reft/score" in r]


def _load(path: str, device, dtype):
    from reftune.models import load_causal_lm, load_tokenizer

    return load_causal_lm(path, device, dtype), load_tokenizer(path)


def _reward_model_records(cfg: CompareConfig, task: Task, out: Path, device, dtype, rm_records) -> list[dict] | None:
    """Training-split samples for the reward model: given, read from rm_samples, or drawn from the
    warm-up model (resumable); None when there is nothing to draw them from."""
    from reftune.engines import make_generator
    from reftune.inference.sample import read_samples, sample_to_file

    if rm_records is not None:
        return rm_records
    if cfg.rm_samples:
        if not Path(cfg.rm_samples).exists():
            raise FileNotFoundError(f"compare: rm_samples file not found: {cfg.rm_samples}")
        return read_samples(cfg.rm_samples)
    if not cfg.warmup:
        return None
    path = out / "rm" / "train_samples.jsonl"
    check_samples_origin(path, _origin(cfg, cfg.warmup, cfg.rm_k))
    model, tokenizer = _load(cfg.warmup, device, dtype)
    generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed)
    return sample_to_file(generator, task, task.train, path, cfg.rm_k, cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                          cfg.chunk_size, cfg.seed, cfg.progress)


def _origin(cfg: CompareConfig, checkpoint: str, k: int) -> dict:
    return {"checkpoint": checkpoint, "k": k, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "engine": cfg.engine}


def run_compare(cfg: CompareConfig, task: Task | None = None, rm_records: list[dict] | None = None,
                overwrite: bool = False) -> dict:
    """Evaluate every method given; returns (and writes) the comparison. `rm_records` (training-split
    samples records) skips sampling for the reward model. A rerun into the same folder with the
    same settings resumes; other settings are refused unless `overwrite` (then it starts again)."""
    from reftune.model_files import check_model_source
    from reftune.models import load_tokenizer
    from reftune.prompt_guard import guard_prompts, model_context
    from reftune.runs import begin_resumable, claim_run
    from reftune.tasks import load_task

    # 1. Config, task, every checkpoint and the prompt lengths checked before the folder is claimed.
    cfg.validate()
    task = task or load_task(cfg.data)
    examples = {"test": task.test, "validation": task.validation}[cfg.split]
    if not examples:
        raise ValueError(f"task {task.name}: the {cfg.split} split is empty")
    methods = {m: getattr(cfg, m) for m in METHODS if getattr(cfg, m)}
    for name, path in methods.items():
        check_model_source(path, key=name)
    if cfg.rerank and cfg.reward_model:
        from reftune.inference.rerank import reward_model_path

        check_model_source(reward_model_path(cfg.reward_model), key="reward_model")
    if cfg.rerank and cfg.rm.model:
        check_model_source(cfg.rm.model, key="rm.model")
    if cfg.rm_samples and not Path(cfg.rm_samples).is_file():
        raise FileNotFoundError(f"compare: rm_samples file not found: {cfg.rm_samples}")
    first = next(iter(methods.values()))
    splits = (cfg.split, "train") if cfg.rerank and cfg.warmup and not cfg.rm_samples and rm_records is None else (cfg.split,)
    task = guard_prompts(task, load_tokenizer(first), min(filter(None, [model_context(p) for p in methods.values()]),
                                                          default=None), cfg.data, splits)
    folder = claim_run(cfg.out_dir, "reftune compare")
    try:
        begin_resumable(folder, cfg, RESUME_FREE, "a comparison", overwrite)
        return _compare(cfg, task, rm_records)
    finally:
        folder.release()


def _compare(cfg: CompareConfig, task: Task, rm_records: list[dict] | None) -> dict:
    """The comparison's stages, in order; each writes what it produces under out_dir."""
    from reftune.compare.report import write_compare_report
    from reftune.models import resolve_device, resolve_dtype
    from reftune.runs import write_json

    start = time.time()
    out = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # 2. Each method: greedy top-1, then k samples per question (resumable), voting and pass@k.
    results, records_of = _evaluate_methods(cfg, task, device, dtype)
    # 3. Reward model: given, reused from an earlier run into this folder, or trained here.
    rm_path, rm_info = _reward_model(cfg, task, device, dtype, rm_records)
    # 4. Rerank: score every sample once, then pick among the first k' of each question.
    if rm_path:
        rm_info.update(_rerank(cfg, task, rm_path, records_of, results, device, dtype))
    # 5. compare.json, the plots, compare.md and compare.html.
    comparison = {
        "task": task.name, "style": task.style, "split": cfg.split, "k": cfg.k, "temperature": cfg.temperature,
        "top_p": cfg.top_p, "selection": "each checkpoint as given (reftune picks SFT/ReFT on the validation split)",
        "methods": results, "reward_model": rm_info, "paper": paper_reference(cfg.data.name, task.style),
        "wall_seconds": round(time.time() - start, 1),
    }
    write_json(out / "compare.json", comparison)
    write_compare_report(out, comparison, reft_metrics(cfg))
    print(f"[compare] report: {out / 'compare.html'}", flush=True)
    return comparison


def _evaluate_methods(cfg: CompareConfig, task: Task, device, dtype) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Greedy top-1 and k samples per question of every method; (results, samples records) by method."""
    from reftune.engines import make_generator
    from reftune.inference.evaluate import evaluate, save_predictions
    from reftune.inference.passk import pass_at_k_curve
    from reftune.inference.sample import sample_accuracy, sample_to_file
    from reftune.inference.voting import voting_curve

    out = Path(cfg.out_dir)
    eval_dir = Path(cfg.eval_dir) if cfg.eval_dir else out / "eval"
    examples = {"test": task.test, "validation": task.validation}[cfg.split]
    results: dict[str, dict] = {}
    records_of: dict[str, list[dict]] = {}
    for name, path in ((m, getattr(cfg, m)) for m in METHODS if getattr(cfg, m)):
        t0 = time.time()
        samples_path = out / "samples" / f"{name}_{cfg.split}.jsonl"
        check_samples_origin(samples_path, _origin(cfg, path, cfg.k))
        model, tokenizer = _load(path, device, dtype)
        generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed)
        summary, predictions = evaluate(generator, task, examples, cfg.max_new_tokens)
        save_predictions(eval_dir / name, summary, predictions, cfg.split)
        records = sample_to_file(generator, task, examples, samples_path, cfg.k, cfg.temperature, cfg.top_p,
                                 cfg.max_new_tokens, cfg.chunk_size, cfg.seed, cfg.progress)
        curve, passes = voting_curve(records, task.answer_type, cfg.k), pass_at_k_curve(records, cfg.k)
        records_of[name] = records
        results[name] = {"checkpoint": path, "accuracy": summary["accuracy"], "n": summary["n"], "k": cfg.k,
                         "vote_accuracy": curve[cfg.k], "rerank_accuracy": None, "vote_curve": curve,
                         "rerank_curve": None, "sample_accuracy": sample_accuracy(records),
                         "pass_at_k": passes.get(cfg.k), "pass_curve": passes, "seconds": round(time.time() - t0, 1)}
        print(f"[compare] {name:10s} top-1 {summary['accuracy']:.3f}  vote@{cfg.k} {curve[cfg.k]:.3f}  "
              f"pass@{cfg.k} {results[name]['pass_at_k']:.3f}", flush=True)
        del model, generator
    return results, records_of


def _reward_model(cfg: CompareConfig, task: Task, device, dtype, rm_records) -> tuple[str, dict]:
    """(path of the reward model to rerank with, or ""; what the report says of it). Given, reused
    from an earlier run into this folder, or trained on the warm-up model's training-split samples
    (each distinct completion of a question once)."""
    from reftune.inference.rerank import reward_model_path
    from reftune.trainers.reward_model import rm_training_data, train_reward_model

    if not cfg.rerank:
        return "", {"used": False, "note": "rerank=false"}
    out, info = Path(cfg.out_dir), {"used": False}
    if cfg.reward_model:
        return reward_model_path(cfg.reward_model), info
    if (out / "rm" / "checkpoints" / "final").exists():
        info["note"] = "reused the reward model already trained in this folder"
        return str(out / "rm" / "checkpoints" / "final"), info
    t0 = time.time()
    init = cfg.rm.model or cfg.sft or cfg.warmup
    train_records = _reward_model_records(cfg, task, out, device, dtype, rm_records)
    if not init or train_records is None:
        info["note"] = "no reward model: give reward_model, or warmup (to sample) / rm_samples, and sft"
        return "", info
    rm_cfg = dataclasses.replace(cfg.rm, model=init, out_dir=str(out / "rm"), seed=cfg.seed,
                                 progress=cfg.rm.progress and cfg.progress)
    trained = train_reward_model(rm_cfg, *rm_training_data(task, train_records))
    info.update(init=init, n_train=trained["n"], positive_fraction=trained["positive_fraction"],
                history=trained["history"], seconds=round(time.time() - t0, 1))
    if trained["positive_fraction"] in (0.0, 1.0):
        info["warning"] = ("its training samples were all " + ("wrong" if trained["positive_fraction"] == 0
                           else "correct") + ": it learned no ranking, so reranking is arbitrary")
    return trained["checkpoint"], info


def _rerank(cfg: CompareConfig, task: Task, rm_path: str, records_of: dict[str, list[dict]],
            results: dict[str, dict], device, dtype) -> dict:
    """Reranking@k' of every method (written into `results`); returns what the report says of it."""
    from reftune.inference.rerank import load_reward_model, rerank_curve, score_records

    t0 = time.time()
    rm, rm_tokenizer = load_reward_model(rm_path, device, dtype)
    for name, records in records_of.items():
        scores = score_records(rm, rm_tokenizer, task, records, cfg.rm.score_batch_size, cfg.rm.max_length)
        curve = rerank_curve(records, scores, cfg.k)
        results[name].update(rerank_accuracy=curve[cfg.k], rerank_curve=curve)
    return {"used": True, "path": rm_path, "scoring_seconds": round(time.time() - t0, 1)}
