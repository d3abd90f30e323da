"""Rollouts sampled ahead (reftune.trainers.async_rollout, `max_staleness`): the decoupled-PPO weight
worked by hand; the rollout process samples with the weights of the step it was asked for (log-probs
checked against a no-grad pass of those weights, LoRA's merged ones too); max_staleness=1 trains,
is the same run to run whatever the timing, resumes exactly after an interrupt, a SIGKILL and
under torchrun with 2 processes; the rollout process never outlives the trainer; impossible
combinations are refused.

`ParityTask` (as in test_reft.py): a completion is "correct" when its text has even length, so
rewards vary and every part of the update is exercised.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_data, small_overrides
from safetensors.torch import load_file

from reftune.models import load_causal_lm
from reftune.rewards.score import RewardSpec
from reftune.tasks import Graded, Task
from reftune.trainers.async_rollout import AsyncRolloutSource, RolloutSpec, behaviour_weights, rollout_seed
from reftune.trainers.loop import Callbacks
from reftune.trainers.policy import policy_forward
from reftune.trainers.reft import ReFTConfig, run_reft
from reftune.trainers.rollout import step_questions

TIMING = ("seconds", "time")
PLUGINS = str(Path(__file__).parent / "plugins")


class ParityTask(Task):
    def grade(self, completions, examples):
        return [Graded(str(len(c) % 2), len(c) % 2 == 0) for c in completions]


@pytest.fixture(scope="module")
def parity_task(small_task):
    return ParityTask(**vars(small_task))


def reft_config(model: str, out_dir, **kw) -> ReFTConfig:
    base = dict(model=model, data=small_data(), out_dir=str(out_dir), steps=3, questions_per_step=8,
                mini_batch_size=4, max_new_tokens=24, eval_max_new_tokens=24, lr=1e-4, device="cpu",
                progress=False, tensorboard=False, max_staleness=1)
    return ReFTConfig(**{**base, **kw})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def rollout_processes(parent: int) -> list[int]:
    """Live rollout processes (multiprocessing spawn children, not its resource tracker) of `parent`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and "spawn_main" in cmdline:
            found.append(int(d.name))
    return found


def gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------- the math

def test_behaviour_weights_by_hand():
    """Three tokens and one padding position:
    log pi_prox - log pi_behav = 0, 0.5, -1 -> ratios 1, e^0.5 = 1.6487, e^-1 = 0.3679; truncated at
    cap 1.5: 1, 1.5, 0.3679; padding 0 whatever its log-probs (inf there must not leak).
    Mean ratio before truncation (1 + 1.6487 + 0.3679) / 3 = 1.0055; one of three truncated."""
    prox = torch.tensor([[-1.0, -2.0, -1.5, float("inf")]])
    behav = torch.tensor([[-1.0, -2.5, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w, stats = behaviour_weights(prox, behav, mask, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5, 0.3679, 0.0]]), atol=1e-4, rtol=0)
    assert float(stats["staleness_weight"]) == pytest.approx((1 + math.exp(0.5) + math.exp(-1)) / 3, abs=1e-6)
    assert float(stats["staleness_truncated"]) == pytest.approx(1 / 3)


def test_behaviour_weights_scale_the_clipped_loss():
    """For w >= 0, w * min(r A, clip(r) A) = min(r (w A), clip(r) (w A)): PPO's clipped loss on the
    weighted advantages is decoupled PPO's. r = 1.5 (clipped to 1.2 with eps 0.2), A = 2, w = 0.5:
    min(3, 2.4) * 0.5 = 1.2 = min(1.5 * 1, 1.2 * 1)."""
    r, adv, w = torch.tensor(1.5), torch.tensor(2.0), torch.tensor(0.5)
    clipped = lambda a: torch.minimum(r * a, r.clamp(0.8, 1.2) * a)  # noqa: E731
    assert float(w * clipped(adv)) == pytest.approx(1.2) == float(clipped(w * adv))


def test_rollout_seed_depends_on_seed_step_and_rank_only():
    seeds = {rollout_seed(s, step, rank) for s in (0, 1) for step in range(50) for rank in range(4)}
    assert len(seeds) == 2 * 50 * 4 and all(0 <= x < 2**63 for x in seeds)
    assert rollout_seed(3, 7, 1) == rollout_seed(3, 7, 1)


# ------------------------------------------------------------------------------- the rollout process

def spec_for(model: str, **kw) -> RolloutSpec:
    base = dict(policy_path=model, ref_path=model, dtype="float32", engine="static", gen_batch_size=64, threads=1,
                samples_per_prompt=2, temperature=1.0, top_p=1.0, max_new_tokens=16, logprob_chunk_size=0)
    return RolloutSpec(**{**base, **kw})


def no_grad_logprobs(model, rollout) -> torch.Tensor:
    with torch.no_grad():
        lp, _, _ = policy_forward(model, None, rollout.input_ids, rollout.attention_mask, rollout.response_ids,
                                  rollout.prompt_ids.shape[1])
    return lp.masked_fill(rollout.response_mask == 0, 0.0)


def perturb(model, scale: float = 0.05) -> None:
    """A stand-in for an update: every trained weight moves."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def assert_logprobs_of(model, got, atol: float = 1e-4) -> None:
    ro = got.scored.rollout
    torch.testing.assert_close(ro.sampling_logprobs, no_grad_logprobs(model, ro), atol=atol, rtol=0)


def test_rollouts_carry_the_log_probs_of_the_stale_policy(warmup_model, small_task):
    """Rollout 0 and 1 come from theta_0, rollout 2 from theta_1 (the weights before the second
    "update"): each one's log-probs are a no-grad pass of those weights, not of the newer ones; the
    reference log-probs are the warm-up model's. The process is gone after close()."""
    model = load_causal_lm(warmup_model, torch.device("cpu"), torch.float32)
    ref = load_causal_lm(warmup_model, torch.device("cpu"), torch.float32)
    questions = lambda s: step_questions(small_task.train, s, 4, 0)  # noqa: E731
    source = AsyncRolloutSource(spec_for(warmup_model), model=model, task=small_task, questions=questions,
                                rewards=RewardSpec(1.0, 0.1, 0.0), max_staleness=1, seed=0)
    try:
        thetas = []
        for step in range(3):
            got = source.next(step, questions(step))
            thetas.append({k: v.clone() for k, v in model.state_dict().items()})
            assert got.policy_step == max(0, step - 1)
            assert [e.question for e in got.scored.examples[::2]] == [q.question for q in questions(step)]
            stale = load_causal_lm(warmup_model, torch.device("cpu"), torch.float32)
            stale.load_state_dict(thetas[got.policy_step])
            assert_logprobs_of(stale, got)
            if step == 2:  # theta_1 differs from theta_2 = the model now
                gap = (got.scored.rollout.sampling_logprobs - no_grad_logprobs(model, got.scored.rollout)).abs()
                assert float(gap.max()) > 1e-2
            torch.testing.assert_close(got.scored.ref_logprobs, no_grad_logprobs(ref, got.scored.rollout),
                                       atol=1e-4, rtol=0)
            perturb(model)
        pid = source.pid
        assert [r["step"] for r in source.state_dict()] == [3]
    finally:
        source.close()
    assert gone(pid)


@pytest.mark.slow
def test_lora_rollouts_sample_the_merged_weights(warmup_model, small_task):
    """With LoRA the rollout process samples base + adapter: its log-probs are the peft model's."""
    from reftune.trainers.lora import apply_lora

    cfg = ReFTConfig(lora_r=4, lora_target_modules=["q_proj", "v_proj", "o_proj"])
    model = apply_lora(load_causal_lm(warmup_model, torch.device("cpu"), torch.float32), cfg)
    perturb(model, 0.2)  # adapter A and B both nonzero: the merged weights differ from the base
    questions = lambda s: step_questions(small_task.train, s, 4, 1)  # noqa: E731
    source = AsyncRolloutSource(spec_for(warmup_model, ref_path=None, engine="cached"), model=model, task=small_task,
                                questions=questions, rewards=RewardSpec(1.0, 0.1, 0.0), max_staleness=1, seed=1)
    try:
        got = source.next(0, questions(0))
    finally:
        source.close()
    assert got.scored.ref_logprobs is None
    assert_logprobs_of(model, got)  # (engine=cached reports none: the rollout process's own pass)
    base = load_causal_lm(warmup_model, torch.device("cpu"), torch.float32)
    assert float((got.scored.rollout.sampling_logprobs - no_grad_logprobs(base, got.scored.rollout)).abs().max()) > 1e-2


# ------------------------------------------------------------------------------- ReFT one step off

def test_max_staleness_0_starts_no_rollout_process(warmup_model, parity_task, tmp_path):
    """The default is the synchronous loop: no process beside the trainer, no staleness metrics."""
    seen = []
    result = run_reft(reft_config(warmup_model, tmp_path / "run", max_staleness=0, steps=2),
                      task=parity_task, callbacks=Callbacks(on_step_begin=lambda s: seen.append(rollout_processes(os.getpid()))))
    assert seen == [[], []]
    assert all("reft/policy_lag" not in h and "reft/staleness_weight" not in h for h in result["history"])


@pytest.fixture(scope="module")
def straight_run(warmup_model, parity_task, tmp_path_factory):
    """4 steps one step off, checkpoints at 2 and 4; the rollout processes seen at each step."""
    out = tmp_path_factory.mktemp("async") / "A"
    seen = []
    result = run_reft(reft_config(warmup_model, out, steps=4, save_every=2, eval_every=2, score_none=0.5),
                      task=parity_task, callbacks=Callbacks(on_step_begin=lambda s: seen.append(rollout_processes(os.getpid()))))
    return out, result, seen


def assert_same_run(a_dir, a_result, b_dir, b_result) -> None:
    assert b_result["history"] == a_result["history"]
    assert untimed(records(b_dir)) == untimed(records(a_dir))
    last = "checkpoints/step-000004"
    assert_same_weights(weights(a_dir / last / "policy"), weights(b_dir / last / "policy"))
    assert_same_weights(torch.load(a_dir / last / "value_head.pt"), torch.load(b_dir / last / "value_head.pt"))


def test_one_step_off_trains(straight_run, warmup_model):
    out, result, seen = straight_run
    history = result["history"]
    assert [h["reft/policy_lag"] for h in history] == [0.0, 1.0, 1.0, 1.0]
    assert "reft/staleness_weight" not in history[0]  # step 0 is sampled by the policy it trains
    for h in history[1:]:
        assert 0.5 < h["reft/staleness_weight"] < 1.5 and 0.0 <= h["reft/staleness_truncated"] < 0.5
    start, after = weights(warmup_model), weights(out / "checkpoints/step-000004/policy")
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert all(len(pids) == 1 for pids in seen) and len({p for pids in seen for p in pids}) == 1
    assert rollout_processes(os.getpid()) == [] and gone(seen[0][0])
    state = torch.load(out / "checkpoints/step-000004/trainer_state.pt", weights_only=False)
    assert [r["step"] for r in state["rollouts_in_flight"][0]] == [4]  # the next step's, sampled by theta_3
    assert state["rollouts_in_flight"][0][0]["policy_step"] == 3


@pytest.mark.slow
def test_one_step_off_is_the_same_whatever_the_timing(straight_run, warmup_model, parity_task, tmp_path):
    """A second run whose trainer dawdles at every step (the rollout process gets far ahead)
    trains the same weights: what a step trains on is a function of (seed, step, rank)."""
    a_dir, a, _ = straight_run
    b = run_reft(reft_config(warmup_model, tmp_path / "B", steps=4, save_every=2, eval_every=2, score_none=0.5),
                 task=parity_task, callbacks=Callbacks(on_step_begin=lambda s: time.sleep(1.0)))
    assert_same_run(a_dir, a, tmp_path / "B", b)


def test_one_step_off_resume_is_exact(straight_run, warmup_model, parity_task, tmp_path):
    """2 steps, then resumed to 4: the step-2 checkpoint holds rollout 2 (sampled by theta_1), so
    the resumed run trains on what the straight one did."""
    a_dir, a, _ = straight_run
    b_dir = tmp_path / "B"
    run_reft(reft_config(warmup_model, b_dir, steps=2, save_every=2, eval_every=2, score_none=0.5), task=parity_task)
    b = run_reft(reft_config(warmup_model, b_dir, steps=4, save_every=2, eval_every=2, score_none=0.5), resume=True,
                 task=parity_task)
    assert_same_run(a_dir, a, b_dir, b)


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_one_step_off_with_dynamic_sampling_refills_now_and_resumes_exactly(engine, warmup_model, parity_task,
                                                                            tmp_path):
    """Dynamic sampling one step off: the step's first rollout was sampled ahead, its refills are
    sampled by the trainer with the policy being updated (hf reports no sampling log-probs: the
    trainer's pass gives them). 4 steps straight against 2 and resumed to 4: the same run."""
    dynamic = dict(steps=4, save_every=2, eval_every=2, samples_per_prompt=2, questions_per_step=4,
                   dynamic_sampling=True, dynamic_sampling_max_rounds=2, engine=engine, engine_old_logprobs=False)
    a = run_reft(reft_config(warmup_model, tmp_path / "A", **dynamic), task=parity_task)
    history = a["history"]
    assert [h["reft/policy_lag"] for h in history] == [0.0, 1.0, 1.0, 1.0]
    assert any(h["reft/refill_rounds"] > 0 for h in history[1:])  # parity of 2 samples often agrees
    for h in history[1:]:  # a refilled row's weight is 1 (behaviour = proximal): the mean stays near 1
        assert 0.5 < h["reft/staleness_weight"] < 1.5
    run_reft(reft_config(warmup_model, tmp_path / "B", **{**dynamic, "steps": 2}), task=parity_task)
    b = run_reft(reft_config(warmup_model, tmp_path / "B", **dynamic), resume=True, task=parity_task)
    assert_same_run(tmp_path / "A", a, tmp_path / "B", b)


def test_interrupted_one_step_off_run_stops_its_process_and_resumes_exactly(straight_run, warmup_model,
                                                                            parity_task, tmp_path):
    """Ctrl-C during step 4 (after the step-2 checkpoint): the rollout process is gone when the
    interrupt reaches the caller, and --resume reproduces the straight run."""
    a_dir, a, _ = straight_run
    b_dir, pids = tmp_path / "B", []

    def interrupt_at_3(step):
        pids.extend(rollout_processes(os.getpid()))
        if step == 3:
            raise KeyboardInterrupt

    cfg = reft_config(warmup_model, b_dir, steps=4, save_every=2, eval_every=2, score_none=0.5)
    with pytest.raises(KeyboardInterrupt):
        run_reft(cfg, task=parity_task, callbacks=Callbacks(on_step_begin=interrupt_at_3))
    assert pids and all(gone(p, timeout=0.5) for p in pids) and rollout_processes(os.getpid()) == []
    b = run_reft(cfg, resume=True, task=parity_task)
    assert_same_run(a_dir, a, b_dir, b)


class FailingTask(ParityTask):
    """Grading fails on the third rollout: an error in the trainer's process mid-run."""

    calls = 0

    def grade(self, completions, examples):
        FailingTask.calls += 1
        if FailingTask.calls == 3:
            raise ZeroDivisionError("a grader bug")
        return super().grade(completions, examples)


@pytest.mark.slow
def test_an_error_in_the_trainer_stops_the_rollout_process(warmup_model, small_task, tmp_path):
    pids = []
    with pytest.raises(ZeroDivisionError):
        run_reft(reft_config(warmup_model, tmp_path / "run", eval_every=0), task=FailingTask(**vars(small_task)),
                 callbacks=Callbacks(on_step_begin=lambda s: pids.extend(rollout_processes(os.getpid()))))
    assert pids and all(gone(p, timeout=0.5) for p in pids)


@pytest.mark.slow
def test_a_dead_rollout_process_is_an_error_not_a_hang(warmup_model, parity_task, tmp_path):
    def kill_it(step):
        if step == 1:
            for pid in rollout_processes(os.getpid()):
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(RuntimeError, match="rollout process ended unexpectedly"):
        run_reft(reft_config(warmup_model, tmp_path / "run", steps=4, eval_every=0, max_staleness=1),
                 task=parity_task, callbacks=Callbacks(on_step_begin=kill_it))
    assert rollout_processes(os.getpid()) == []


@pytest.mark.slow
def test_lora_one_step_off_trains_the_adapter(warmup_model, parity_task, tmp_path):
    result = run_reft(reft_config(warmup_model, tmp_path / "run", lora_r=4, lr=1e-3, score_none=0.5, eval_every=0),
                      task=parity_task)
    history = result["history"]
    assert [h["reft/policy_lag"] for h in history] == [0.0, 1.0, 1.0]
    # Step 0 is on-policy: the behaviour log-probs (the rollout process's, from the merged weights
    # of a zero adapter) match the trainer's own pass.
    assert history[0]["reft/engine_logprob_gap"] < 1e-4
    start, after = weights(warmup_model), weights(Path(result["last_checkpoint"]))
    assert any(not torch.equal(start[k], after[k]) for k in start)


@pytest.mark.parametrize("bad, message", [
    (dict(max_staleness=-1), "max_staleness"),
    (dict(max_staleness=1, engine="vllm"), "engine='vllm': cannot sample ahead"),
    (dict(max_staleness=1, device="cuda"), "device='cuda'"),
    (dict(max_staleness=1, lora_r=4, lora_quantize="nf4"), "lora_quantize"),
    (dict(max_staleness=1, staleness_weight_cap=0.5), "staleness_weight_cap"),
    (dict(rollout_threads=-1), "rollout_threads"),
])
def test_impossible_combinations_are_refused(bad, message, parity_task, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_reft(reft_config("/nonexistent/model", run, **bad), task=parity_task)
    assert not run.exists()


# ------------------------------------------------------------------------------- killed processes

RUNNER = "import sys\nfrom reftune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
QUIET = ["progress=false", "device=cpu", "tensorboard=false"]


def cli_argv(model: str, run: Path) -> list[str]:
    return ["train", f"model={model}", f"out_dir={run}", "steps=3", "questions_per_step=4", "mini_batch_size=2",
            "max_new_tokens=12", "eval_max_new_tokens=12", "eval_every=1", "save_every=1", "seed=3",
            "max_staleness=1", "score_none=0.5", *QUIET, *small_overrides()]


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_one_step_off_run_resumes_exactly_and_takes_its_process_along(warmup_model, tmp_path):
    """The reference runs as a CLI process (its stderr: no leaked-semaphore warning); then runs
    SIGKILLed at seeded random instants once their rollout process is up: the rollout process
    dies with the trainer, and --resume (or a rerun) gives the reference's weights and metrics."""
    import random

    from reftune.cli import main

    ref = tmp_path / "reference"
    t0 = time.time()
    proc = start(cli_argv(warmup_model, ref))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "leaked" not in err and "resource_tracker" not in err, err[-2000:]
    span = time.time() - t0
    rng = random.Random(11)
    for i in range(2):
        run = tmp_path / f"kill{i}"
        proc = start(cli_argv(warmup_model, run))
        deadline = time.time() + 300
        while not rollout_processes(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        children = rollout_processes(proc.pid)
        time.sleep(rng.uniform(0.0, span / 2))
        proc.kill()
        proc.communicate()
        assert all(gone(p) for p in children), children
        if (run / "config.yaml").exists():
            assert main(["train", "--resume", str(run)]) == 0
        else:
            assert main(cli_argv(warmup_model, run)) == 0
        last = "checkpoints/step-000003/policy"
        assert_same_weights(weights(ref / last), weights(run / last))
        assert untimed(records(run)) == untimed(records(ref))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([PLUGINS, os.environ.get("PYTHONPATH", "")]), **(env_extra or {})}
    return subprocess.run([*TORCHRUN, "-m", "reftune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900, start_new_session=True)


@pytest.mark.slow
def test_two_processes_one_step_off_killed_mid_step_resume_exactly(warmup_model, tmp_path):
    """DDP over 2 processes (gloo), each with its own rollout process and generator. Run B is
    SIGKILLed (every process, rollout processes included) while rank 0's rollout process samples
    its 4th rollout, after the step-2 checkpoint; --resume reproduces run A."""
    common = ["steps=4", "eval_every=2", "save_every=2", "questions_per_step=8", "samples_per_prompt=2",
              "mini_batch_size=8", "max_new_tokens=16", "eval_max_new_tokens=16", "lr=1e-3", "score_none=0.5",
              "max_staleness=1", "engine=row_seeded_engine:KillingSampler", *QUIET, *small_overrides()]
    a, b = tmp_path / "A", tmp_path / "B"
    done = torchrun(["train", f"model={warmup_model}", f"out_dir={a}", *common])
    assert done.returncode == 0, done.stderr[-3000:]
    killed = torchrun(["train", f"model={warmup_model}", f"out_dir={b}", *common], {"REFTUNE_TEST_KILL_AT_CALL": "4"})
    assert killed.returncode != 0
    assert json.loads((b / "latest.json").read_text())["step"] == 2
    resumed = torchrun(["train", "--resume", str(b)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert untimed(records(a)) == untimed(records(b))
    last = "checkpoints/step-000004/policy"
    assert_same_weights(weights(a / last), weights(b / last))
    assert any(not torch.equal(v, weights(a / last)[k]) for k, v in weights(Path(warmup_model)).items())
    state = torch.load(a / "checkpoints/step-000004/trainer_state.pt", weights_only=False)
    r0, r1 = (s[0]["rollout"]["response_ids"] for s in state["rollouts_in_flight"])
    assert len(state["rollouts_in_flight"]) == 2 and not torch.equal(r0, r1)  # each rank its own questions


@pytest.mark.slow
def test_fsdp2_one_step_off_samples_the_trained_weights(warmup_model, tmp_path):
    """Under fsdp2 the weights pushed are the unsharded replica's, refreshed after every update:
    step 1 is on-policy (the rollout process's log-probs match the trainer's pass to rounding),
    later steps are one update behind and corrected."""
    out = tmp_path / "run"
    done = torchrun(["train", f"model={warmup_model}", f"out_dir={out}", "parallel=fsdp2", "steps=3", "eval_every=3",
                     "save_every=3", "questions_per_step=8", "samples_per_prompt=2", "mini_batch_size=8",
                     "max_new_tokens=16", "eval_max_new_tokens=16", "lr=1e-3", "score_none=0.5", "max_staleness=1",
                     *QUIET, *small_overrides()])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = records(out)
    assert [r["reft/policy_lag"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["reft/engine_logprob_gap"] < 1e-4 < rows[1]["reft/engine_logprob_gap"]
    assert all(0.5 < r["reft/staleness_weight"] < 1.5 for r in rows[1:])


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import small_data
from reftune.trainers.reft import ReFTConfig, run_reft
print("SCRIPT RAN", flush=True)
run_reft(ReFTConfig(model={model!r}, data=small_data(), out_dir={out!r}, steps=1, questions_per_step=4,
                    mini_batch_size=4, max_new_tokens=8, eval_max_new_tokens=8, device="cpu", progress=False,
                    tensorboard=False, max_staleness=1))
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_once(warmup_model, tmp_path):
    """Spawning the rollout process does not import the trainer's script again (multiprocessing's
    spawn would, running an unguarded script's top level a second time)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), model=warmup_model, out=str(tmp_path / "run")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("SCRIPT RAN") == 1
