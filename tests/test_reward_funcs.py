"""Reward functions in TRL's convention (reftune/rewards/functions.py): loading by name, the weighted
sum with None as "no score", the columns a function receives, clear errors naming the function and
row, and ReFT / Online-ST runs that train with them and log each function's mean."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import reward_fns
from conftest import small_data
from instruct_model import CHATML

from reftune.config import ConfigError
from reftune.models import load_causal_lm, load_tokenizer
from reftune.rewards.functions import RewardFunctionError, RewardSet, build_sources
from reftune.rewards.score import RewardSpec
from reftune.tasks import DataConfig, load_task
from reftune.trainers.reft import ReFTConfig
from reftune.trainers.rollout import build_rewards, reward_inputs, sample_and_score, step_questions

FNS = Path(__file__).resolve().parent / "reward_fns.py"


def columns(**kw) -> dict[str, list]:
    return {"id": ["q-0", "q-1", "q-2"], "answer": ["5", "5", "5"], **kw}


def test_weighted_sum_with_none_as_no_score_by_hand():
    sources = build_sources(["correctness", "reward_fns:short_answer", "reward_fns:exact_gold"], [1.0, 0.5, 2.0])
    completions = ["... is: 5", "x" * 200 + " is: 4", "no answer"]
    cols = columns(extracted=["5", "4", None], correct=[True, False, False])
    totals, means, scored = RewardSet(sources).score(["p"] * 3, completions, cols)
    # row 0: 1 + 0.5*1 + 2*1; row 1: 0.1 + 0.5*0 + 2*0; row 2: 0 + 0.5*1 + (exact_gold: None, nothing)
    assert totals == pytest.approx([3.5, 0.1, 0.5])
    assert means == pytest.approx({"correctness": 1.1 / 3, "short_answer": 2 / 3, "exact_gold": 0.5})
    assert scored == pytest.approx({"correctness": 1.0, "short_answer": 1.0, "exact_gold": 2 / 3})
    # The logged identity the ReFT test relies on: mean reward = sum of weight * mean * fraction scored.
    assert sum(totals) / 3 == pytest.approx(sum(s.weight * means[s.name] * scored[s.name] for s in sources))


def test_score_settings_reach_the_builtin_correctness():
    totals, _, _ = RewardSet.correctness_only(RewardSpec(2.0, -1.0, -3.0)).score(
        ["p"] * 3, ["a", "b", "c"], columns(extracted=["5", "4", None], correct=[True, False, False]))
    assert totals == [2.0, -1.0, -3.0]


@pytest.mark.parametrize("name, message", [
    ("boom_on_id", r"reward_fns:boom_on_id: raised ZeroDivisionError: division by zero on row 1 \(id 'q-1'\)"),
    ("wrong_length", r"reward_fns:wrong_length: returned 4 values for 3 completions"),
    ("not_a_number", r"reward_fns:not_a_number: row 1 \(id 'q-1'\) got 'high'; expected a finite number"),
    ("not_finite", r"reward_fns:not_finite: row 0 \(id 'q-0'\) got nan; expected a finite number"),
    ("no_kwargs", r"reward_fns:no_kwargs: raised TypeError.*on row 0.*take \*\*kwargs"),
    ("returns_one_number", r"reward_fns:returns_one_number: returned 1.0; expected a list of 3 numbers"),
])
def test_a_bad_function_is_named_with_the_row(name, message, monkeypatch):
    monkeypatch.setenv("REWARD_FNS_BOOM_ID", "q-1")
    rewards = RewardSet(build_sources([f"reward_fns:{name}"], []))
    with pytest.raises(RewardFunctionError, match=message):
        rewards.score(["p"] * 3, ["a", "b", "c"], columns(extracted=["5"] * 3, correct=[True] * 3))


@pytest.mark.parametrize("overrides, message", [
    (dict(reward_funcs=["no_such_module_xyz:fn"]), r"reward_funcs=.*cannot import no_such_module_xyz"),
    (dict(reward_funcs=["reward_fns:missing"]), r"reward_fns has no function 'missing'"),
    (dict(reward_funcs=["not a name"]), r"expected a built-in \(correctness, answered\), package.module:function"),
    (dict(reward_funcs=[f"{FNS.parent}/nope.py:fn"]), r"reward function file not found"),
    (dict(reward_funcs=["correctness", "reward_fns:short_answer"], reward_weights=[1.0]),
     r"reward_weights=\[1.0\]: has 1 weight\(s\) for 2 reward function\(s\)"),
    (dict(reward_funcs=[]), r"reward_funcs=\[\]: is empty and there is no reward_model"),
])
def test_config_refuses_bad_reward_functions_before_any_model(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ReFTConfig(model="m", data=small_data(), **overrides).validate()


def test_names_by_file_path_and_by_module_load_the_same_function():
    by_file, by_module = build_sources([f"{FNS}:short_answer"], []), build_sources(["reward_fns:short_answer"], [])
    assert by_file[0].name == by_module[0].name == "short_answer"
    assert by_file[0].fn(["p"], ["x"]) == by_module[0].fn(["p"], ["x"]) == [1.0]


def _json_task(tmp_path, small_task) -> DataConfig:
    """The small task written as json rows with one more column, `difficulty`."""
    rows = lambda exs: [{"item_id": ex.id, "question": ex.question, "answer_cot": ex.cot,  # noqa: E731
                         "answer_value": ex.answer, "difficulty": len(ex.question) % 3} for ex in exs]
    (tmp_path / "train.json").write_text(json.dumps(rows(small_task.train + small_task.validation)))
    (tmp_path / "test.json").write_text(json.dumps(rows(small_task.test)))
    return DataConfig(name="json", style="program", train_path=str(tmp_path / "train.json"),
                      test_path=str(tmp_path / "test.json"), validation_size=8)


def test_functions_get_the_rows_columns_and_the_graders_verdict(tmp_path, warmup_model, small_task):
    from reftune.engines.static import StaticSampler

    task = load_task(_json_task(tmp_path, small_task), load_tokenizer(warmup_model))
    model = load_causal_lm(warmup_model, "cpu", None)
    gen = StaticSampler(model, load_tokenizer(warmup_model), 64, seed=0)
    reward_fns.CALLS.clear()
    rewards = RewardSet(build_sources(["correctness", "reward_fns:spy"], []))
    questions = task.train[:3]
    scored = sample_and_score(gen, task, questions, 2, 1.0, 1.0, 24, rewards)
    call = reward_fns.CALLS[-1]
    assert call["id"] == [ex.id for ex in scored.examples] and len(call["id"]) == 6
    assert call["answer"] == [ex.answer for ex in scored.examples]
    assert call["difficulty"] == [len(ex.question) % 3 for ex in scored.examples]  # the dataset's own column
    assert call["extracted"] == [g.answer for g in scored.graded]
    assert call["correct"] == [g.correct for g in scored.graded]
    assert call["prompts"] == [task.prompt(ex, for_generation=True) for ex in scored.examples]
    assert call["completions"] == [task.completion_text(ex, t) for ex, t in zip(scored.examples, scored.rollout.texts)]
    assert call["prompt_text"] == call["prompts"]
    assert call["ended"] == scored.rollout.ended_with_eos.tolist()
    assert scored.scores.tolist() == pytest.approx([0.5 + (1.0 if g.correct else 0.1 if g.answer else 0.0)
                                                    for g in scored.graded])
    assert scored.reward_means["spy"] == 0.5 and scored.reward_means["spy_scored"] == 1.0


def test_chat_prompts_reach_functions_as_messages(tiny_model, small_task):
    tok = copy.deepcopy(load_tokenizer(tiny_model))
    tok.chat_template = CHATML
    task = load_task(small_data(prompt_format="chat", system_prompt="Be brief."), tok)
    ex = task.test[0]
    graded = task.grade(["x"], [ex])
    prompts, completions, cols = reward_inputs(task, [ex], ["x"], graded)
    assert prompts == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": ex.question}]]
    assert completions == [[{"role": "assistant", "content": "x"}]]  # TRL's conversational completions
    assert cols["prompt_text"] == [task.prompt(ex)]


def test_a_reward_model_is_one_more_reward(warmup_model, small_task):
    """A sequence classifier on the tiny checkpoint (new score head): P(correct) in (0, 1) per row."""
    from reftune.engines.static import StaticSampler
    import torch

    cfg = ReFTConfig(model=warmup_model, data=small_data(), reward_funcs=["correctness"], reward_model=warmup_model,
                     reward_model_weight=0.0)
    rewards = build_rewards(cfg, torch.device("cpu"), torch.float32)
    assert [s.name for s in rewards.sources] == ["correctness", "reward_model"]
    gen = StaticSampler(load_causal_lm(warmup_model, "cpu", None), load_tokenizer(warmup_model), 64, seed=0)
    scored = sample_and_score(gen, small_task, small_task.train[:2], 2, 1.0, 1.0, 16, rewards)
    assert 0.0 < scored.reward_means["reward_model"] < 1.0
    # Weight 0: the total is the correctness score alone.
    assert scored.scores.tolist() == pytest.approx([1.0 if g.correct else 0.1 if g.answer else 0.0
                                                    for g in scored.graded])


def _run_config(cls, model, out_dir, **kw):
    base = dict(model=model, data=small_data(), out_dir=str(out_dir), steps=2, questions_per_step=4,
                samples_per_prompt=2, mini_batch_size=4, max_new_tokens=24, eval_max_new_tokens=24, lr=1e-4,
                eval_every=0, save_every=0, device="cpu", progress=False, tensorboard=False,
                reward_funcs=["correctness", "reward_fns:short_answer", f"{FNS}:exact_gold"],
                reward_weights=[1.0, 0.5, 2.0])
    return cls(**{**base, **kw})


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.endswith("/score") for k in r)]


@pytest.mark.parametrize("trainer", ["reft", "online_st"])
def test_a_run_trains_with_two_functions_and_logs_each_mean(trainer, warmup_model, small_task, tmp_path):
    from reftune.trainers.online_st import OnlineSTConfig, run_online_st
    from reftune.trainers.reft import run_reft

    cls, run = (ReFTConfig, run_reft) if trainer == "reft" else (OnlineSTConfig, run_online_st)
    result = run(_run_config(cls, warmup_model, tmp_path / trainer), task=small_task)
    rows = _metrics(tmp_path / trainer)
    assert len(rows) == 2 and Path(result["last_checkpoint"]).is_dir()
    weights = {"correctness": 1.0, "short_answer": 0.5, "exact_gold": 2.0}
    for row in rows:
        means = {name: row[f"{trainer}/reward/{name}"] for name in weights}
        scored = {name: row[f"{trainer}/reward/{name}_scored"] for name in weights}
        assert scored["correctness"] == scored["short_answer"] == 1.0 and 0.0 <= scored["exact_gold"] <= 1.0
        # The step's mean reward is the weighted sum of the functions' means over the rows they scored.
        assert row[f"{trainer}/score"] == pytest.approx(sum(w * means[n] * scored[n] for n, w in weights.items()),
                                                         abs=1e-6)


def test_a_function_that_raises_stops_the_run_naming_it_and_the_row(warmup_model, small_task, tmp_path,
                                                                  monkeypatch):
    from reftune.trainers.reft import run_reft

    first = step_questions(small_task.train, 0, 4, 0)[0]
    monkeypatch.setenv("REWARD_FNS_BOOM_ID", first.id)
    cfg = _run_config(ReFTConfig, warmup_model, tmp_path / "boom", reward_funcs=["reward_fns:boom_on_id"],
                      reward_weights=[])
    with pytest.raises(RewardFunctionError, match=rf"reward_fns:boom_on_id: raised ZeroDivisionError.* on row 0 "
                                                   rf"\(id '{first.id}'\)"):
        run_reft(cfg, task=small_task)


def test_the_migration_guides_example_functions_score_as_documented():
    guide = Path(__file__).resolve().parents[1] / "docs" / "examples" / "rewards.py"
    rewards = RewardSet(build_sources([f"{guide}:brevity", f"{guide}:matches_gold", f"{guide}:missing_eos_penalty"],
                                      [1.0, 1.0, 1.0]))
    completions = ["x" * 100, [{"role": "assistant", "content": "x" * 500}], ""]
    _, means, scored = rewards.score(["p"] * 3, completions, columns(extracted=["5", "4", None], correct=[True] * 3,
                                                                      ended=[True, False, True]))
    assert means == pytest.approx({"brevity": (0.75 + 0.0 + 1.0) / 3, "matches_gold": 0.5,
                                   "missing_eos_penalty": -1 / 3})
    assert scored["matches_gold"] == pytest.approx(2 / 3)
