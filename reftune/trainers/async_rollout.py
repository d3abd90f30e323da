"""Rollouts that overlap training (`max_staleness` = N >= 1): a second process samples the next
steps' CoTs while this one updates the policy.

    source = start_rollouts(cfg, run, rewards)   # spawns the rollout process; run.rollout_source = source
    for step in run.steps():
        got = source.next(step, run.questions(step))   # rollout `step`, scored, sampled N steps ago
        ...  # proximal pass, decoupled PPO (behaviour_weights), update
        run.end_step(step, metrics)              # its checkpoint holds the rollouts still in flight
    source.close()                               # (reft.run_reft: in a `finally`)

Which weights sample which step: the rollout of step s is sampled with the policy after
max(0, s - N) updates (theta_{s-N}) and with a generator seeded from (seed, s, rank), so what a
step trains on does not depend on timing, thread scheduling or where a run was resumed. The
rollout process holds its own copy of the policy on the CPU (and of the frozen reference, whose
log-probs it computes too: they do not depend on the policy being updated). Its weights live in
N slots of shared memory: after the update of step s-1 this process writes theta_s into slot
s mod N, a slot no rollout still in flight reads (the rollouts s+1 .. s+N-1 read the other N-1),
then asks for rollout s+N. With LoRA the merged weights are written (base + adapter folded in).

The PPO correction (docs/async.md): the rollout carries the behaviour policy's log-probs (the
engine's, or a pass of the rollout process where an engine reports none); the trainer's no-grad
pass gives the proximal policy's (the weights being updated) log-probs and values, and
`behaviour_weights` the truncated importance weight pi_prox / pi_behav that multiplies each
token's advantage (decoupled PPO), while the clip stays on pi_theta / pi_prox.

Exact resume: a checkpoint waits for the rollouts in flight and stores them (`state_dict`);
resuming hands them out first. The process never outlives the trainer: it dies with it
(PR_SET_PDEATHSIG on Linux), ignores Ctrl-C (the trainer shuts it down), and ends when its pipe
closes; `close()` stops it and is called by the run on success, error and interrupt.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import hashlib
import io
import os
import queue
import signal
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass

import torch

from reftune.engines.base import Rollout
from reftune.trainers.rollout import ScoredRollout, sample_and_score
from reftune.trainers.rollout_source import StepRollout

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------- the math

def behaviour_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor,
                      cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO's importance weight of each sampled token, truncated: min(pi_prox / pi_behav, cap).

    proximal_logprobs, behaviour_logprobs, response_mask: (B, R). The tokens were drawn from the
    behaviour policy (the stale weights that sampled); the proximal policy is the one the update
    starts from. The loss is E_behav[w * min(r A, clip(r, 1-eps, 1+eps) A)] with r = pi_theta /
    pi_prox and w this weight (a constant): for w >= 0 that is the ordinary clipped loss on the
    advantages w * A. Returns the weights (B, R), 0 at masked positions, and stats: the mean weight
    before truncation and the fraction of tokens truncated (over masked positions).
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, proximal_logprobs.float() - behaviour_logprobs.float(), torch.zeros(()))
    ratio = log_ratio.exp()
    weights = torch.where(mask, ratio.clamp(max=cap), torch.zeros(()))
    count = mask.sum().clamp(min=1)
    stats = {"staleness_weight": torch.where(mask, ratio, torch.zeros(())).sum() / count,
             "staleness_truncated": (mask & (ratio > cap)).sum() / count}
    return weights, stats


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the generator that samples rollout `step` on process `rank`: a hash of the three,
    so no two (step, rank) pairs share a stream and none depends on what ran before."""
    digest = hashlib.sha256(f"reftune-rollout/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------------- shared weights

def policy_weights(model):
    """(name, tensor) pairs of the weights the rollout process samples with, under plain HF names:
    the parameters, or with LoRA the merged ones (the adapter folded into the base)."""
    from reftune.models import is_peft, merged_weights

    if is_peft(model):
        return merged_weights(model)
    return model.named_parameters()


@dataclass(frozen=True)
class Layout:
    """Where each weight lives in a slot: one flat buffer per dtype, each weight a view into it."""

    entries: tuple[tuple[str, str, int, tuple[int, ...]], ...]
    """(name, dtype name, offset, shape) per weight."""
    sizes: tuple[tuple[str, int], ...]
    """(dtype name, elements) per buffer."""

    @staticmethod
    def of(weights) -> "Layout":
        entries, sizes = [], {}
        for name, t in weights:
            key = str(t.dtype).removeprefix("torch.")
            entries.append((name, key, sizes.get(key, 0), tuple(t.shape)))
            sizes[key] = sizes.get(key, 0) + t.numel()
        return Layout(tuple(entries), tuple(sizes.items()))

    def allocate(self) -> dict[str, Tensor]:
        """One slot: a zeroed buffer per dtype in shared memory."""
        return {key: torch.zeros(n, dtype=getattr(torch, key)).share_memory_() for key, n in self.sizes}

    def views(self, slot: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: slot[key][off:off + _numel(shape)].view(shape) for name, key, off, shape in self.entries}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------------- the source

@dataclass
class StaleRollout(ScoredRollout):
    """A scored rollout from the rollout process, with what it computed beside the sampling."""

    ref_logprobs: Tensor | None = None
    """(B, R) log-probs of the sampled tokens under the frozen reference (None: the trainer computes them)."""
    policy_step: int = 0
    """Updates the sampling weights had seen (theta_{policy_step})."""


@dataclass
class RolloutSpec:
    """What the rollout process needs to build its copy of the policy and sample like the trainer."""

    policy_path: str
    ref_path: str | None
    """Frozen reference to score the samples with (None: no reference pass there)."""
    dtype: str
    engine: str
    gen_batch_size: int
    threads: int
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_new_tokens: int
    logprob_chunk_size: int


class AsyncRolloutSource:
    """Rollouts of a step sampled by a second process up to `max_staleness` steps ahead (module doc)."""

    def __init__(self, spec: RolloutSpec, *, model, task, questions, rewards, max_staleness: int,
                 seed: int, rank: int = 0, saved: list[dict] | None = None):
        """`model`: the policy the weights are read from; `questions(step)`: this process's questions
        of a step; `rewards`: how a sampled CoT scores (a RewardSet, or a RewardSpec: correctness
        alone); `saved`: the rollouts a checkpoint had in flight."""
        self.spec, self.model, self.task, self.questions, self.rewards = spec, model, task, questions, rewards
        self.n, self.seed, self.rank = max_staleness, seed, rank
        self.layout = Layout.of(policy_weights(model))
        self.slots = [self.layout.allocate() for _ in range(self.n)]
        self._views = [self.layout.views(s) for s in self.slots]
        self.slot_step = [-1] * self.n
        """Which theta_k each slot holds (-1: none yet)."""
        self.ready: collections.deque[dict] = collections.deque(saved or [])
        self.in_flight: collections.deque[int] = collections.deque()
        self.restore_threads = 0
        """Thread count to give this process back on close (0: leave it)."""
        self._process, self._conn = None, None
        self._start()

    # -- the process
    def _start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._process = ctx.Process(target=serve, args=(child, self.spec, self.layout, self.slots),
                                    name="reftune-rollouts", daemon=True)
        with _main_module_hidden():
            self._process.start()
        child.close()  # only the child holds its end: its exit is an EOF here
        self._conn = parent

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Stop the rollout process (idempotent): ask, close the pipe (a result it is still sending
        then fails there at once), wait a little, then kill; this process gets its threads back.
        Nothing there needs cleaning up: its shared memory goes with its file descriptors."""
        proc, conn = self._process, self._conn
        self._process = self._conn = None
        if proc is None:
            return
        if self.restore_threads:
            torch.set_num_threads(self.restore_threads)
        try:
            conn.send(("stop", None))
        except (OSError, ValueError):
            pass
        conn.close()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        proc.close()

    # -- requests and results
    def _push(self, slot: int, step: int) -> None:
        """Write the policy's current weights (theta_step) into `slot`; no rollout may be reading it."""
        if self.slot_step[slot] == step:
            return
        views = self._views[slot]
        with torch.no_grad():
            for name, t in policy_weights(self.model):
                views[name].copy_(t.detach())
        self.slot_step[slot] = step

    def _request(self, step: int, slot: int) -> None:
        prompts = [self.task.prompt(ex, for_generation=True) for ex in self.questions(step)]
        self._send(("rollout", {"step": step, "slot": slot, "policy_step": self.slot_step[slot],
                                "prompts": prompts, "seed": rollout_seed(self.seed, step, self.rank)}))
        self.in_flight.append(step)

    def _send(self, message) -> None:
        if self._conn is None:
            raise RuntimeError("the rollout process was closed")
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise RuntimeError(self._death_note()) from None

    def _receive(self) -> dict:
        """The next result of the rollout process, in the order asked for."""
        try:
            result = torch.load(io.BytesIO(self._conn.recv_bytes()), weights_only=True)
        except (EOFError, ConnectionResetError, OSError):
            raise RuntimeError(self._death_note()) from None
        if "error" in result:
            raise RuntimeError(f"the rollout process failed:\n{result['error']}")
        expected = self.in_flight.popleft()
        if result["step"] != expected:
            raise RuntimeError(f"rollout of step {result['step']} arrived, step {expected} was due")
        return result

    def _death_note(self) -> str:
        code = self._process.exitcode if self._process is not None else None
        return f"the rollout process ended unexpectedly (exit code {code})"

    def next(self, step: int, questions: list) -> StepRollout:
        """Rollout `step`, scored; then the weights now (theta_step) go to the rollout process and
        rollout step + N is asked for, to be sampled while this step's update runs."""
        if not self.ready and not self.in_flight:  # a fresh pipeline: steps step .. step+N-1 from theta_step
            self._push(step % self.n, step)
            for s in range(step, step + self.n):
                self._request(s, step % self.n)
        result = self.ready.popleft() if self.ready else self._receive()
        if result["step"] != step:
            raise RuntimeError(f"the rollout of step {result['step']} is next, step {step} asked for it")
        self._push(step % self.n, step)
        self._request(step + self.n, step % self.n)
        scored = self._scored(result, questions)
        stats = {"policy_lag": float(step - result["policy_step"]),
                 **{f"seconds_rollout_{k}": v for k, v in result["seconds"].items()}}
        return StepRollout(scored, scored, result["policy_step"], stats)

    def _scored(self, result: dict, questions: list) -> StaleRollout:
        """Graded and scored here, as a synchronous rollout is (rollout.sample_and_score)."""
        s = self.spec
        scored = sample_and_score(Sampled(Rollout(**result["rollout"])), self.task, questions, s.samples_per_prompt,
                                  s.temperature, s.top_p, s.max_new_tokens, self.rewards)
        return StaleRollout(**vars(scored), ref_logprobs=result["ref_logprobs"], policy_step=result["policy_step"])

    def state_dict(self) -> list[dict]:
        """The rollouts in flight, waited for (checkpoints hold them: a resume hands them out first)."""
        while self.in_flight:
            self.ready.append(self._receive())
        return list(self.ready)


class Sampled:
    """A generator that returns a rollout sampled already (by the rollout process), so that scoring
    is `sample_and_score`'s, whatever the run's rewards."""

    def __init__(self, rollout: Rollout):
        self.rollout = rollout

    def generate(self, prompts, **_) -> Rollout:
        return self.rollout


@contextlib.contextmanager
def _main_module_hidden():
    """Spawn would import the trainer's `__main__` again in the new process (a script without an
    `if __name__ == "__main__":` guard would run a second time there); the rollout process needs
    nothing from it, so it is not told of it."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


# ----------------------------------------------------------------------------------- the trainer's side

def validate_staleness(cfg, c) -> None:
    """Refuse `max_staleness` > 0 where it cannot work, saying why (`c`: the config's Checks)."""
    c.int("max_staleness", 0, 8, note="0: sample each step's rollout when the step starts").int("rollout_threads", 0)
    c.float("staleness_weight_cap", 1.0, note="the behaviour importance weight is truncated there")
    if not cfg.max_staleness:
        return
    if cfg.engine == "vllm":
        c.fail("engine", f"cannot sample ahead (max_staleness={cfg.max_staleness}): the rollout process runs a copy "
                         f"of the policy on the CPU with an in-process engine (auto, static, graphed, cached, hf, or your own)")
    if cfg.device not in ("auto", "cpu"):
        c.fail("device", f"with max_staleness={cfg.max_staleness}: rollouts ahead are sampled on the CPU beside a "
                         f"CPU trainer; on a GPU use max_staleness=0")
    if cfg.lora_quantize != "no":
        c.fail("lora_quantize", f"with max_staleness={cfg.max_staleness}: the rollout process holds an unquantized "
                                f"copy, and QLoRA's reference is the quantized base; use lora_quantize=no")


def start_rollouts(cfg, run, rewards) -> AsyncRolloutSource:
    """The rollout process of a ReFT run (an `OnlineRun`; `rewards`: its RewardSet), holding the
    rollouts its checkpoint had in flight when resuming; this process keeps the threads the rollout
    process does not take."""
    if run.device.type != "cpu":
        run.release()  # (the run's loop has not started: nothing else lets go of the folder)
        raise ValueError(f"max_staleness={cfg.max_staleness} samples ahead on the CPU, and this run trains on "
                         f"{run.device}: set device=cpu or max_staleness=0")
    saved = None
    if run.latest is not None and "rollouts_in_flight" in run.latest[1]:
        saved = run.latest[1]["rollouts_in_flight"][run.dist.rank]
        if len(saved) != cfg.max_staleness:
            saved = None  # written with another max_staleness: sample afresh from the weights now
    total = torch.get_num_threads()
    threads = cfg.rollout_threads or max(1, total // 2)
    spec = RolloutSpec(cfg.model, cfg.ref_model or cfg.model,
                       str(run.model.get_input_embeddings().weight.dtype).removeprefix("torch."), cfg.engine,
                       cfg.gen_batch_size, threads, cfg.samples_per_prompt, cfg.temperature, cfg.top_p,
                       cfg.max_new_tokens, cfg.logprob_chunk_size)
    source = AsyncRolloutSource(spec, model=run.rollout_model, task=run.task, questions=run.questions,
                                rewards=rewards, max_staleness=cfg.max_staleness, seed=cfg.seed,
                                rank=run.dist.rank, saved=saved)
    source.restore_threads = total
    torch.set_num_threads(max(1, total - threads))
    run.rollout_source = source
    return source


def correct_for_staleness(batch, cap: float) -> dict[str, float]:
    """Decoupled PPO on a batch the policy being updated did not sample (`batch.policy_step` <
    `batch.step`): each token's advantage times its truncated behaviour weight (behaviour_weights;
    `batch.old_logprobs` are then the proximal policy's, from the trainer's own pass). Returns the
    weights' statistics; a batch sampled by the policy being updated is left as it is."""
    if batch.policy_step == batch.step:
        return {}
    if batch.sampling_logprobs is None:
        raise RuntimeError(f"step {batch.step} was sampled by the policy of step {batch.policy_step}, "
                           f"without its log-probs: the staleness cannot be corrected")
    device = batch.advantages.device
    weights, stats = behaviour_weights(batch.old_logprobs.to(device), batch.sampling_logprobs.to(device),
                                       batch.loss_mask.to(device), cap)
    batch.advantages = batch.advantages * weights
    return {k: float(v) for k, v in stats.items()}


# ----------------------------------------------------------------------------------- the process

def serve(conn, spec: RolloutSpec, layout: Layout, slots: list[dict[str, Tensor]]) -> None:
    """The rollout process: build the policy (and reference) copy, then answer requests in order
    until told to stop or the trainer's end of the pipe closes. It then exits at once: an
    interpreter's teardown of torch and transformers took seconds, and nothing here needs it."""
    try:
        _serve(conn, spec, layout, slots)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _serve(conn, spec: RolloutSpec, layout: Layout, slots: list[dict[str, Tensor]]) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the trainer stops us
    torch.set_num_threads(spec.threads)
    requests: queue.Queue = queue.Queue()
    # Requests are read as they come, so a large result being sent never blocks the trainer's send.
    threading.Thread(target=_read_requests, args=(conn, requests), daemon=True).start()
    try:
        worker = RolloutWorker(spec, layout, slots)
    except Exception:  # noqa: BLE001  (reported to the trainer, which raises it)
        _reply(conn, {"error": traceback.format_exc()})
        return
    while True:
        kind, request = requests.get()
        if kind != "rollout":
            return
        try:
            result = worker.rollout(**request)
        except Exception:  # noqa: BLE001
            result = {"error": traceback.format_exc()}
        if not _reply(conn, result):
            return


def _read_requests(conn, requests: queue.Queue) -> None:
    while True:
        try:
            requests.put(conn.recv())
        except (EOFError, OSError):
            requests.put(("stop", None))
            return


def _reply(conn, result: dict) -> bool:
    buffer = io.BytesIO()
    torch.save(result, buffer)
    try:
        conn.send_bytes(buffer.getvalue())
        return True
    except (BrokenPipeError, ConnectionResetError, OSError):
        return False


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the one that started it dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


class RolloutWorker:
    """Inside the rollout process: the policy copy bound to a weight slot, the engine, the reference."""

    def __init__(self, spec: RolloutSpec, layout: Layout, slots: list[dict[str, Tensor]]):
        from reftune.engines import make_generator
        from reftune.models import load_causal_lm, load_tokenizer

        cpu, dtype = torch.device("cpu"), getattr(torch, spec.dtype)
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.policy_path)
        self.model = load_causal_lm(spec.policy_path, cpu, dtype).eval().requires_grad_(False)
        self.views = [layout.views(s) for s in slots]
        missing = [n for n, _ in self.model.named_parameters() if n not in self.views[0]]
        if missing:
            raise ValueError(f"the trainer's weights lack {len(missing)} of the rollout copy's, e.g. {missing[:3]}")
        self.ref = None
        if spec.ref_path is not None:
            self.ref = load_causal_lm(spec.ref_path, cpu, dtype).eval().requires_grad_(False)
        self.engine = make_generator(spec.engine, self.model, self.tokenizer, spec.gen_batch_size, seed=0,
                                     model_path=spec.policy_path)

    def bind(self, slot: int) -> None:
        """Sample with the weights in `slot` (the parameters become views of the shared buffers)."""
        for name, p in self.model.named_parameters():
            p.data = self.views[slot][name]
        self.engine.sync_weights()  # (an engine that derives state from the weights)

    @torch.no_grad()
    def rollout(self, step: int, slot: int, policy_step: int, prompts: list[str], seed: int) -> dict:
        s = self.spec
        self.bind(slot)
        torch.manual_seed(seed)  # engines that draw from torch's global generator (hf)
        if getattr(self.engine, "rng", None) is not None:
            self.engine.rng.manual_seed(seed)
        t0, cpu0 = time.time(), time.process_time()
        ro = self.engine.generate(prompts, num_samples=s.samples_per_prompt, temperature=s.temperature,
                                  top_p=s.top_p, max_new_tokens=s.max_new_tokens)
        if ro.sampling_logprobs is None:  # an engine that reports none: the behaviour policy's own pass
            ro.sampling_logprobs = self._logprobs(self.model, ro)
        t1 = time.time()
        ref = self._logprobs(self.ref, ro) if self.ref is not None else None
        fields = {f.name: getattr(ro, f.name) for f in dataclasses.fields(ro)}
        return {"step": step, "policy_step": policy_step, "rollout": fields, "ref_logprobs": ref,
                "seconds": {"generate": t1 - t0, "reference": time.time() - t1, "cpu": time.process_time() - cpu0}}

    def _logprobs(self, model, ro: Rollout) -> Tensor:
        from reftune.trainers.policy import sampled_logprobs

        s = self.spec
        return sampled_logprobs(model, ro, s.temperature, s.logprob_chunk_size, s.samples_per_prompt)
