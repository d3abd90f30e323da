"""The loop every trainer shares: ReFT, Online-ST, SFT (and so Offline-ST) and the reward model.

A trainer keeps only its own work (rollouts, losses, updates, metrics); a run object does the rest,
once for all of them: the config checked before any folder is written, device and precision,
several processes (`dist`, the rows each one takes), the run folder (claimed, resumed or refused),
seeds, the metrics log and progress bar, the one resumable checkpoint format (trainers/checkpoints.py)
with the optimizer, LR schedule, data order and every RNG in it, the stop on a non-finite loss,
the engine's weight sync, evaluation with the best checkpoint, and result.json.

    TrainingRun                the folder and the loop state; `load_models` says what is trained
      PolicyRun                a causal-LM policy on a task with a generation engine
        OnlineRun              counted in steps: ReFT, Online-ST (below)
        SFTRun (sft.py)        counted in epochs, keeps chosen epochs, picks the best one
      RewardModelRun           counted in epochs, a sequence classifier, no engine (reward_model.py)

A trainer counted in steps (each: a rollout, then updates):

    run = OnlineRun(cfg, "reft", resume=resume, task=task)     # config checked, folder, task, policy, engine
    run.attach(optimizer, value_head)                           # what checkpoints hold; restored on resume
    for step in run.steps():                                    # from the resumed step on
        ...  # rollout, losses (run.fail(...) on a non-finite one), updates, metrics
        run.end_step(step, metrics)                             # sync engine, eval, best, log, checkpoint
    return run.finish(kl_coef=...)                              # result.json

A supervised trainer counted in epochs (SFT; the reward model likewise, without evaluation):

    with SFTRun(cfg, task=task, resume=resume) as run:          # `with`: the folder is let go on any error
        run.attach(optimizer, scheduler=scheduler, order_rng=order_rng)   # restored on resume
        for epoch in run.epochs(cfg.epochs, steps_per_epoch):   # from the epoch after the resumed one
            for batch in shuffled_batches(n, cfg.batch_size, run.order_rng):
                rows, stand_in = run.share(batch)               # this process's rows of the batch
                ...  # forwards and backwards
                grad_norm, lr = run.optimizer_step(loss, params)  # non-finite stop, clip, step, schedule
            run.end_epoch(epoch, record)                        # sync engine, eval, kept epoch, checkpoint
        return run.finish(...)                                  # result.json

The run folder holds config.yaml (written once the checks pass), metrics.jsonl (cut back to the
resume point on resume), the checkpoints (trainers/checkpoints.py: one format, with `latest.json`
naming the resume point: `checkpoints/step-N` for steps, `resume/` for epochs) and result.json.

A new trainer picks the run class by its unit, or subclasses one: `check_inputs` (before the folder
is claimed), `check_resume_point` (once the checkpoint to resume is known), `load_models` (what is
trained) and `restore_own` (its own keys of the trainer state) are the places to extend.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from reftune.engines import make_generator
from reftune.inference.evaluate import evaluate
from reftune.models import (enable_activation_checkpointing, is_peft, load_causal_lm, load_tokenizer, merged_state_dict, resolve_device, resolve_dtype,
                            resolve_mixed_precision)
from reftune.model_files import check_model_source
from reftune.options import EVAL_SPLITS, Evaluation, LoRA, Optimizer, Sampling, Tracking, TrainRuntime
from reftune.prompt_guard import guard_prompts, model_context
from reftune.validate import Checks
from reftune.runs import RunFolder, RunLogger, claim_run, prepare_training_folder, progress, write_json
from reftune.tasks import DataConfig, Task, load_task
from reftune.trainers.distributed import (Dist, copy_into, device_for, full_state_dict, init_distributed,
                                          load_optimizer_state, optimizer_state, scalar, wrap)
from reftune.trainers.lora import adapter_state, apply_lora, load_adapter_state, lora_enabled
from reftune.trainers.policy import check_model_options
from reftune.trainers.rollout import step_questions
from reftune.trainers.checkpoints import load_latest, rng_state, save_best, save_checkpoint, set_rng_state


@dataclass
class RunConfig(Tracking, LoRA, TrainRuntime):
    """Fields every trainer has: the model, the task, the run folder, plus the runtime, LoRA and tracking sections."""

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
    """Called with the 0-based step before its rollout (trainers counted in steps)."""
    on_step_end: Callable[[int, dict], None] | None = None
    """Called with the number of steps (epochs, for trainers counted in epochs) done and their metrics, after the checkpoint."""


class NullLogger:
    """The metrics log of ranks other than 0: rank 0 alone writes (metrics are all-reduced first)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict], name: str = "samples") -> None:
        pass

    def log_rollout(self, step: int, scored, tokenizer) -> None:
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


class TrainingRun:
    """A run folder being trained in, and the loop state every trainer has (see the module doc).

    Opening one: validate the config, join the processes, resolve device and precision, then
    `check_inputs`, claim the folder (runs.prepare_training_folder states the rules: fresh,
    resume, or refuse), find the resume point, `check_resume_point`, and only then write the
    config, seed, `load_models` and open the metrics log: nothing is written before all the checks.

    What a trainer reads: `cfg`, `dist` (this process among the launched ones), `device`, `amp`
    (forward passes under bf16 autocast), `dtype`, `run_dir`, `logger`, `latest` (checkpoint folder
    and trainer state resumed from, or None), `model` (what checkpoints save), `tokenizer`,
    `train_model` (what forwards and backwards go through: `model` or its data-parallel wrapper),
    `generator` (the engine, where there is one), `step` (optimizer steps, or RL steps, done),
    `epoch` (epochs done), `best_accuracy`, `history`."""

    unit = "step"
    """What the trainer counts: step (a rollout and its updates) or epoch (a pass over the data)."""
    use_trackers = True
    """Send metrics to the config's `report_to` trackers (False: metrics.jsonl only)."""

    def __init__(self, cfg, name: str, *, resume: bool = False, overwrite: bool = False, command: str | None = None,
                 resumable: bool = True, callbacks: Callbacks | None = None):
        cfg.validate()
        self.cfg, self.name, self.resumable, self.callbacks = cfg, name, resumable, callbacks or Callbacks()
        self.dist = init_distributed(cfg.parallel)
        self.device = device_for(self.dist, resolve_device(cfg.device))
        self.amp = resolve_mixed_precision(cfg.mixed_precision, self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = self.tokenizer = self.train_model = self.generator = self.value_head = None
        self.optimizer = self.scheduler = self.order_rng = None
        self.step, self.start_step, self.epoch, self.best_accuracy, self.history = 0, 0, 0, -1.0, []
        self.total_steps, self._bar = 0, None
        self.check_inputs()
        self.folder, mode = claim_folder(cfg.out_dir, self.dist, resume=resume, overwrite=overwrite,
                                         command=command or name, resumable=resumable)
        try:
            self.latest: tuple[Path, dict] | None = load_latest(Path(cfg.out_dir)) if mode == "resume" else None
            if self.latest:
                self._check_resumable(*self.latest)
            self.check_resume_point()
            self.run_dir = self.folder.begin(cfg) if self.folder is not None else Path(cfg.out_dir)
            self.dist.barrier()  # the folder is ready before any rank reads from it
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            self.load_models()
            self.logger = self.open_logger() if self.dist.is_main else NullLogger()
        except BaseException:
            self.release()
            raise

    # -- what a subclass says: its checks, its models, its own state

    def open_logger(self) -> RunLogger:
        """metrics.jsonl, plus the config's trackers when this run uses them."""
        if self.use_trackers:
            return RunLogger.for_run(self.run_dir, self.cfg)
        return RunLogger(self.run_dir, tensorboard=False)

    def check_inputs(self) -> None:
        """Checks before the run folder is claimed (the task, the model files)."""

    def check_resume_point(self) -> None:
        """Checks once `latest` (the checkpoint to resume, or None) is known, before anything is written."""

    def load_models(self) -> None:
        """Set `model` (saved in checkpoints), `tokenizer` and `train_model` (what forwards and
        backwards go through: `model`, or its data-parallel wrapper); `generator` where there is one."""
        raise NotImplementedError

    def restore_own(self, state: dict) -> None:
        """Read the trainer's own keys of a resumed trainer state."""

    # -- the loop

    def attach(self, optimizer: torch.optim.Optimizer, value_head: torch.nn.Module | None = None, *,
               scheduler=None, order_rng: random.Random | None = None) -> None:
        """Register what checkpoints hold besides the policy (the optimizer; ReFT's value head; the LR
        schedule and the data-order RNG of the epoch trainers); when resuming, restore them, every
        RNG and the loop's own state (step, epoch, best accuracy, history, `restore_own`'s)."""
        self.optimizer, self.value_head, self.scheduler, self.order_rng = optimizer, value_head, scheduler, order_rng
        # Every module the optimizer steps, as one tree: under fsdp2 optimizer state is keyed by it.
        self._optimized = torch.nn.ModuleList([m for m in (self.train_model, value_head) if m is not None])
        if self.latest:
            self._restore(*self.latest)
        self.logger.truncate_after(self.step)

    def _restore(self, path: Path, state: dict) -> None:
        if self.value_head is not None:
            load_state(self.value_head, torch.load(path / "value_head.pt"), self.dist)
        load_optimizer_state(self._optimized, self.optimizer, state["optimizer"], self.dist)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.order_rng is not None:
            self.order_rng.setstate(state["order_rng"])
        set_rng_state(state.get("rng_per_rank", [state["rng"]])[self.dist.rank], self.generator)
        self.step = self.start_step = state["step"]
        self.epoch, self.best_accuracy, self.history = state.get("epoch", 0), state["best_accuracy"], list(state["history"])
        self.restore_own(state)

    def _check_resumable(self, path: Path, state: dict) -> None:
        """Refuse, before anything is written, a checkpoint another trainer wrote (of the states
        written before they were labelled, an epoch trainer's has a data order, a step trainer's
        none) or another number of processes."""
        written = state.get("trainer")
        if written is None:
            written = "sft" if "order_rng" in state else "a trainer counted in steps (train, online-st)"
            mismatch = ("order_rng" in state) != (self.unit == "epoch")
        else:
            mismatch = written != self.name
        if mismatch:
            raise ValueError(f"{path} is a checkpoint of {written}, not of {self.name}: resume it with the command "
                             f"that wrote it, or start {self.name} in another out_dir")
        processes = len(state.get("rng_per_rank", [state["rng"]]))
        if processes != self.dist.world_size:
            raise ValueError(f"{path} was written by {processes} process(es), this run has {self.dist.world_size}: "
                             f"resume with the same number of processes")

    def share(self, batch: list) -> tuple[list, bool]:
        """This process's rows of a batch split over the processes, and whether they are a stand-in:
        a process left without rows (a last batch smaller than the world) runs the batch's first
        row with zero weight, since every process must take part in each backward."""
        rows = self.dist.uneven_slice(batch)
        return (rows, False) if rows else (batch[:1], True)

    def epochs(self, epochs: int, steps_per_epoch: int):
        """The 1-based epochs still to run, from the one after the resumed epoch, with a progress
        bar over their optimizer steps (`optimizer_step` advances it)."""
        self.total_steps = epochs * steps_per_epoch
        yield from self._units(range(self.epoch + 1, epochs + 1))

    def _units(self, units: range):
        """`units` (steps or epochs) with the progress bar open; an error or interrupt inside the
        loop lets go of the folder."""
        self._bar = progress(self.total_steps, self.name, disable=not self.cfg.progress or not self.dist.is_main)
        self._bar.update(self.step)
        try:
            yield from units
        except BaseException:
            self.release()
            raise
        self._bar.close()

    def optimizer_step(self, loss: float, params) -> tuple[float, float]:
        """One optimizer step of a supervised trainer after its backward passes: stop on a
        non-finite `loss` (the batch's, summed over the processes), clip the gradients of `params`
        to `max_grad_norm`, step the optimizer and the schedule. Returns (the gradient norm before
        clipping, the learning rate used)."""
        self.step += 1
        if not math.isfinite(loss):
            self.fail("loss", loss, self.step)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._bar.update(1)
        return scalar(grad_norm), lr

    def set_postfix(self, **values) -> None:
        """Shown beside the progress bar."""
        self._bar.set_postfix(**values)

    def release(self) -> None:
        """Let go of the run folder's lock (finishing and failing do it; idempotent)."""
        if self.folder is not None:
            self.folder.release()

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # whatever stopped the trainer, the folder is free again

    def fail(self, what: str, value: float, step: int) -> None:
        """Stop on a non-finite loss or statistic; the last checkpoint stays the resume point."""
        self.release()
        pointer = self.run_dir / "latest.json"
        kept = (f"last good checkpoint: {pointer}" if pointer.exists() else "no checkpoint was written yet") \
            if self.resumable else "nothing was saved"
        raise FloatingPointError(f"{self.name}: {what} is {value} at step {step}; {kept} "
                                 f"(try a lower lr, or check the data)")

    # -- checkpoints and the result

    def weights(self) -> tuple[dict | None, dict | None]:
        """Whole state dicts of the policy and the value head for saving (collectives under fsdp2;
        with LoRA the merged weights, so every saved policy is a plain model), or (None, None) when
        the modules themselves can be saved. Every process calls it."""
        if is_peft(self.model):
            return merged_state_dict(self.model, device="cpu"), None
        if not self.dist.sharded:
            return None, None
        value_state = full_state_dict(self.value_head, self.dist) if self.value_head is not None else None
        return full_state_dict(self.model, self.dist), value_state

    def _modules(self, value_state: dict | None) -> dict[str, dict]:
        if self.value_head is None:
            return {}
        return {"value_head": value_state if value_state is not None else self.value_head.state_dict()}

    def save_checkpoint(self, folder: str, *, states: tuple | None = None, policy_from: Path | None = None,
                        keep_last: int = 0, own: dict | None = None) -> None:
        """The resumable checkpoint `folder` in the one format (trainers/checkpoints.py): the policy,
        the value head, and the trainer state (loop state, optimizer, schedule, data order, every
        process's RNG, a LoRA adapter, `own`: the trainer's keys); `latest.json` names it, with the
        epoch for trainers counted in epochs. `states`: what `weights()` returned, when the caller
        has it already; `policy_from`, `keep_last`: see checkpoints.save_checkpoint. Every process
        calls it (collectives under fsdp2); rank 0 writes."""
        dist = self.dist
        rngs = dist.gather(rng_state(self.generator))
        optim = optimizer_state(self._optimized, self.optimizer, dist)
        policy_state, value_state = states if states is not None else self.weights()
        if dist.is_main:
            state = {"trainer": self.name, "step": self.step, "optimizer": optim, "rng": rngs[0],
                     "best_accuracy": self.best_accuracy, "history": self.history, **(own or {})}
            if dist.enabled:
                state["rng_per_rank"] = rngs
            if is_peft(self.model):
                state["adapter"] = adapter_state(self.model)
            if self.scheduler is not None:
                state["scheduler"] = self.scheduler.state_dict()
            if self.order_rng is not None:
                state["order_rng"] = self.order_rng.getstate()
            pointer = {"epoch": self.epoch} if self.epoch else {}
            state.update(pointer)
            save_checkpoint(self.run_dir, folder, self.model, self.tokenizer, state, modules=self._modules(value_state),
                            policy_state=policy_state, policy_from=policy_from, pointer=pointer, keep_last=keep_last)
        dist.barrier()

    def write_result(self, result: dict) -> dict:
        """Close the metrics log, write result.json (rank 0), let go of the folder; returns `result`."""
        self.logger.close()
        if self.dist.is_main:
            write_json(self.run_dir / "result.json", result)
        self.release()
        self.dist.barrier()
        return result


class PolicyRun(TrainingRun):
    """A run that trains a causal-LM policy on a task and decodes with a generation engine (SFT,
    ReFT, Online-ST): the task checked (`check_task`, the prompts against the model's context),
    the policy loaded (the resumed checkpoint's; LoRA; under fsdp2 an unsharded replica for the
    engine), the engine's weight sync, greedy evaluation on `eval_split`, `checkpoints/best`."""

    seeded_sampler = False
    """Give the engine a sampling seed (each process its own stream): the trainers that sample."""

    def __init__(self, cfg, name: str, *, task: Task | None = None, check_task: Callable[[Task], None] | None = None,
                 **options):
        self.task, self._check_task = task, check_task
        super().__init__(cfg, name, **options)
        self.eval_examples = {"validation": self.task.validation, "test": self.task.test}.get(cfg.eval_split, [])

    def check_inputs(self) -> None:
        self.task = self.task or load_task(self.cfg.data)
        if self._check_task is not None:
            self._check_task(self.task)
        check_model_source(self.cfg.model)

    def check_resume_point(self) -> None:
        cfg = self.cfg
        # With LoRA a resume starts from the base again and loads the adapter from the trainer state.
        self.policy_path = str(self.latest[0] / "policy") if self.latest and not lora_enabled(cfg) else cfg.model
        for path in {self.policy_path, getattr(cfg, "ref_model", "") or cfg.model}:
            check_model_source(path)
        self.tokenizer = load_tokenizer(self.policy_path)
        splits = ("train",) + ((cfg.eval_split,) if cfg.eval_split in EVAL_SPLITS else ())
        self.task = guard_prompts(self.task, self.tokenizer, model_context(self.policy_path), cfg.data, splits)

    def load_models(self) -> None:
        cfg, dist = self.cfg, self.dist
        model = load_causal_lm(self.policy_path, self.device, self.dtype, quantize=cfg.lora_quantize)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if lora_enabled(cfg):
            model = apply_lora(model, cfg)
            if self.latest is not None:
                if "adapter" not in self.latest[1]:
                    raise ValueError(f"{self.latest[0]}: no LoRA adapter in this checkpoint (was the run trained "
                                     f"with lora_r=0?)")
                load_adapter_state(model, self.latest[1]["adapter"])
        check_model_options(cfg, model)  # model-dependent options, before any rollout
        self.model = self.rollout_model = model
        if dist.sharded:  # rollouts and evaluation run on an unsharded replica (see trainers/distributed.py)
            self.rollout_model = load_causal_lm(self.policy_path, self.device, self.dtype).eval().requires_grad_(False)
        self.train_model = wrap(model, dist)
        seed = None
        if self.seeded_sampler:  # each rank samples its own questions with its own stream
            seed = cfg.seed + (1_000_003 * dist.rank if dist.enabled else 0)
        self.generator = make_generator(cfg.engine, self.rollout_model, self.tokenizer, cfg.gen_batch_size, seed=seed,
                                        model_path=self.policy_path)

    def sync_weights(self) -> None:
        """After an update: the engine must sample the updated policy (an fsdp2 replica first)."""
        if self.dist.sharded:
            copy_into(self.rollout_model, self.train_model, self.dist)
        self.generator.sync_weights()

    def evaluate(self) -> float:
        """Greedy accuracy on `eval_split`, each rank taking a share of the questions."""
        return evaluate_split(self.generator, self.task, self.eval_examples, self.cfg.eval_max_new_tokens, self.dist)

    def save_best(self, info: dict) -> None:
        """checkpoints/best: the policy (and value head) now, with `info`. Every process calls it."""
        policy_state, value_state = self.weights()
        if self.dist.is_main:
            save_best(self.run_dir, self.model, self.tokenizer, self._modules(value_state), info,
                      policy_state=policy_state)
        self.dist.barrier()


class OnlineRun(PolicyRun):
    """The step loop of ReFT and Online-ST around the trainer's own work (see the module doc)."""

    seeded_sampler = True
    rollout_source = None
    """A source sampling ahead (async_rollout), set by the trainer: checkpoints hold its rollouts in flight."""

    def __init__(self, cfg: OnlineConfig, name: str, *, resume: bool = False, task: Task | None = None,
                 callbacks: Callbacks | None = None, overwrite: bool = False, command: str | None = None):
        super().__init__(cfg, name, task=task, resume=resume, callbacks=callbacks, overwrite=overwrite,
                         command=command)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the trainer's forwards should go through for an extra trained module (the value head)."""
        return wrap(module, self.dist)

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
        self.total_steps = self.cfg.steps
        for step in self._units(range(self.start_step, self.cfg.steps)):
            if self.callbacks.on_step_begin:
                self.callbacks.on_step_begin(step)
            yield step

    def end_step(self, step: int, metrics: dict, postfix: dict | None = None) -> None:
        """After the step's updates: engine weight sync, periodic greedy evaluation (best policy by
        `eval_split` accuracy), history, metrics log and the resumable checkpoint when due."""
        cfg, done = self.cfg, step + 1
        self.sync_weights()  # the next rollout (and this eval) must sample the updated policy
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            accuracy = self.evaluate()
            metrics[f"eval/{cfg.eval_split}_accuracy"] = accuracy
            if accuracy > self.best_accuracy:
                self.best_accuracy = accuracy
                self.save_best({"step": done, f"{cfg.eval_split}_accuracy": self.best_accuracy})
        self.step = done
        # History travels inside checkpoints for resume; timings differ run to run, so they stay out.
        self.history.append({"step": done, **{k: v for k, v in metrics.items() if "seconds" not in k}})
        self.logger.log(done, metrics)
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix(**postfix)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            in_flight = self.dist.gather(self.rollout_source.state_dict()) if self.rollout_source is not None else None
            self.save_checkpoint(f"checkpoints/step-{done:06d}", keep_last=1,
                                 own={"rollouts_in_flight": in_flight} if in_flight is not None else None)
        if self.callbacks.on_step_end:
            self.callbacks.on_step_end(done, metrics)

    def finish(self, **extra) -> dict:
        """Close the logger and write result.json: best and last checkpoints, history, `extra`."""
        last = load_latest(self.run_dir)[0]
        return self.write_result({
            "best_checkpoint": str(self.run_dir / "checkpoints" / "best" / "policy"),
            "best_accuracy": self.best_accuracy,
            "last_checkpoint": str(last / "policy"),
            **extra,
            "history": self.history,
        })


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
