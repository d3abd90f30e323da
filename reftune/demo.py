"""`reftune demo`: the whole method end to end on the built-in task with a tiny model, on a CPU.

1. build a tiny Llama + tokenizer from the task's text (saved like any Hub model),
2. SFT for `sft.epochs` epochs; the warm-up model is epoch `warmup_epoch`, the SFT baseline the
   best epoch on the validation split (the paper's protocol, with validation instead of test),
3. ReFT (PPO) from the warm-up checkpoint, best step chosen on validation,
4. greedy top-1 accuracy of every model on the test split, a report and `summary.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune.ppo import ReFTConfig
from reftune.sft import SFTConfig
from reftune.tasks import DataConfig
from reftune.tiny import TinyModelConfig


def _demo_data() -> DataConfig:
    return DataConfig(name="arithmetic", style="program", n_train=2000, n_test=400, validation_size=200,
                      min_steps=2, max_steps=3, max_number=20)


def _demo_sft() -> SFTConfig:
    return SFTConfig(epochs=12, batch_size=32, lr=3e-3, eval_max_new_tokens=100, log_every=10)


def _demo_reft() -> ReFTConfig:
    return ReFTConfig(steps=200, questions_per_step=32, samples_per_prompt=1, mini_batch_size=8, lr=3e-5,
                      max_new_tokens=100, eval_max_new_tokens=100, eval_every=20, save_every=50)


@dataclass
class DemoConfig:
    """`reftune demo`: every stage on the built-in task with a tiny model."""

    out_dir: str = "runs/demo"
    """Run folder: the tiny model, each stage's run, summary.json and report.md."""
    quick: bool = False
    """A run of seconds for tests: few problems, epochs and steps (accuracy is meaningless)."""
    seed: int = 0
    """Seed of the task, the model's init, and every stage."""
    warmup_epoch: int = 3
    """SFT epoch whose checkpoint is the warm-up model ReFT starts from."""
    threads: int = 0
    """CPU threads for torch (0: leave torch's default)."""
    data: DataConfig = field(default_factory=_demo_data)
    """The built-in task."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Size of the tiny model."""
    sft: SFTConfig = field(default_factory=_demo_sft)
    """SFT settings (model, data and out_dir are set by the demo)."""
    reft: ReFTConfig = field(default_factory=_demo_reft)
    """ReFT settings (model, data and out_dir are set by the demo)."""


def apply_quick(cfg: DemoConfig) -> None:
    """Shrink everything so the demo runs in well under a minute (for tests)."""
    cfg.data.n_train, cfg.data.n_test, cfg.data.validation_size = 64, 32, 16
    cfg.tiny.hidden_size, cfg.tiny.intermediate_size, cfg.tiny.num_layers, cfg.tiny.vocab_size = 32, 64, 2, 300
    cfg.sft.epochs, cfg.sft.batch_size = 2, 16
    cfg.warmup_epoch = 1
    cfg.reft.steps, cfg.reft.questions_per_step, cfg.reft.mini_batch_size = 2, 8, 4
    cfg.reft.eval_every, cfg.reft.save_every = 2, 2
    cfg.reft.max_new_tokens = cfg.reft.eval_max_new_tokens = cfg.sft.eval_max_new_tokens = 40


def run_demo(cfg: DemoConfig) -> dict:
    from reftune.evaluate import evaluate, save_predictions
    from reftune.generation import make_generator
    from reftune.modeling import load_causal_lm, load_tokenizer, resolve_device
    from reftune.ppo import run_reft
    from reftune.report import write_demo_report
    from reftune.sft import run_sft
    from reftune.tasks import load_task
    from reftune.tiny import build_tiny_model, tokenizer_corpus
    from reftune.tracking import start_run, write_json

    start = time.time()
    if cfg.quick:
        apply_quick(cfg)
    if not 1 <= cfg.warmup_epoch <= cfg.sft.epochs:
        raise ValueError(f"warmup_epoch must be between 1 and sft.epochs={cfg.sft.epochs}, got {cfg.warmup_epoch}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    for stage in ("tiny", "sft", "reft"):
        if (out / stage).exists():
            raise FileExistsError(f"{out} already holds a demo run ({out / stage}); choose another --out or delete it")
    start_run(out, cfg)
    cfg.data.seed = cfg.tiny.seed = cfg.sft.seed = cfg.reft.seed = cfg.seed
    task = load_task(cfg.data)
    print(f"[demo] task {task.name} ({task.style} CoT): {len(task.train)} train, {len(task.validation)} validation, "
          f"{len(task.test)} test questions", flush=True)

    # 1. Tiny model, saved like a Hub model.
    model_dir = build_tiny_model(out / "tiny", tokenizer_corpus(task), cfg.tiny)

    # 2. One SFT run: warm-up = an early epoch, SFT baseline = best epoch on validation.
    cfg.sft.model, cfg.sft.data, cfg.sft.out_dir = str(model_dir), cfg.data, str(out / "sft")
    cfg.sft.save_epochs = sorted({cfg.warmup_epoch, *range(1, cfg.sft.epochs + 1)})
    sft = run_sft(cfg.sft, task=task)
    warmup_ckpt, sft_ckpt = sft["checkpoints"][cfg.warmup_epoch], sft["best_checkpoint"]

    # 3. ReFT from the warm-up checkpoint.
    cfg.reft.model, cfg.reft.data, cfg.reft.out_dir = warmup_ckpt, cfg.data, str(out / "reft")
    reft = run_reft(cfg.reft, task=task)

    # 4. Greedy test accuracy of each model.
    device = resolve_device(cfg.sft.device)
    results = {}
    for name, path in {"warmup": warmup_ckpt, "sft": sft_ckpt, "reft": reft["best_checkpoint"]}.items():
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, device, torch.float32)
        summary, predictions = evaluate(make_generator(cfg.reft.engine, model, tokenizer, cfg.reft.gen_batch_size),
                                        task, task.test, cfg.reft.eval_max_new_tokens)
        save_predictions(out / "eval" / name, summary, predictions, "test")
        results[name] = {"accuracy": summary["accuracy"], "n": summary["n"], "checkpoint": path}
        print(f"[demo] {name:7s} greedy test accuracy {summary['accuracy']:.3f} (n={summary['n']})", flush=True)

    summary = {
        "task": task.name, "style": task.style, "seed": cfg.seed, "quick": cfg.quick,
        "warmup_epoch": cfg.warmup_epoch, "sft_best_epoch": sft["best_epoch"],
        **results,
        "wall_seconds": round(time.time() - start, 1),
    }
    write_json(out / "summary.json", summary)
    write_demo_report(out, summary, sft["history"], reft["history"])
    print(f"[demo] done in {summary['wall_seconds']:.0f}s; report: {out / 'report.md'}", flush=True)
    return summary


def load_summary(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())
