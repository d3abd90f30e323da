"""The options beyond the paper (docs/algorithms.md) inside ReFT's loop: the batch layout decision,
dynamic sampling's filter and refill, overlong handling, validation of impossible combinations,
and short runs of each option with the value head and without. Their math is checked by hand in
tests/test_algorithms.py; here, that the loop wires it: runs train, resume exactly, refuse clearly.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_reft import ParityTask, assert_same_weights, records, reft_config, untimed, weights

from reftune.engines.base import Rollout
from reftune.tasks import Graded, Task
from reftune.trainers.batch_layout import BatchLayout
from reftune.trainers.reft import make_batch, run_reft
from reftune.trainers.rollout import ScoredRollout, concat_scored, step_metrics, take_rows
from reftune.trainers.rollout_source import DynamicSampling, StepRollout, SyncRollouts, refill_questions
from reftune.types import Example


@pytest.fixture(scope="module")
def parity_task(small_task):
    return ParityTask(**vars(small_task))


class AllCorrectTask(Task):
    """Every completion is correct: every group's samples get the same reward."""

    def grade(self, completions, examples):
        return [Graded("1", True) for _ in completions]


# ------------------------------------------------------------------------------- batch layout

def layout_cfg(**kw):
    base = dict(mini_batch_size=8, micro_batch_size=0, samples_per_prompt=4, gradient_checkpointing=False,
                logprob_chunk_size=0)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw, world, expected", [
    # (mini, micro, group, share_scoring, share_update, share_update_unwrapped)
    (dict(), 1, (8, 8, 4, 4, 4, 4)),                                   # whole groups everywhere
    (dict(micro_batch_size=2), 1, (8, 2, 4, 4, 1, 1)),                 # micro-batches split groups
    (dict(micro_batch_size=4), 1, (8, 4, 4, 4, 4, 4)),
    (dict(), 2, (4, 4, 4, 4, 1, 4)),                                   # DDP: one forward per backward
    (dict(gradient_checkpointing=True), 1, (8, 8, 4, 1, 1, 1)),        # no KV cache: no sharing
    (dict(logprob_chunk_size=16), 1, (8, 8, 4, 1, 1, 1)),
    (dict(mini_batch_size=6), 1, (6, 6, 1, 1, 1, 1)),                  # groups do not fit: rows one by one
    (dict(samples_per_prompt=1), 1, (8, 8, 1, 1, 1, 1)),
])
def test_batch_layout_plan(kw, world, expected):
    layout = BatchLayout.plan(layout_cfg(**kw), world)
    assert (layout.mini_batch, layout.micro_batch, layout.group, layout.share_scoring, layout.share_update,
            layout.share_update_unwrapped) == expected


def test_batch_layout_cuts_and_refusals():
    layout = BatchLayout.plan(layout_cfg(micro_batch_size=4), 1)
    torch.manual_seed(0)
    minis = layout.mini_batches(16)
    assert [len(m) for m in minis] == [8, 8] and sorted(torch.cat(minis).tolist()) == list(range(16))
    assert all(g.tolist() == list(range(g[0], g[0] + 4)) for m in minis for g in m.view(-1, 4))
    assert [len(m) for m in layout.micro_batches(minis[0])] == [4, 4]
    assert [len(m) for m in layout.mini_batches(12)] == [8, 4]  # a batch dynamic sampling left short
    assert layout.update_share(unwrapped=True) == layout.share_update_unwrapped
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        BatchLayout.plan(layout_cfg(), 3)
    with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the 4 rows"):
        BatchLayout.plan(layout_cfg(micro_batch_size=3), 2)


# ------------------------------------------------------------------------------- rollouts by hand

def fake_scored(scores: list[float], group: int, lengths: list[int] | None = None, ended=None,
                name: str = "q") -> ScoredRollout:
    """A scored rollout of len(scores) rows (groups of `group`), prompts of 2 tokens, responses of
    `lengths` tokens (default 3), without a model."""
    B = len(scores)
    lengths = lengths or [3] * B
    R = max(lengths)
    response_mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).long()
    questions = [Example(f"{name}{i // group}", "?", "1") for i in range(B)]
    rollout = Rollout(torch.arange(2 * B).view(B, 2), torch.ones(B, 2, dtype=torch.long),
                      torch.arange(B * R).view(B, R) * response_mask, response_mask, [f"t{i}" for i in range(B)],
                      [i // group for i in range(B)],
                      torch.tensor(ended if ended is not None else [True] * B),
                      torch.arange(B * R, dtype=torch.float32).view(B, R) * response_mask)
    return ScoredRollout(rollout, questions, [Graded(str(s), s == 1.0) for s in scores],
                         torch.tensor(scores, dtype=torch.float32))


def test_take_rows_and_concat_scored():
    a = fake_scored([1.0, 0.0, 0.5, 0.5], 2, lengths=[3, 1, 2, 2])
    kept = take_rows(a, [2, 3])
    assert kept.scores.tolist() == [0.5, 0.5] and kept.rollout.prompt_index == [0, 0]
    assert kept.rollout.response_ids.shape == (2, 2)  # cut to the longest kept response
    assert [e.id for e in kept.examples] == ["q1", "q1"] and kept.rollout.texts == ["t2", "t3"]
    both = concat_scored([a, fake_scored([1.0, 1.0], 2, name="r")], pad_id=0)
    assert both.rollout.prompt_index == [0, 0, 1, 1, 2, 2] and both.scores.shape == (6,)
    assert both.rollout.sampling_logprobs.shape == (6, 3)
    assert take_rows(a, []).scores.shape == (0,)


def test_step_metrics_count_the_responses_cut_at_the_limit():
    # 4 rows, rows 1 and 3 ended without a stop token: half were cut at max_new_tokens
    m = step_metrics("reft", fake_scored([1.0, 0.0, 0.1, 0.0], 2, lengths=[3, 1, 2, 2], ended=[True, False, True, False]),
                     {})
    assert m["reft/truncated"] == 0.5 and m["reft/response_length"] == 2.0 and m["reft/accuracy"] == 0.25


class ScriptedSource:
    """A rollout source replaying fixed scores, one list per call, recording the questions asked."""

    def __init__(self, rounds: list[list[float]], group: int, name: str = "s"):
        self.rounds, self.group, self.asked, self.name = list(rounds), group, [], name

    def next(self, step, questions):
        self.asked.append([q.id for q in questions])
        scored = fake_scored(self.rounds.pop(0), self.group, name=f"{self.name}{len(self.asked)}-")
        return StepRollout(scored, scored, step)

    def close(self):
        pass


def questions(n: int, name: str = "q") -> list[Example]:
    return [Example(f"{name}{i}", "?", "1") for i in range(n)]


def test_dynamic_sampling_keeps_mixed_groups_and_refills():
    # 3 questions x 2 samples. Round 0: groups (1,1) (0,1) (0,0) -> 1 mixed. Round 1: (1,0) (1,1)
    # (0.1,0) -> 2 mixed: 3 reached, stop. Trained: round 0's group 1, round 1's groups 0 and 2.
    # Sampled 6 groups, 3 of them uniform: dropped 0.5; trained 3 of 3.
    source = ScriptedSource([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 0.1, 0]], 2)
    refills = []
    ds = DynamicSampling(source, lambda step, r: refills.append((step, r)) or questions(3, "x"), 2, max_rounds=3,
                         pad_id=0)
    got = ds.next(5, questions(3))
    assert refills == [(5, 1)]
    assert got.scored.scores.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0, 0.1, 0.0])
    assert [e.id for e in got.scored.examples] == ["s1-1", "s1-1", "s2-0", "s2-0", "s2-2", "s2-2"]
    assert got.sampled.scores.shape == (12,) and got.policy_step == 5
    assert got.stats == {"refill_rounds": 1.0, "dropped_fraction": 0.5, "trained_fraction": 1.0}


def test_dynamic_sampling_stops_after_max_rounds_and_trims_to_the_target():
    # 4 questions wanted, 1 mixed group in each round of 4, 2 refill rounds at most: 12 groups sampled,
    # 9 dropped (0.75), 3 of the 4 wanted trained (0.75)
    rounds = [[1, 0, 1, 1, 0, 0, 1, 1]] * 3
    ds = DynamicSampling(ScriptedSource(rounds, 2), lambda s, r: questions(4, "x"), 2, max_rounds=2, pad_id=0)
    got = ds.next(0, questions(4))
    assert got.scored.scores.shape == (6,)
    assert got.stats == {"refill_rounds": 2.0, "dropped_fraction": pytest.approx(9 / 12), "trained_fraction": 0.75}
    # more mixed groups than wanted: the first `target` are kept; `agree` (the processes' minimum) trims further
    ds = DynamicSampling(ScriptedSource([[1, 0] * 4], 2), lambda s, r: [], 2, max_rounds=2, pad_id=0,
                         agree=lambda n: n - 1)
    got = ds.next(0, questions(4))
    assert got.scored.scores.shape == (6,) and got.stats["trained_fraction"] == 0.75


def test_dynamic_sampling_refills_from_its_own_source_beside_one_sampling_ahead():
    # The first part comes from a source sampling ahead (policy step 6 of step 7, its own stats);
    # the refill from the synchronous one. Round 0: (1,1) (0,1) -> 1 mixed of 2 wanted; refill:
    # (0,0) (1,0) -> 1 mixed. Trained: s1-1 and r1-1; the step's policy is the older one (6).
    class Ahead(ScriptedSource):
        def next(self, step, questions):
            got = super().next(step, questions)
            return StepRollout(got.scored, got.sampled, step - 1, {"policy_lag": 1.0})

    ahead, now = Ahead([[1, 1, 0, 1]], 2), ScriptedSource([[0, 0, 1, 0]], 2, name="r")
    ds = DynamicSampling(ahead, lambda s, r: questions(2, "x"), 2, max_rounds=2, pad_id=0, refills=now)
    got = ds.next(7, questions(2))
    assert ahead.asked == [["q0", "q1"]] and now.asked == [["x0", "x1"]]
    assert got.scored.scores.tolist() == [0.0, 1.0, 1.0, 0.0] and got.policy_step == 6
    assert [e.id for e in got.scored.examples] == ["s1-1", "s1-1", "r1-1", "r1-1"]
    assert got.stats == {"policy_lag": 1.0, "refill_rounds": 1.0, "dropped_fraction": 0.5, "trained_fraction": 1.0}


def test_dynamic_sampling_with_nothing_mixed_returns_an_empty_batch():
    ds = DynamicSampling(ScriptedSource([[1, 1]] * 2, 2), lambda s, r: questions(1, "x"), 2, max_rounds=1, pad_id=0)
    got = ds.next(0, questions(1))
    assert got.scored.scores.shape == (0,) and got.sampled.scores.shape == (4,)
    assert got.stats == {"refill_rounds": 1.0, "dropped_fraction": 1.0, "trained_fraction": 0.0}


def test_refill_questions_are_a_function_of_the_step():
    train = questions(50)
    a = refill_questions(train, 7, 2, 8, seed=3, max_rounds=3)
    assert [e.id for e in a] == [e.id for e in refill_questions(train, 7, 2, 8, seed=3, max_rounds=3)]
    others = {tuple(e.id for e in refill_questions(train, s, r, 8, seed=3, max_rounds=3))
              for s, r in [(7, 1), (7, 3), (6, 2), (8, 2)]}
    assert tuple(e.id for e in a) not in others and len(others) == 4


def test_sync_source_is_the_current_policy():
    got = SyncRollouts(lambda qs: fake_scored([1.0] * len(qs), 1)).next(4, questions(2))
    assert got.policy_step == 4 and got.sampled is got.scored and got.stats == {}


# ------------------------------------------------------------------------------- overlong

def test_overlong_mask_and_shape_in_the_batch():
    # rows of 3, 10 and 10 tokens, max_new_tokens 10; the last two cut (no EOS), scores 1, 1, 0
    scored = fake_scored([1.0, 1.0, 0.0], 1, lengths=[3, 10, 10], ended=[True, False, False])
    cfg = SimpleNamespace(overlong="none", max_new_tokens=10, overlong_buffer=4, overlong_penalty=0.5)
    got = StepRollout(scored, scored, 0)
    plain = make_batch(got, 0, cfg, torch.device("cpu"))
    assert torch.equal(plain.loss_mask, plain.response_mask) and plain.scores.tolist() == [1.0, 1.0, 0.0]
    masked = make_batch(got, 0, SimpleNamespace(**{**vars(cfg), "overlong": "mask"}), torch.device("cpu"))
    assert masked.loss_mask.sum(-1).tolist() == [3.0, 0.0, 0.0]
    # shape: free up to 10 - 4 = 6 tokens; 10 tokens -> 0.5 * clamp((6 - 10) / 4, -1, 0) = -0.5
    shaped = make_batch(got, 0, SimpleNamespace(**{**vars(cfg), "overlong": "shape"}), torch.device("cpu"))
    assert shaped.scores.tolist() == [1.0, 0.5, -0.5] and torch.equal(shaped.loss_mask, shaped.response_mask)


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad, message", [
    (dict(dual_clip=1.0), "dual_clip=1.0: must be a number > 1"),
    (dict(clip_high=0.1), "clip_high=0.1: is below the lower clip 0.2"),
    (dict(clip_low=0.3), "clip_high=None: is below the lower clip 0.3"),
    (dict(clip_low=0.0), "clip_low=0.0: must be a number > 0"),
    (dict(dynamic_sampling=True), "dynamic_sampling=True: compares the rewards .* samples_per_prompt >= 2"),
    (dict(policy_loss="cispo", importance_level="sequence"), "importance_level='sequence': must be token"),
    (dict(policy_loss="cispo", dual_clip=2.0), "dual_clip=2.0: does not apply to policy_loss=cispo"),
    (dict(policy_loss="reinforce"), "policy_loss='reinforce': must be one of ppo, cispo"),
    (dict(importance_level="segment"), "importance_level"),
    (dict(loss_aggregation="sum"), "loss_aggregation='sum': must be one of seq_mean_token_mean"),
    (dict(overlong="cut"), "overlong='cut': must be one of none, mask, shape"),
    (dict(overlong="shape", overlong_buffer=50), r"overlong_buffer=50: must be an integer in \[1, 40\]"),
    (dict(advantage="dr_grpo"), "samples_per_prompt >= 2"),
    (dict(advantage="grpo", samples_per_prompt=2, critic_warmup_steps=1), "critic_warmup_steps=1: warms up a value"),
    (dict(advantage="reinforce_pp", whiten_advantages=False), "whiten_advantages=False: must stay true"),
    (dict(dynamic_sampling_max_rounds=-1), "dynamic_sampling_max_rounds"),
    (dict(whiten_min_std=-1.0), "whiten_min_std"),
])
def test_impossible_combinations_are_refused_with_the_reason(bad, message, parity_task, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_reft(reft_config("/nonexistent/model", run, **bad), task=parity_task)
    assert not run.exists()


# ------------------------------------------------------------------------------- runs

@pytest.mark.parametrize("options", [
    dict(loss_aggregation="token_mean", clip_high=0.28, dual_clip=3.0),
    dict(loss_aggregation="seq_mean_token_sum_norm", importance_level="sequence", clip=0.01, clip_high=0.02),
    dict(policy_loss="cispo", clip_low=5.0, clip_high=0.28, loss_aggregation="token_mean"),  # no lower bound
    dict(advantage="reinforce_pp", gamma=0.99),
    dict(advantage="dr_grpo", loss_aggregation="seq_mean_token_sum_norm"),
    dict(advantage="grpo", policy_loss="cispo", clip_high=0.28),
    dict(advantage="rloo", importance_level="sequence"),
    dict(overlong="mask"),  # the warm-up model's first responses all run to max_new_tokens: only step 2 trains
    dict(overlong="shape", overlong_buffer=8, advantage="grpo"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_refinement_trains(options, warmup_model, parity_task, tmp_path):
    """Two iterations with each option, with the value head (GAE) or without: finite metrics (the
    explained variance is nan where no token trains), the policy moves, the value head exists
    exactly with GAE."""
    cfg = reft_config(warmup_model, tmp_path / "run", steps=2, questions_per_step=4, samples_per_prompt=2,
                      eval_every=0, **options)
    history = run_reft(cfg, task=parity_task)["history"]
    assert all(isinstance(v, (int, float)) and (v == v or k == "reft/value_explained_var")
               for h in history for k, v in h.items())
    last = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (last / "value_head.pt").exists() == (cfg.advantage == "gae")
    before, after = weights(warmup_model), weights(last / "policy")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if options.get("dual_clip"):
        assert "reft/dual_clipfrac" in history[0]


def test_token_mean_with_micro_batches_trains_like_one_mini_batch(warmup_model, parity_task, tmp_path):
    """The micro-batches of a token-mean loss weigh their token counts, not their rows: the
    accumulated update is the mini-batch's, to float rounding."""
    common = dict(samples_per_prompt=2, questions_per_step=4, mini_batch_size=8, value_dropout=0.0,
                  loss_aggregation="token_mean", eval_every=0)
    a = run_reft(reft_config(warmup_model, tmp_path / "a", **common), task=parity_task)
    b = run_reft(reft_config(warmup_model, tmp_path / "b", micro_batch_size=2, **common), task=parity_task)
    for x, y in zip(a["history"], b["history"], strict=True):
        for key in ("reft/pg_loss", "reft/vf_loss", "reft/kl"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    wa, wb = weights(a["last_checkpoint"]), weights(b["last_checkpoint"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)


DYNAMIC = dict(samples_per_prompt=2, questions_per_step=4, mini_batch_size=4, dynamic_sampling=True,
               dynamic_sampling_max_rounds=2, save_every=2, eval_every=2)


def test_dynamic_sampling_run_logs_and_resumes_exactly(warmup_model, parity_task, tmp_path):
    """A 4-step run with dynamic sampling against one stopped after 2 and resumed: the refill
    questions are a function of the step and the sampler's state travels in the checkpoint, so
    history and weights are the same."""
    a = run_reft(reft_config(warmup_model, tmp_path / "A", steps=4, **DYNAMIC), task=parity_task)
    for h in a["history"]:
        assert 0.0 <= h["reft/dropped_fraction"] <= 1.0 and 0.0 <= h["reft/trained_fraction"] <= 1.0
        assert h["reft/refill_rounds"] in (0.0, 1.0, 2.0)
    assert any(h["reft/dropped_fraction"] > 0 for h in a["history"])  # parity of 2 samples often agrees
    run_reft(reft_config(warmup_model, tmp_path / "B", steps=2, **DYNAMIC), task=parity_task)
    b = run_reft(reft_config(warmup_model, tmp_path / "B", steps=4, **DYNAMIC), resume=True, task=parity_task)
    assert b["history"] == a["history"]
    assert untimed(records(tmp_path / "B")) == untimed(records(tmp_path / "A"))
    last = "checkpoints/step-000004"
    assert_same_weights(weights(tmp_path / "A" / last / "policy"), weights(tmp_path / "B" / last / "policy"))


def test_dynamic_sampling_with_no_group_worth_training_skips_the_update(warmup_model, small_task, tmp_path):
    """Every sample correct: every group is dropped, the refill rounds find none either, and the
    step trains on nothing: the policy stays the warm-up model, the run still completes."""
    task = AllCorrectTask(**vars(small_task))
    cfg = reft_config(warmup_model, tmp_path / "run", steps=1, **{**DYNAMIC, "eval_every": 0})
    (h,) = run_reft(cfg, task=task)["history"]
    assert h["reft/trained_fraction"] == 0.0 and h["reft/dropped_fraction"] == 1.0 and h["reft/refill_rounds"] == 2.0
    assert h["reft/accuracy"] == 1.0 and "reft/kl" not in h and "reft/pg_loss" not in h
    assert_same_weights(weights(warmup_model), weights(tmp_path / "run" / "checkpoints" / "step-000001" / "policy"))


def test_float_noise_is_not_whitened_into_a_step(warmup_model, small_task, tmp_path):
    """The real grader on the warm-up model: every reward is 0, and the engine's log-probs differ
    from the reference pass only by float rounding (a KL of ~1e-7). REINFORCE++ whitens the
    returns: without the guard that noise became unit-sized advantages and Adam moved every weight
    by ~lr; with it the advantages are 0, no gradient, and the policy is the warm-up model."""
    cfg = reft_config(warmup_model, tmp_path / "run", steps=1, eval_every=0, advantage="reinforce_pp",
                      engine="static", engine_old_logprobs=True, lr=1e-3)
    (h,) = run_reft(cfg, task=small_task)["history"]
    assert h["reft/score"] == 0.0 and h["reft/kl"] != 0.0 and abs(h["reft/kl"]) < 1e-4
    assert_same_weights(weights(warmup_model), weights(tmp_path / "run" / "checkpoints" / "step-000001" / "policy"))
    unguarded = dataclasses.replace(cfg, out_dir=str(tmp_path / "unguarded"), whiten_min_std=0.0)
    run_reft(unguarded, task=small_task)
    start, moved = weights(warmup_model), weights(tmp_path / "unguarded" / "checkpoints" / "step-000001" / "policy")
    assert any(not torch.equal(start[k], moved[k]) for k in start)
