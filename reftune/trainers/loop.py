"""The loop every trainer shares: open a run, end a step, finish it.

    run = OnlineRun(cfg, "reft", resume=resume, task=task)     # config checked, folder, task, policy, engine
    run.attach(optimizer, value_head)                           # what checkpoints hold; restored on resume
    for step in run.steps():                                    # from the resumed step on
        ...  # the trainer's own work: rollout, losses, updates, metrics
        run.end_step(step, metrics)                             # sync engine, eval, best, log, checkpoint
    return run.finish(kl_coef=...)                              # result.json

`open_run` is the part SFT shares too (it has epochs, not RL steps). Everything a trainer does not
own lives here once: validation before any folder is written, device and precision, the run
folder, seeds, resume state, the logger, the generation engine and its weight sync, periodic
evaluation with the best checkpoint, history, resumable checkpoints and the result file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from reftune.engines import Generator, check_engine, make_generator
from reftune.inference.evaluate import evaluate
from reftune.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype, resolve_mixed_precision
from reftune.runs import RunLogger, progress, start_run, write_json
from reftune.tasks import DataConfig, Task, load_task
from reftune.trainers.checkpoints import load_latest, rng_state, save_best, save_rl_checkpoint, set_rng_state

EVAL_SPLITS = ("validation", "test")


@dataclass
class RunConfig:
    """Fields every trainer has."""

    model: str = ""
    """Model to start from: Hugging Face id or local folder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task and data files."""
    out_dir: str = "runs/run"
    """Run folder: config, metrics, checkpoints."""
    seed: int = 0
    """Seed for data order, sampling and dropout."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"""
    mixed_precision: str = "no"
    """Forward passes under bf16 autocast, weights and optimizer in fp32: no | bf16 | auto (where bf16 is native)."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        """Refuse a bad config before any model is loaded or any folder written."""


@dataclass
class OnlineConfig(RunConfig):
    """Fields of the trainers that sample from the policy every step (ReFT, Online-ST)."""

    steps: int = 100
    """Iterations (each: one rollout batch, then the trainer's updates)."""
    questions_per_step: int = 32
    """Training questions sampled per iteration (the release: 32)."""
    samples_per_prompt: int = 1
    """CoTs sampled per question (the paper: 1)."""
    mini_batch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 3e-7
    """AdamW learning rate, constant (the release: 3e-7 for 7B, 3e-6 for 125M)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    temperature: float = 1.0
    """Sampling temperature for rollouts."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts (1: off)."""
    max_new_tokens: int = 400
    """Longest sampled CoT (the release: 700 total incl. a prompt of up to 300)."""
    eval_every: int = 10
    """Iterations between greedy evaluations (0: only at the end)."""
    eval_split: str = "validation"
    """Split for periodic evaluation and best-checkpoint selection: validation | test."""
    eval_max_new_tokens: int = 400
    """Longest CoT in evaluation."""
    save_every: int = 10
    """Iterations between resumable checkpoints (0: only at the end)."""
    engine: str = "cached"
    """Generation engine (reftune.engines.ENGINES): cached (built-in KV-cache sampler) | hf (model.generate) | ..."""
    gen_batch_size: int = 64
    """Sequences decoded at once."""

    def validate(self) -> None:
        super().validate()
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        check_engine(self.engine)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be validation or test, got {self.eval_split!r}")


@dataclass
class Callbacks:
    """Seams for tests and tools, called by the loop (no monkeypatching of module names needed)."""

    on_step_begin: Callable[[int], None] | None = None
    """Called with the 0-based step before its rollout."""
    on_step_end: Callable[[int, dict], None] | None = None
    """Called with the number of steps done and the step's metrics, after its checkpoint."""


@dataclass
class OpenedRun:
    """A run after `open_run`: everything a trainer needs before its first update."""

    run_dir: Path
    device: torch.device
    amp: bool
    """Forward passes under bf16 autocast."""
    dtype: torch.dtype
    task: Task
    tokenizer: object
    model: torch.nn.Module
    """The policy: the configured model, or the last checkpoint's when resuming."""
    generator: Generator
    logger: RunLogger
    latest: tuple[Path, dict] | None
    """(checkpoint folder, trainer state) resumed from, or None."""


def open_run(cfg: RunConfig, *, resume: bool = False, task: Task | None = None, engine: str = "cached",
             gen_batch_size: int = 64, sampler_seed: int | None = None,
             check_task: Callable[[Task], None] | None = None) -> OpenedRun:
    """Validate, resolve device and precision, load and check the task, claim the run folder, seed,
    find the resume point, load tokenizer + policy and build the engine. Nothing is written before
    the config and the task have been checked."""
    cfg.validate()
    device = resolve_device(cfg.device)
    amp = resolve_mixed_precision(cfg.mixed_precision, device)
    dtype = resolve_dtype(cfg.dtype, device)
    task = task or load_task(cfg.data)
    if check_task is not None:
        check_task(task)
    run_dir = start_run(cfg.out_dir, cfg, resume=resume)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    latest = load_latest(run_dir) if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint there (latest.json missing)")
    policy_path = str(latest[0] / "policy") if latest else cfg.model
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, device, dtype)
    generator = make_generator(engine, model, tokenizer, gen_batch_size, seed=sampler_seed, model_path=policy_path)
    logger = RunLogger(run_dir, cfg.tensorboard)
    return OpenedRun(run_dir, device, amp, dtype, task, tokenizer, model, generator, logger, latest)


class OnlineRun:
    """The step loop of ReFT and Online-ST around the trainer's own work (see the module doc)."""

    def __init__(self, cfg: OnlineConfig, name: str, *, resume: bool = False, task: Task | None = None,
                 callbacks: Callbacks | None = None):
        self.cfg, self.name, self.callbacks = cfg, name, callbacks or Callbacks()
        opened = open_run(cfg, resume=resume, task=task, engine=cfg.engine, gen_batch_size=cfg.gen_batch_size,
                          sampler_seed=cfg.seed)
        self.run_dir, self.device, self.amp, self.task = opened.run_dir, opened.device, opened.amp, opened.task
        self.tokenizer, self.model, self.generator = opened.tokenizer, opened.model, opened.generator
        self.logger, self.latest = opened.logger, opened.latest
        self.eval_examples = self.task.validation if cfg.eval_split == "validation" else self.task.test
        self.optimizer: torch.optim.Optimizer | None = None
        self.value_head: torch.nn.Module | None = None
        self.start_step, self.best_accuracy, self.history = 0, -1.0, []
        self._bar = None

    def attach(self, optimizer: torch.optim.Optimizer, value_head: torch.nn.Module | None = None) -> None:
        """Register what checkpoints hold besides the policy; when resuming, restore it, the RNG
        state and the loop's own state (step, best accuracy, history)."""
        self.optimizer, self.value_head = optimizer, value_head
        if self.latest:
            path, state = self.latest
            if value_head is not None:
                value_head.load_state_dict(torch.load(path / "value_head.pt"))
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], self.generator)
            self.start_step, self.best_accuracy, self.history = state["step"], state["best_accuracy"], state["history"]
        self.logger.truncate_after(self.start_step)

    def steps(self):
        """The 0-based steps still to run."""
        if self.optimizer is None:
            raise RuntimeError("OnlineRun.attach(optimizer, ...) must come before steps()")
        self._bar = progress(self.cfg.steps, self.name, disable=not self.cfg.progress)
        self._bar.update(self.start_step)
        for step in range(self.start_step, self.cfg.steps):
            if self.callbacks.on_step_begin:
                self.callbacks.on_step_begin(step)
            yield step
        self._bar.close()

    def fail(self, what: str, value: float, step: int) -> None:
        """Stop on a non-finite loss or statistic; the last checkpoint stays the resume point."""
        raise FloatingPointError(f"{self.name}: {what} is {value} at step {step}; "
                                 f"last good checkpoint: {self.run_dir / 'latest.json'}")

    def end_step(self, step: int, metrics: dict, postfix: dict | None = None) -> None:
        """After the step's updates: engine weight sync, periodic greedy evaluation (best policy by
        `eval_split` accuracy), history, metrics log and the resumable checkpoint when due."""
        cfg, done = self.cfg, step + 1
        self.generator.sync_weights()  # the next rollout (and this eval) must sample the updated policy
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            summary, _ = evaluate(self.generator, self.task, self.eval_examples, cfg.eval_max_new_tokens)
            metrics[f"eval/{cfg.eval_split}_accuracy"] = summary["accuracy"]
            if summary["accuracy"] > self.best_accuracy:
                self.best_accuracy = summary["accuracy"]
                save_best(self.run_dir, self.model, self.tokenizer, self.value_head,
                          {"step": done, f"{cfg.eval_split}_accuracy": self.best_accuracy})
        # History travels inside checkpoints for resume; timings differ run to run, so they stay out.
        self.history.append({"step": done, **{k: v for k, v in metrics.items() if "seconds" not in k}})
        self.logger.log(done, metrics)
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix(**postfix)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            state = {"step": done, "optimizer": self.optimizer.state_dict(), "rng": rng_state(self.generator),
                     "best_accuracy": self.best_accuracy, "history": self.history}
            save_rl_checkpoint(self.run_dir, done, self.model, self.tokenizer, self.value_head, state)
        if self.callbacks.on_step_end:
            self.callbacks.on_step_end(done, metrics)

    def finish(self, **extra) -> dict:
        """Close the logger and write result.json: best and last checkpoints, history, `extra`."""
        self.logger.close()
        last = load_latest(self.run_dir)[0]
        result = {
            "best_checkpoint": str(self.run_dir / "checkpoints" / "best" / "policy"),
            "best_accuracy": self.best_accuracy,
            "last_checkpoint": str(last / "policy"),
            **extra,
            "history": self.history,
        }
        write_json(self.run_dir / "result.json", result)
        return result
