"""`reftune sample`: k sampled CoTs per question of a split, graded, saved as JSONL.

The samples feed everything beyond greedy top-1: majority voting and reward-model reranking at
test time, and the training data of Offline self-training and of the reward model.

File format, one line per question (`{split}_samples.jsonl`):

    {"id": ..., "question": ..., "prompt": <the prompt as the model was given it>, "gold": "18",
     "samples": [{"completion": <full CoT>, "answer": "18" | null, "correct": true}, ...]}

`completion` is the full CoT (`task.completion_text`: with `program_header_in_prompt` the header
that was part of the prompt is put back), i.e. exactly what SFT would train on and what a grader
or a reward model reads after `task.prompt(ex)`.

Resumable: questions are sampled in chunks and each chunk is appended when done; a rerun skips
the ids already in the file. A kill can leave a torn last line, which is detected and dropped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reftune.inference.evaluate import ModelOnSplit, sample_split  # noqa: F401  (sample_split re-exported)
from reftune.inference.passk import pass_at_k_curve
from reftune.options import SampleFile
from reftune.tasks import Example, Task
from reftune.validate import Checks


@dataclass
class SampleConfig(SampleFile, ModelOnSplit):
    """`reftune sample`: k sampled CoTs per question of a split, graded, as resumable JSONL."""

    out_dir: str = "runs/sample"
    """Run folder; the samples go to `{split}_samples.jsonl` in it (a rerun resumes it)."""
    chunk_size: int = 32

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).out_dir()


def read_samples(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a samples file. A torn last line (a kill while appending) is dropped, and with
    `repair` also cut from the file so appends start on a clean line. A bad line elsewhere is an
    error: that is not a torn write but a damaged file."""
    from reftune.runs import read_jsonl

    records = read_jsonl(path, strict=True, repair=repair)
    for number, r in enumerate(records, 1):
        if not (isinstance(r.get("id"), str) and isinstance(r.get("samples"), list)):
            raise ValueError(f"{path}: record {number} is not a samples record (needs an id and a list of samples)")
    return records


def append_samples(path: str | Path, records: list[dict]) -> None:
    """Append records, one JSON line each, in one write followed by fsync."""
    if not records:
        return
    with Path(path).open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def check_same_questions(path, records, examples_by_id: dict[str, Example]) -> None:
    """Ids are only row numbers for some tasks (the built-in one renumbers when the generator
    changes): a record whose question is not its example's belongs to another task version."""
    for r in records:
        ex = examples_by_id.get(r["id"])
        if ex is not None and r.get("question") != ex.question:
            raise ValueError(f"{path}: question {r['id']!r} differs from the task's question with that id: the "
                             f"samples were drawn for another version of the task or data; use another file")


def sample_to_file(generator, task: Task, examples: list[Example], path: str | Path, k: int,
                   temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                   chunk_size: int = 32, seed: int = 0, progress: bool = True) -> list[dict]:
    """`sample_split` over `examples` in chunks appended to `path`, resuming what is there.

    Returns the records of `examples` in their order (the ones from earlier runs included).
    Chunks are fixed by position in `examples`, and chunk i reseeds the sampler with `seed + i`,
    so an interrupted and resumed run writes the same samples as an uninterrupted one (same
    engine and device; the lines of a chunk cut halfway come in another order).
    """
    from reftune.runs import progress as progress_bar

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = {ex.id: ex for ex in examples}
    done = {r["id"]: r for r in read_samples(path, repair=True) if r["id"] in wanted}
    check_same_questions(path, done.values(), wanted)
    short = [i for i, r in done.items() if len(r["samples"]) < k]
    if short:
        raise ValueError(f"{path} holds fewer than k={k} samples for {len(short)} question(s) (e.g. {short[0]}): "
                         f"it was written with another k; use another file")
    bar = progress_bar(len(examples), f"sample {path.stem}", disable=not progress)
    bar.update(len(done))
    for chunk_index, start in enumerate(range(0, len(examples), chunk_size)):
        chunk = examples[start:start + chunk_size]
        if all(ex.id in done for ex in chunk):
            continue
        # A chunk cut halfway (a kill during its append) is sampled whole again, with its own seed,
        # and only its missing questions are appended: the same samples as an uninterrupted run.
        torch.manual_seed(seed + chunk_index)
        if getattr(generator, "rng", None) is not None:
            generator.rng.manual_seed(seed + chunk_index)
        records = [r for r in sample_split(generator, task, chunk, k, temperature, top_p, max_new_tokens)
                   if r["id"] not in done]
        append_samples(path, records)
        done.update((r["id"], r) for r in records)
        bar.update(len(records))
    bar.close()
    return [done[ex.id] for ex in examples]


def sample_accuracy(records: list[dict]) -> float:
    """Fraction of all samples that are correct (the pass rate of a single sample)."""
    n = sum(len(r["samples"]) for r in records)
    return sum(s["correct"] for r in records for s in r["samples"]) / max(n, 1)


def pass_at_summary(records: list[dict]) -> dict:
    """`pass@k` for every k up to the samples per question (unbiased: reftune.inference.passk), as
    flat `pass@1`, `pass@2`, ... keys; `pass@n` is the share of questions with a correct sample."""
    return {f"pass@{k}": v for k, v in pass_at_k_curve(records).items()}


# Settings that may change between a run and its resumption: they do not change what is sampled.
RESUME_FREE = ("out_dir", "chunk_size", "gen_batch_size", "device", "progress")


def sample_origin(cfg: SampleConfig) -> dict:
    """What decides the samples in a file: every setting but RESUME_FREE ones."""
    from reftune.config import to_dict

    return {k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE}


def origin_changes(samples_path: Path, origin: dict, run_dir: Path | None = None, cfg=None) -> list[str] | None:
    """Settings that differ from those the samples file was drawn with (its `.origin.json`
    sidecar; for files written before sidecars, the folder's config.yaml), or None when the file
    does not exist yet."""
    import json as _json

    from reftune.runs import config_changes

    if not samples_path.exists():
        return None
    sidecar = samples_path.with_name(samples_path.name + ".origin.json")
    if sidecar.exists():
        try:
            before = _json.loads(sidecar.read_text())
        except ValueError:
            return [f"{sidecar.name} (unreadable)"]
        return sorted(k for k in origin if before.get(k) != origin[k])
    if run_dir is not None and cfg is not None:
        return config_changes(run_dir, cfg, RESUME_FREE) or []
    return []


def run_sample(cfg: SampleConfig, overwrite: bool = False) -> dict:
    """Sample the split into `{out_dir}/{split}_samples.jsonl`; returns a summary (also saved).
    A rerun with the same settings resumes the file; other settings are refused unless
    `overwrite` (then the file is started again)."""
    from reftune.engines import make_generator
    from reftune.models import load_causal_lm, resolve_device, resolve_dtype
    from reftune.runs import RunFolderError, claim_run, note, write_json
    from reftune.inference.voting import voting_accuracy

    # 1. Config, task, split, model files and prompt lengths checked; then the folder is claimed
    # (a rerun into the same folder resumes, if it samples the same way).
    task, tokenizer = cfg.checked_task()
    examples = getattr(task, cfg.split)
    folder = claim_run(cfg.out_dir, "reftune sample")
    try:
        path = folder.path / f"{cfg.split}_samples.jsonl"
        origin = sample_origin(cfg)
        changed = origin_changes(path, origin, folder.path, cfg)
        if changed and not overwrite:
            raise RunFolderError(f"{folder.path} holds samples drawn with other settings ({', '.join(changed)} "
                                 f"differ); use another out_dir, the same settings to resume, or --overwrite to "
                                 f"replace them")
        run_dir = folder.begin(cfg)
        if overwrite and path.exists():
            path.unlink()
            note(f"{path}: --overwrite: the earlier samples are replaced")
        write_json(path.with_name(path.name + ".origin.json"), origin)

        # 2. Model and generator.
        device = resolve_device(cfg.device)
        model = load_causal_lm(cfg.model, device, resolve_dtype(cfg.dtype, device))
        generator = make_generator(cfg.engine, model, tokenizer, cfg.gen_batch_size, seed=cfg.seed, model_path=cfg.model)

        # 3. Sample chunk by chunk, appending (and resuming) the file.
        start = time.time()
        records = sample_to_file(generator, task, examples, path, cfg.k, cfg.temperature, cfg.top_p,
                                 cfg.max_new_tokens, cfg.chunk_size, cfg.seed, cfg.progress)
    except BaseException:
        folder.release()
        raise

    # 4. Summary: what a single sample, voting and the best of k achieve.
    summary = {"path": str(path), "model": cfg.model, "task": task.name, "split": cfg.split, "n": len(records),
               "k": cfg.k, "sample_accuracy": sample_accuracy(records),
               f"vote_accuracy@{cfg.k}": voting_accuracy(records, task.answer_type, cfg.k),
               **pass_at_summary(records), "seconds": round(time.time() - start, 1)}
    write_json(run_dir / f"{cfg.split}_samples_summary.json", summary)
    folder.release()
    return summary


def check_samples_origin(samples_path: Path, origin: dict) -> None:
    """Samples files resume across reruns; refuse one drawn from another checkpoint or with other
    settings (a sidecar `.origin.json` records them), instead of silently mixing the two."""
    from reftune.runs import write_json

    sidecar = samples_path.with_name(samples_path.name + ".origin.json")
    if samples_path.exists() and sidecar.exists():
        before = json.loads(sidecar.read_text())
        changed = sorted(k for k in origin if before.get(k) != origin[k])
        if changed:
            raise ValueError(f"{samples_path} was drawn with other {', '.join(changed)}; "
                             f"use another out_dir (or delete the file) to compare other checkpoints")
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(sidecar, origin)
