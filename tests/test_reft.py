"""ReFT's PPO loop (reftune.trainers.reft.run_reft) end to end on the tiny model: it learns something, KL
starts at 0, checkpoints load, resume is exact, the critic-free options and the KL variants run,
and failures are loud.

A briefly SFT-ed tiny model answers no question correctly, so with the real reward every score is 0
and PPO has nothing to learn from (all advantages 0). Most tests therefore use `ParityTask`: the
same questions and prompts, but a completion is "correct" when its text has even length -- a
reward that varies between samples, so every part of the update (policy, value head, advantages)
is exercised. One test runs the real grader.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import small_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reftune.trainers import algorithms
from reftune.trainers.loop import Callbacks
from reftune.trainers.reft import ReFTConfig, run_reft
from reftune.tasks import Graded, Task

TIMING = ("seconds", "time")


class ParityTask(Task):
    def grade(self, completions, examples):
        return [Graded(str(len(c) % 2), len(c) % 2 == 0) for c in completions]


class BrevityTask(Task):
    """A reward a tiny model can learn in seconds: "correct" when the completion is short."""

    def grade(self, completions, examples):
        return [Graded(str(len(c)), len(c) <= 40) for c in completions]


@pytest.fixture(scope="module")
def parity_task(small_task):
    return ParityTask(**vars(small_task))


def reft_config(model: str, out_dir, **kw) -> ReFTConfig:
    base = dict(model=model, data=small_data(), out_dir=str(out_dir), steps=3, questions_per_step=8,
                mini_batch_size=4, max_new_tokens=40, eval_max_new_tokens=40, lr=1e-4, device="cpu",
                progress=False, tensorboard=False)
    return ReFTConfig(**{**base, **kw})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------- a short run

@pytest.fixture(scope="module")
def ppo_run(warmup_model, parity_task, tmp_path_factory):
    cfg = reft_config(warmup_model, tmp_path_factory.mktemp("reft") / "run")
    return cfg, run_reft(cfg, task=parity_task)


def test_ppo_changes_policy_and_value_head(ppo_run, warmup_model):
    cfg, result = ppo_run
    run = Path(cfg.out_dir)
    last = run / "checkpoints" / "step-000003"
    assert result["last_checkpoint"] == str(last / "policy")
    assert json.loads((run / "latest.json").read_text()) == {"step": 3, "path": "checkpoints/step-000003"}
    before, after = weights(warmup_model), weights(last / "policy")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))}"
    head = torch.load(last / "value_head.pt")
    assert set(head) == {"linear.weight", "linear.bias"}
    assert head["linear.weight"].abs().sum() > 0 and head["linear.bias"].abs().sum() > 0  # was zero-initialised


def test_ppo_metrics(ppo_run):
    cfg, result = ppo_run
    history = result["history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    # before the first update the policy is the reference: KL exactly 0 (up to float noise)
    assert abs(history[0]["reft/kl"]) < 1e-6
    assert any(abs(h["reft/kl"]) > 1e-6 for h in history[1:])
    for h in history:
        assert 0.0 <= h["reft/accuracy"] <= 1.0 and h["reft/answered"] == 1.0
        assert h["reft/score"] == pytest.approx(h["reft/accuracy"] * 1.0 + (1 - h["reft/accuracy"]) * 0.1)
        assert 0 < h["reft/response_length"] <= cfg.max_new_tokens
        assert h["reft/grad_norm"] > 0 and h["reft/vf_loss"] > 0
        assert not any("seconds" in k for k in h)  # timings stay out of the resumable history
    # evaluation only at the last step (eval_every=10 > steps)
    assert [("eval/validation_accuracy" in h) for h in history] == [False, False, True]
    assert result["best_accuracy"] == history[-1]["eval/validation_accuracy"]
    logged = records(cfg.out_dir)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all("reft/seconds" in r and "reft/seconds_generate" in r for r in logged)
    assert untimed(logged) == untimed([{"step": h["step"], **h} for h in history])
    assert result["kl_coef"] == 0.01  # program CoT default
    assert json.loads((Path(cfg.out_dir) / "result.json").read_text())["history"] == json.loads(json.dumps(history))


def test_best_policy_loads_as_a_plain_causal_lm(ppo_run):
    cfg, result = ppo_run
    best = Path(result["best_checkpoint"])
    assert best == Path(cfg.out_dir) / "checkpoints" / "best" / "policy"
    model = AutoModelForCausalLM.from_pretrained(best)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    info = json.loads((best.parent / "info.json").read_text())
    assert info["step"] == 3 and info["validation_accuracy"] == result["best_accuracy"]
    assert (best.parent / "value_head.pt").exists()


def test_real_reward_runs_and_kl_starts_at_zero(warmup_model, small_task, tmp_path):
    """The real grader (sandboxed programs) in the loop. The warm-up model answers nothing, so every
    score is score_none = 0."""
    result = run_reft(reft_config(warmup_model, tmp_path / "run", steps=1, eval_every=0), task=small_task)
    (h,) = result["history"]
    assert h["reft/kl"] == 0.0 and h["reft/score"] == 0.0 and h["reft/answered"] == 0.0
    assert h["eval/validation_accuracy"] == 0.0


@pytest.mark.parametrize("advantage, samples", [("gae", 1), ("grpo", 2), ("rloo", 2)])
def test_ppo_learns_a_simple_reward(advantage, samples, warmup_model, small_task, tmp_path):
    """RL actually optimises the reward: with "short answers are correct", the rollout score climbs
    from about 0.3 to near 1 within 30 iterations (measured: last-5 mean 0.8-1.0) and responses get
    shorter, for the value-head PPO and both critic-free estimators."""
    task = BrevityTask(**vars(small_task))
    cfg = reft_config(warmup_model, tmp_path / "run", steps=30, questions_per_step=8 // samples,
                      samples_per_prompt=samples, advantage=advantage, lr=1e-3, eval_every=0, save_every=0)
    history = run_reft(cfg, task=task)["history"]
    score = [h["reft/score"] for h in history]
    length = [h["reft/response_length"] for h in history]
    first, last = sum(score[:5]) / 5, sum(score[-5:]) / 5
    assert last >= 0.6 and last >= first + 0.3, score
    assert sum(length[-5:]) / 5 < 0.7 * sum(length[:5]) / 5, length


# ------------------------------------------------------------------------------- resume

RESUME = dict(save_every=2, eval_every=2)


@pytest.fixture(scope="module")
def straight_run(warmup_model, parity_task, tmp_path_factory):
    """Run A: 4 iterations without interruption (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("resume") / "A"
    return out, run_reft(reft_config(warmup_model, out, steps=4, **RESUME), task=parity_task)


def assert_same_run(a_dir, a_result, b_dir, b_result) -> None:
    assert [h["step"] for h in a_result["history"]] == [1, 2, 3, 4]
    assert b_result["history"] == a_result["history"]
    assert untimed(records(b_dir)) == untimed(records(a_dir))
    assert b_result["best_accuracy"] == a_result["best_accuracy"]
    for run in (a_dir, b_dir):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-000004"]
    a_last, b_last = a_dir / "checkpoints" / "step-000004", b_dir / "checkpoints" / "step-000004"
    assert_same_weights(weights(a_last / "policy"), weights(b_last / "policy"))
    assert_same_weights(torch.load(a_last / "value_head.pt"), torch.load(b_last / "value_head.pt"))
    assert_same_weights(weights(a_dir / "checkpoints" / "best" / "policy"),
                        weights(b_dir / "checkpoints" / "best" / "policy"))
    assert json.loads((b_dir / "result.json").read_text())["history"] == json.loads(json.dumps(a_result["history"]))


def test_resume_is_exact(straight_run, warmup_model, parity_task, tmp_path):
    """B: 2 iterations, then resumed with steps=4. Same history, metrics.jsonl and weights as A
    (timings aside). The sampler's generator, torch's RNG (value-head dropout, mini-batch order)
    and AdamW's state all travel in the checkpoint; the question order is a function of the step."""
    a_dir, a = straight_run
    b_dir = tmp_path / "B"
    b_first = run_reft(reft_config(warmup_model, b_dir, steps=2, **RESUME), task=parity_task)
    assert b_first["history"] == a["history"][:2]
    b = run_reft(reft_config(warmup_model, b_dir, steps=4, **RESUME), resume=True, task=parity_task)
    assert_same_run(a_dir, a, b_dir, b)
    assert "steps: 4" in (b_dir / "config.yaml").read_text()  # the resumed run's config is the extended one


def test_resume_after_a_kill_between_checkpoints(straight_run, warmup_model, parity_task, tmp_path, monkeypatch):
    """B is killed during iteration 4, after iteration 3 was logged but not checkpointed: resume
    drops the orphan metrics record of iteration 3, redoes 3 and 4, and matches A exactly."""
    a_dir, a = straight_run
    b_dir = tmp_path / "B"

    def killed_at_step_3(step):
        if step == 3:  # 0-based: iteration 4, before its rollout
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_reft(reft_config(warmup_model, b_dir, steps=4, **RESUME), task=parity_task,
                 callbacks=Callbacks(on_step_begin=killed_at_step_3))
    assert [r["step"] for r in records(b_dir)] == [1, 2, 3]
    assert json.loads((b_dir / "latest.json").read_text())["step"] == 2
    b = run_reft(reft_config(warmup_model, b_dir, steps=4, **RESUME), resume=True, task=parity_task)
    assert_same_run(a_dir, a, b_dir, b)


def test_critic_warmup_trains_the_value_head_only_then_ppo(warmup_model, parity_task, tmp_path):
    """critic_warmup_steps=2 of 3: after 2 steps the policy is the warm-up model bit for bit and the
    value head has moved; the third step updates the policy."""
    run = tmp_path / "run"
    cfg = reft_config(warmup_model, run, critic_warmup_steps=2, steps=2, score_none=0.5)
    run_reft(cfg, task=parity_task)
    start = weights(warmup_model)
    assert_same_weights(start, weights(run / "checkpoints" / "step-000002" / "policy"))
    assert torch.load(run / "checkpoints" / "step-000002" / "value_head.pt")["linear.weight"].abs().sum() > 0
    run_reft(dataclasses.replace(cfg, steps=3), resume=True, task=parity_task)
    after = weights(run / "checkpoints" / "step-000003" / "policy")
    assert any(not torch.equal(start[k], after[k]) for k in start)


@pytest.mark.parametrize("engine", ["static", "graphed"])
def test_old_logprobs_from_the_engine_train_like_a_recomputed_pass(engine, warmup_model, parity_task, tmp_path):
    """engine_old_logprobs: the engine's log-probs and values of the sampled tokens replace the
    no-grad pass over the rollout; they differ from it only by float rounding, so 3 steps train
    the same weights to float tolerance."""
    common = dict(engine=engine, score_none=0.5, value_dropout=0.0, ppo_epochs=2)
    a = run_reft(reft_config(warmup_model, tmp_path / "a", **common), task=parity_task)
    b = run_reft(reft_config(warmup_model, tmp_path / "b", engine_old_logprobs=True, **common), task=parity_task)
    assert "reft/engine_logprob_gap" in a["history"][0] and "reft/engine_logprob_gap" not in b["history"][0]
    assert a["history"][0]["reft/engine_logprob_gap"] < 1e-4  # what b takes instead of its own pass
    for x, y in zip(a["history"], b["history"], strict=True):
        assert x["reft/score"] == y["reft/score"] and x["reft/kl"] == pytest.approx(y["reft/kl"], abs=1e-5)
    wa, wb = weights(a["last_checkpoint"]), weights(b["last_checkpoint"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=0, msg=k)
    start = weights(warmup_model)
    assert any(not torch.equal(start[k], wb[k]) for k in start)


@pytest.mark.parametrize("micro", [2, 4], ids=["micro-2", "micro-4-whole-groups"])
def test_gradient_accumulation_trains_like_one_mini_batch(micro, warmup_model, parity_task, tmp_path):
    """micro_batch_size: each mini-batch of 8 rows as 4 x 2 (groups split, no prompt sharing) or
    2 x 4 (whole groups of 4 samples) micro-batches, the losses weighted by their share of the
    responses, trains to the same weights and losses as one pass over the mini-batch."""
    common = dict(samples_per_prompt=4, questions_per_step=4, mini_batch_size=8, value_dropout=0.0, ppo_epochs=2,
                  critic_warmup_steps=1)  # the value-head-only first step goes through micro-batches too
    a = run_reft(reft_config(warmup_model, tmp_path / "a", **common), task=parity_task)
    b = run_reft(reft_config(warmup_model, tmp_path / "b", micro_batch_size=micro, **common), task=parity_task)
    for x, y in zip(a["history"], b["history"], strict=True):
        assert x["reft/score"] == y["reft/score"]
        for key in ("reft/pg_loss", "reft/vf_loss", "reft/kl"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    wa, wb = weights(a["last_checkpoint"]), weights(b["last_checkpoint"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
    assert any(not torch.equal(v, wb[k]) for k, v in weights(warmup_model).items())  # it trained


def test_micro_batch_must_divide_the_mini_batch(warmup_model, tmp_path):
    with pytest.raises(ValueError, match="micro_batch_size.*does not divide mini_batch_size=8"):
        reft_config(warmup_model, tmp_path / "x", mini_batch_size=8, micro_batch_size=3).validate()


def test_resume_without_checkpoint_is_an_error(warmup_model, parity_task, tmp_path):
    with pytest.raises(FileNotFoundError, match="latest.json"):
        run_reft(reft_config(warmup_model, tmp_path / "run"), resume=True, task=parity_task)


def test_fresh_run_refuses_a_folder_with_checkpoints(ppo_run, parity_task):
    cfg, _ = ppo_run
    with pytest.raises(FileExistsError):
        run_reft(cfg, task=parity_task)


# ------------------------------------------------------------------------------- options

@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_critic_free_advantages_run_without_value_head(advantage, warmup_model, parity_task, tmp_path):
    cfg = reft_config(warmup_model, tmp_path / "run", steps=2, questions_per_step=4, samples_per_prompt=2,
                      advantage=advantage, eval_every=0)
    result = run_reft(cfg, task=parity_task)
    last = tmp_path / "run" / "checkpoints" / "step-000002"
    assert not (last / "value_head.pt").exists()
    assert not (tmp_path / "run" / "checkpoints" / "best" / "value_head.pt").exists()
    for h in result["history"]:
        assert "reft/vf_loss" not in h and "reft/value_explained_var" not in h
        assert h["reft/grad_norm"] >= 0
    assert abs(result["history"][0]["reft/kl"]) < 1e-6
    before, after = weights(warmup_model), weights(last / "policy")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_kl_as_loss_with_k3(warmup_model, parity_task, tmp_path):
    cfg = reft_config(warmup_model, tmp_path / "run", steps=2, kl_in_reward=False, kl_estimator="k3",
                      kl_coef=0.1, eval_every=0)
    result = run_reft(cfg, task=parity_task)
    kls = [h["reft/kl"] for h in result["history"]]
    assert abs(kls[0]) < 1e-6 and kls[1] > 0  # k3 is non-negative, and the policy moved
    assert result["kl_coef"] == 0.1


def test_bfloat16_policy_with_value_head(warmup_model, parity_task, tmp_path):
    """dtype=bfloat16 (what dtype=auto picks on a GPU, and the paper config's setting) with the
    default GAE value head. The value head takes the policy's dtype (a float32 head would fail the
    first forward with "expected m1 and m2 to have the same dtype"). Also exercises top_p < 1."""
    cfg = reft_config(warmup_model, tmp_path / "run", steps=2, dtype="bfloat16", top_p=0.9, eval_every=0)
    result = run_reft(cfg, task=parity_task)
    assert abs(result["history"][0]["reft/kl"]) < 1e-6
    assert all(h["reft/vf_loss"] > 0 and h["reft/grad_norm"] > 0 for h in result["history"])
    last = tmp_path / "run" / "checkpoints" / "step-000002"
    assert all(t.dtype == torch.bfloat16 for t in weights(last / "policy").values())
    assert all(torch.isfinite(t.float()).all() for t in torch.load(last / "value_head.pt").values())


def test_bf16_mixed_precision_keeps_fp32_weights(warmup_model, parity_task, tmp_path):
    """mixed_precision=bf16: forwards under autocast, weights, value head and losses stay fp32.
    Old and reference log-probs come from the same bf16 forward of identical weights, so KL is
    still exactly 0 at the first iteration; the update still moves the policy."""
    cfg = reft_config(warmup_model, tmp_path / "run", steps=2, mixed_precision="bf16", eval_every=0)
    result = run_reft(cfg, task=parity_task)
    assert result["history"][0]["reft/kl"] == 0.0
    assert all(h["reft/vf_loss"] > 0 and h["reft/grad_norm"] > 0 for h in result["history"])
    last = weights(tmp_path / "run" / "checkpoints" / "step-000002" / "policy")
    assert all(t.dtype == torch.float32 for t in last.values())
    assert any(not torch.equal(last[k], t) for k, t in weights(warmup_model).items())


def test_hf_engine_rollouts_train_the_policy(warmup_model, parity_task, tmp_path, monkeypatch):
    """engine=hf: the step's rollout (8 questions x 2 samples) comes from transformers' `generate`,
    and PPO trains on it: every policy weight and the zero-initialised value head move; the first
    KL is 0 (old and reference policy are the same weights)."""
    from reftune.engines.hf import HFGenerator

    sampled = []
    real = HFGenerator.generate

    def counted(self, prompts, **kwargs):
        rollout = real(self, prompts, **kwargs)
        if not kwargs.get("greedy"):
            sampled.append((len(prompts), kwargs.get("num_samples", 1), len(rollout.texts)))
        return rollout

    monkeypatch.setattr(HFGenerator, "generate", counted)
    run = tmp_path / "run"
    result = run_reft(reft_config(warmup_model, run, steps=1, samples_per_prompt=2, engine="hf"), task=parity_task)
    assert sum(n for n, _, _ in sampled) == 8 and all(n * k == rows for n, k, rows in sampled)
    step = result["history"][0]
    assert abs(step["reft/kl"]) < 1e-6 and step["reft/grad_norm"] > 0 and step["reft/vf_loss"] > 0
    last = run / "checkpoints" / "step-000001"
    before, after = weights(warmup_model), weights(last / "policy")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert torch.load(last / "value_head.pt")["linear.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------- failures

def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(warmup_model, parity_task, tmp_path, monkeypatch):
    """The loss turns nan in the second iteration: FloatingPointError naming the last good checkpoint,
    which still loads and resumes."""
    real = algorithms.ppo_policy_loss
    calls = {"n": 0}
    per_step = 2 * (8 // 4)  # ppo_epochs * mini-batches per rollout

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > per_step else loss), stats

    monkeypatch.setattr(algorithms, "ppo_policy_loss", poisoned)
    run = tmp_path / "run"
    cfg = reft_config(warmup_model, run, steps=3, save_every=1, eval_every=0)
    with pytest.raises(FloatingPointError, match="latest.json") as err:
        run_reft(cfg, task=parity_task)
    assert "nan" in str(err.value) and "step 1" in str(err.value)
    assert json.loads((run / "latest.json").read_text())["step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no half-written folder
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000001" / "policy")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    monkeypatch.setattr(algorithms, "ppo_policy_loss", real)
    result = run_reft(cfg, resume=True, task=parity_task)
    assert [h["step"] for h in result["history"]] == [1, 2, 3]


@pytest.mark.parametrize("bad, message", [
    (dict(advantage="grpo", samples_per_prompt=1), "samples_per_prompt"),
    (dict(advantage="rloo", samples_per_prompt=1), "samples_per_prompt"),
    (dict(advantage="ppo"), "advantage"),
    (dict(eval_split="train"), "eval_split"),
    (dict(mini_batch_size=64), "mini_batch_size"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
])
def test_invalid_config_is_rejected_before_anything_runs(bad, message, parity_task, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_reft(reft_config("/nonexistent/model", run, **bad), task=parity_task)
    assert not run.exists()
