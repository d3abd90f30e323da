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

from reftune.engines import Generator, make_generator
from reftune.inference.evaluate import evaluate
from reftune.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype, resolve_mixed_precision
from reftune.model_files import check_model_source
from reftune.options import EVAL_SPLITS, Evaluation, LoRA, Optimizer, Sampling, TrainRuntime
from reftune.prompt_guard import guard_prompts, model_context
from reftune.validate import Checks
from reftune.runs import RunFolder, RunLogger, claim_run, prepare_training_folder, progress, write_json
from reftune.tasks import DataConfig, Task, load_task
from reftune.trainers.distributed import (Dist, copy_into, device_for, full_state_dict, init_distributed,
                                          load_optimizer_state, optimizer_state, wrap)
from reftune.trainers.lora import adapter_state, apply_lora, is_peft, load_adapter_state, lora_enabled, merged_state_dict
from reftune.trainers.rollout import step_questions
from reftune.trainers.checkpoints import load_latest, rng_state, save_best, save_rl_checkpoint, set_rng_state



@dataclass
class RunConfig(LoRA, TrainRuntime):
    """Fields every trainer has: the model, the task, the run folder, plus the runtime and LoRA sections."""

    model: str = ""
    """Model to start from: Hugging Face id or local folder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task and data files."""
    out_dir: str = "runs/run"
    """Run folder: config, metrics, checkpoints."""

    def validate(self, prefix: str = "") -> None:
        """Refuse a bad config before any model is loaded or any folder written: every field's type
        and range, one message naming the key, the value and what is allowed."""
        super().validate(prefix)
        Checks(self, prefix).str("model").out_dir()
        self.data.validate(prefix + "data.")


@dataclass
class OnlineConfig(Evaluation, Sampling, Optimizer, RunConfig):
    """Fields of the trainers that sample from the policy every step (ReFT, Online-ST)."""

    steps: int = 100
    """Iterations (each: one rollout batch, then the trainer's updates)."""
    questions_per_step: int = 32
    """Training questions sampled per iteration (the release: 32)."""
    samples_per_prompt: int = 1
    """CoTs sampled per question (the paper: 1)."""
    mini_batch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 3e-7  # the release: 3e-7 for 7B, 3e-6 for 125M; constant
    max_new_tokens: int = 400  # the release: 700 in all with a prompt of up to 300
    eval_max_new_tokens: int = 400
    eval_every: int = 10
    """Iterations between greedy evaluations (0: only at the end)."""
    save_every: int = 10
    """Iterations between resumable checkpoints (0: only at the end)."""
    logprob_chunk_size: int = 0
    """Response tokens per chunk when computing log-probs from the hidden states (0: all at once); bounds the (batch, chunk, vocab) logits held at once."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.int("steps", 1).int("questions_per_step", 1).int("samples_per_prompt", 1).int("mini_batch_size", 1)
        c.int("eval_every", 0).choice("eval_split", EVAL_SPLITS).int("save_every", 0).int("logprob_chunk_size", 0)


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
    folder: RunFolder | None = None
    """The claimed run folder (its lock); `release()` it when the run ends. None on ranks other than 0."""
    dist: Dist = field(default_factory=Dist)
    """This process's place among the launched ones (one process: rank 0 of 1)."""
    train_model: torch.nn.Module | None = None
    """What training forwards and backwards go through: `model`, or its DDP wrapper."""
    rollout_model: torch.nn.Module | None = None
    """What the engine samples from: `model`, or an unsharded replica under fsdp2."""


class NullLogger:
    """The metrics log of ranks other than 0: rank 0 alone writes (metrics are all-reduced first)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def claim_folder(out_dir: str, dist: Dist, *, resume: bool, overwrite: bool, command: str,
                 resumable: bool = True) -> tuple[RunFolder | None, str]:
    """Rank 0 claims the run folder (a lock) and decides how to start (runs.prepare_training_folder:
    fresh, resume or refuse); the other ranks wait for its verdict, and an error is raised on every
    rank. Returns (the folder, or None on other ranks; the mode)."""
    folder, mode, failure = None, None, None
    if dist.is_main:
        try:
            folder = claim_run(out_dir, f"reftune {command}")
            mode = prepare_training_folder(folder, resume=resume, overwrite=overwrite, command=command,
                                           resumable=resumable)
        except BaseException as e:  # noqa: BLE001  (re-raised below, on every rank)
            failure = e
            if folder is not None:
                folder.release()
    failure, mode = dist.broadcast((failure, mode))
    if failure is not None:
        raise failure
    return folder, mode


def open_run(cfg: RunConfig, *, resume: bool = False, task: Task | None = None, engine: str = "auto",
             gen_batch_size: int = 64, sampler_seed: int | None = None,
             check_task: Callable[[Task], None] | None = None, overwrite: bool = False,
             command: str = "train") -> OpenedRun:
    """Validate, resolve device and precision, load and check the task, claim the run folder (a
    lock), find the resume point (runs.prepare_training_folder states the rules), check the model
    files and the prompt lengths, then write the config, seed, load tokenizer + policy and build
    the engine. Nothing is written before all of that has been checked."""
    cfg.validate()
    dist = init_distributed(cfg.parallel)
    device = device_for(dist, resolve_device(cfg.device))
    amp = resolve_mixed_precision(cfg.mixed_precision, device)
    dtype = resolve_dtype(cfg.dtype, device)
    task = task or load_task(cfg.data)
    if check_task is not None:
        check_task(task)
    check_model_source(cfg.model)
    folder, mode = claim_folder(cfg.out_dir, dist, resume=resume, overwrite=overwrite, command=command)
    try:
        latest = load_latest(Path(cfg.out_dir)) if mode == "resume" else None
        # With LoRA a resume starts from the base again and loads the adapter from the trainer state.
        policy_path = str(latest[0] / "policy") if latest and not lora_enabled(cfg) else cfg.model
        for path in {policy_path, getattr(cfg, "ref_model", "") or cfg.model}:
            check_model_source(path)
        tokenizer = load_tokenizer(policy_path)
        eval_split = getattr(cfg, "eval_split", "none")
        task = guard_prompts(task, tokenizer, model_context(policy_path), cfg.data,
                             ("train",) + ((eval_split,) if eval_split in EVAL_SPLITS else ()))
        run_dir = folder.begin(cfg) if folder is not None else Path(cfg.out_dir)
    except BaseException:
        if folder is not None:
            folder.release()
        raise
    dist.barrier()  # the folder is ready before any rank reads from it
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(policy_path, device, dtype, quantize=cfg.lora_quantize)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_enabled(cfg):
        model = apply_lora(model, cfg)
        if latest is not None:
            if "adapter" not in latest[1]:
                raise ValueError(f"{latest[0]}: no LoRA adapter in this checkpoint (was the run trained with lora_r=0?)")
            load_adapter_state(model, latest[1]["adapter"])
    rollout_model = model
    if dist.sharded:  # rollouts and evaluation run on an unsharded replica (see trainers/distributed.py)
        rollout_model = load_causal_lm(policy_path, device, dtype).eval().requires_grad_(False)
    train_model = wrap(model, dist)
    if sampler_seed is not None and dist.enabled:
        sampler_seed += 1_000_003 * dist.rank  # each rank samples its own questions with its own stream
    generator = make_generator(engine, rollout_model, tokenizer, gen_batch_size, seed=sampler_seed,
                               model_path=policy_path)
    logger = RunLogger(run_dir, cfg.tensorboard) if dist.is_main else NullLogger()
    return OpenedRun(run_dir, device, amp, dtype, task, tokenizer, model, generator, logger, latest, folder,
                     dist, train_model, rollout_model)


class OnlineRun:
    """The step loop of ReFT and Online-ST around the trainer's own work (see the module doc)."""

    def __init__(self, cfg: OnlineConfig, name: str, *, resume: bool = False, task: Task | None = None,
                 callbacks: Callbacks | None = None, overwrite: bool = False, command: str | None = None):
        self.cfg, self.name, self.callbacks = cfg, name, callbacks or Callbacks()
        opened = open_run(cfg, resume=resume, task=task, engine=cfg.engine, gen_batch_size=cfg.gen_batch_size,
                          sampler_seed=cfg.seed, overwrite=overwrite, command=command or name)
        self.folder = opened.folder
        self.run_dir, self.device, self.amp, self.task = opened.run_dir, opened.device, opened.amp, opened.task
        self.tokenizer, self.model, self.generator = opened.tokenizer, opened.model, opened.generator
        self.logger, self.latest = opened.logger, opened.latest
        self.dist, self.train_model, self.rollout_model = opened.dist, opened.train_model, opened.rollout_model
        self.eval_examples = self.task.validation if cfg.eval_split == "validation" else self.task.test
        self.optimizer: torch.optim.Optimizer | None = None
        self.value_head: torch.nn.Module | None = None
        self.start_step, self.best_accuracy, self.history = 0, -1.0, []
        self.rollout_source = None
        """A source sampling ahead (async_rollout): its checkpoints hold the rollouts it has in flight."""
        self._bar = None

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the trainer's forwards should go through for an extra trained module (the value head)."""
        return wrap(module, self.dist)

    def attach(self, optimizer: torch.optim.Optimizer, value_head: torch.nn.Module | None = None) -> None:
        """Register what checkpoints hold besides the policy; when resuming, restore it, the RNG
        state and the loop's own state (step, best accuracy, history)."""
        self.optimizer, self.value_head = optimizer, value_head
        # Every module the optimizer steps, as one tree: under fsdp2 optimizer state is keyed by it.
        self._optimized = torch.nn.ModuleList([m for m in (self.train_model, value_head) if m is not None])
        if self.latest:
            path, state = self.latest
            if value_head is not None:
                load_state(value_head, torch.load(path / "value_head.pt"), self.dist)
            load_optimizer_state(self._optimized, optimizer, state["optimizer"], self.dist)
            rng = state.get("rng_per_rank", [state["rng"]])
            if len(rng) != self.dist.world_size:
                raise ValueError(f"{path} was written by {len(rng)} process(es), this run has {self.dist.world_size}: "
                                 f"resume with the same number of processes")
            set_rng_state(rng[self.dist.rank], self.generator)
            self.start_step, self.best_accuracy, self.history = state["step"], state["best_accuracy"], state["history"]
        self.logger.truncate_after(self.start_step)

    def questions(self, step: int) -> list:
        """This rank's share of step `step`'s questions (all of them with one process)."""
        picked = step_questions(self.task.train, step, self.cfg.questions_per_step, self.cfg.seed)
        return self.dist.slice(picked, "questions_per_step")

    def average(self, metrics: dict) -> dict:
        """Each metric averaged over the ranks (every rank has the same number of rows, so the mean
        of per-rank means is the mean over the whole batch)."""
        if not self.dist.enabled:
            return metrics
        keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        sums = self.dist.sum_floats(*(float(metrics[k]) for k in keys))
        return {**metrics, **{k: v / self.dist.world_size for k, v in zip(keys, sums)}}

    def steps(self):
        """The 0-based steps still to run."""
        if self.optimizer is None:
            raise RuntimeError("OnlineRun.attach(optimizer, ...) must come before steps()")
        self._bar = progress(self.cfg.steps, self.name, disable=not self.cfg.progress or not self.dist.is_main)
        self._bar.update(self.start_step)
        try:
            for step in range(self.start_step, self.cfg.steps):
                if self.callbacks.on_step_begin:
                    self.callbacks.on_step_begin(step)
                yield step
        except BaseException:
            self.release()  # an interrupt or error inside the loop: the folder is free again
            raise
        self._bar.close()

    def release(self) -> None:
        """Let go of the run folder's lock (finish and fail do it; idempotent)."""
        if self.folder is not None:
            self.folder.release()

    def fail(self, what: str, value: float, step: int) -> None:
        """Stop on a non-finite loss or statistic; the last checkpoint stays the resume point."""
        self.release()
        raise FloatingPointError(f"{self.name}: {what} is {value} at step {step}; "
                                 f"last good checkpoint: {self.run_dir / 'latest.json'}")

    def sync_weights(self) -> None:
        """After an update: the engine must sample the updated policy (an fsdp2 replica first)."""
        if self.dist.sharded:
            copy_into(self.rollout_model, self.train_model, self.dist)
        self.generator.sync_weights()

    def evaluate(self) -> float:
        """Greedy accuracy on `eval_split`, each rank taking a share of the questions."""
        return evaluate_split(self.generator, self.task, self.eval_examples, self.cfg.eval_max_new_tokens, self.dist)

    def _states(self) -> tuple[dict | None, dict | None]:
        """Whole state dicts of the policy and the value head for saving (collectives under fsdp2),
        or (None, None) when the modules themselves can be saved."""
        if is_peft(self.model):
            return merged_state_dict(self.model, device="cpu"), None
        if not self.dist.sharded:
            return None, None
        value_state = full_state_dict(self.value_head, self.dist) if self.value_head is not None else None
        return full_state_dict(self.model, self.dist), value_state

    def end_step(self, step: int, metrics: dict, postfix: dict | None = None) -> None:
        """After the step's updates: engine weight sync, periodic greedy evaluation (best policy by
        `eval_split` accuracy), history, metrics log and the resumable checkpoint when due."""
        cfg, done, dist = self.cfg, step + 1, self.dist
        self.sync_weights()  # the next rollout (and this eval) must sample the updated policy
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            accuracy = self.evaluate()
            metrics[f"eval/{cfg.eval_split}_accuracy"] = accuracy
            if accuracy > self.best_accuracy:
                self.best_accuracy = accuracy
                policy_state, value_state = self._states()
                if dist.is_main:
                    save_best(self.run_dir, self.model, self.tokenizer, self.value_head,
                              {"step": done, f"{cfg.eval_split}_accuracy": self.best_accuracy},
                              policy_state=policy_state, value_state=value_state)
                dist.barrier()
        # History travels inside checkpoints for resume; timings differ run to run, so they stay out.
        self.history.append({"step": done, **{k: v for k, v in metrics.items() if "seconds" not in k}})
        self.logger.log(done, metrics)
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix(**postfix)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            rngs = dist.gather(rng_state(self.generator))
            optim = optimizer_state(self._optimized, self.optimizer, dist)
            policy_state, value_state = self._states()
            in_flight = dist.gather(self.rollout_source.state_dict()) if self.rollout_source is not None else None
            if dist.is_main:
                state = {"step": done, "optimizer": optim, "rng": rngs[0], "best_accuracy": self.best_accuracy,
                         "history": self.history, **({"rng_per_rank": rngs} if dist.enabled else {}),
                         **({"rollouts_in_flight": in_flight} if in_flight is not None else {}),
                         **({"adapter": adapter_state(self.model)} if is_peft(self.model) else {})}
                save_rl_checkpoint(self.run_dir, done, self.model, self.tokenizer, self.value_head, state,
                                   policy_state=policy_state, value_state=value_state)
            dist.barrier()
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
        if self.dist.is_main:
            write_json(self.run_dir / "result.json", result)
        self.release()
        self.dist.barrier()
        return result


def evaluate_split(generator, task: Task, examples: list, max_new_tokens: int, dist: Dist) -> float:
    """Greedy accuracy on `examples`; with several processes each rank decodes a share and the
    correct counts are summed."""
    if not dist.enabled:
        return evaluate(generator, task, examples, max_new_tokens)[0]["accuracy"]
    share = dist.uneven_slice(examples)
    correct = 0.0
    if share:
        summary, _ = evaluate(generator, task, share, max_new_tokens)
        correct = summary["accuracy"] * summary["n"]
    total_correct, total = dist.sum_floats(correct, float(len(share)))
    return total_correct / max(total, 1.0)


def load_state(module: torch.nn.Module, state: dict, dist: Dist) -> None:
    """Load a whole (unsharded) state dict into a possibly fsdp2-sharded module."""
    if not dist.sharded:
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
