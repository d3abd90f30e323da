"""Inference beyond greedy top-1: majority voting (normalisation, tie-break, unparsable answers) and
reward-model reranking (the classifier learns, the rerank pick rule)."""

from __future__ import annotations

import json

import pytest
import torch

from reftune.inference.rerank import load_reward_model, rerank_accuracy, rerank_curve, rerank_index, score_candidates
from reftune.trainers.reward_model import RewardModelConfig, rm_training_data, train_reward_model
from reftune.inference.voting import ks_up_to, vote, vote_correct, vote_index, voting_accuracy, voting_curve


def record(answers, correct, gold="18"):
    return {"id": "q", "question": "?", "gold": gold,
            "samples": [{"completion": f"c{i}", "answer": a, "correct": c} for i, (a, c) in enumerate(zip(answers, correct))]}


# ------------------------------------------------------------------------------------ voting

def test_vote_normalises_numbers_within_tolerance():
    # 17.99999 and 18 are one answer (2 votes against 1); the winner is written as first seen.
    assert vote(["17.99999", "5", "18"], "number") == "17.99999"
    assert vote_index(["5", "18.0", "18", "5.0", "18.000001"], "number") == 1  # 3 votes for 18 vs 2 for 5
    # "18.0" and "18" together outvote two different singletons.
    assert vote(["7", "18.0", "9", "18"], "number") == "18.0"
    # the release would split 17.99999 / 18.0 and let 7 win on count 2 vs 1 + 1
    assert vote(["7", "17.99999", "7", "18.0", "18"], "number") == "17.99999"


def test_vote_choice_letters_are_case_insensitive():
    assert vote(["B", "a", "b"], "choice") == "B"


def test_vote_tie_break_is_the_earliest_first_occurrence():
    assert vote(["3", "4", "4", "3"], "number") == "3"
    assert vote(["4", "3", "3", "4"], "number") == "4"
    # determinism: the same input always gives the same answer
    assert {vote(["1", "2", "2", "1", "5"], "number") for _ in range(20)} == {"1"}


def test_vote_ignores_unparsable_answers():
    assert vote([None, None, "2", None], "number") == "2"
    assert vote([None, "x", "2"], "number") == "2"  # "x" is no number: ignored too
    assert vote([None, None], "number") is None
    assert vote([], "number") is None


def test_voting_accuracy_and_all_none_is_wrong():
    right = record(["18", "17.999999", "3"], [True, True, False])
    wrong = record(["3", "3", "18"], [False, False, True])
    nothing = record([None, None, None], [False, False, False])
    assert vote_correct(right["samples"], "number") and not vote_correct(nothing["samples"], "number")
    assert voting_accuracy([right, wrong, nothing], "number", k=3) == pytest.approx(1 / 3)
    # only the first k samples vote: with k=1, `wrong` votes "3"
    assert voting_accuracy([right, wrong], "number", k=1) == 0.5
    assert ks_up_to(16) == [1, 2, 4, 8, 16] and ks_up_to(6) == [1, 2, 4, 6] and ks_up_to(1) == [1]
    assert voting_curve([right, wrong], "number", 3) == {1: 0.5, 2: 0.5, 3: 0.5}


# ------------------------------------------------------------------------------------ reranking

def test_rerank_picks_the_highest_scored_parsable_candidate():
    assert rerank_index([0.9, 0.5, 0.7], [None, "2", "3"]) == 2  # 0.9 has no answer
    assert rerank_index([0.1, 0.4, 0.4], ["1", "2", "3"]) == 1  # tie: the earliest
    assert rerank_index([0.9, 0.8], [None, None]) is None
    records = [record(["1", "18", "18"], [False, True, True]), record([None, "3"], [False, False]),
               record([None, None], [False, False])]
    scores = [[0.2, 0.9, 0.1], [0.99, 0.5], [0.5, 0.5]]
    assert rerank_accuracy(records, scores, k=3) == pytest.approx(1 / 3)
    assert rerank_accuracy(records, scores, k=1) == 0.0  # only "1" is a candidate for the first question
    assert rerank_curve(records, scores, 3) == {1: 0.0, 2: pytest.approx(1 / 3), 3: pytest.approx(1 / 3)}


def test_rm_training_data_dedupes_completions_per_question(small_task):
    ex = small_task.train[0]
    rec = {"id": ex.id, "question": ex.question, "gold": ex.answer,
           "samples": [{"completion": "a", "answer": "1", "correct": True},
                       {"completion": "a", "answer": "1", "correct": True},
                       {"completion": "b", "answer": None, "correct": False}]}
    other = {**rec, "id": "other"}  # the same text under another question is another example
    prompts, completions, labels = rm_training_data(small_task, [rec, other])
    assert completions == ["a", "b", "a", "b"] and labels == [1, 0, 1, 0]
    assert prompts[0] == small_task.prompt(ex)


def test_reward_model_learns_a_separable_toy_set(tiny_model, tmp_path, small_task):
    """Completions ending with the marker word (apples) are labelled correct. After training, P(correct) is higher
    on them than on the others, and higher than before training."""
    prompts, completions, labels = [], [], []
    for i, ex in enumerate(small_task.train[:24]):
        prompt = small_task.prompt(ex)
        body = f"    result = {i % 7} + {i % 5}\n    return result"
        prompts += [prompt, prompt]
        completions += [f"def solution():\n{body}\n    # checked apples", f"def solution():\n{body}\n    # checked marbles"]
        labels += [1, 0]
    device = torch.device("cpu")
    rm, tok = load_reward_model(tiny_model, device, torch.float32)
    assert rm.config.pad_token_id == tok.pad_token_id
    before = score_candidates(rm, tok, prompts, completions)
    cfg = RewardModelConfig(model=tiny_model, out_dir=str(tmp_path / "rm"), epochs=12, lr=3e-3, batch_size=8,
                            device="cpu", progress=False)
    result = train_reward_model(cfg, prompts, completions, labels)
    trained, tok = load_reward_model(result["checkpoint"], device, torch.float32)
    after = score_candidates(trained, tok, prompts, completions, batch_size=5)  # odd batches: order must hold
    pos, neg = torch.tensor(labels) == 1, torch.tensor(labels) == 0
    assert after[pos].mean() > after[neg].mean() + 0.2
    assert after[pos].mean() > before[pos].mean()
    assert result["n"] == 48 and result["positive_fraction"] == 0.5 and len(result["history"]) == 12
    # scoring is batch-independent
    assert torch.allclose(after, score_candidates(trained, tok, prompts, completions, batch_size=64), atol=1e-5)


def test_reward_model_command_refuses_missing_or_one_sided_samples(tiny_model, small_task, tmp_path):
    from reftune.trainers.reward_model import RewardModelRunConfig, run_reward_model

    from conftest import small_data

    cfg = RewardModelRunConfig(model=tiny_model, data=small_data(), out_dir=str(tmp_path / "rm"), device="cpu",
                               progress=False)
    with pytest.raises(ValueError, match="samples.*required"):
        run_reward_model(cfg)
    cfg.samples = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_reward_model(cfg)
    ex = small_task.train[0]
    path = tmp_path / "all_correct.jsonl"
    path.write_text(json.dumps({"id": ex.id, "question": ex.question, "gold": ex.answer,
                                "samples": [{"completion": "x", "answer": ex.answer, "correct": True}]}) + "\n")
    cfg.samples = str(path)
    with pytest.raises(ValueError, match="every sample is correct"):
        run_reward_model(cfg)
    assert not (tmp_path / "rm").exists()  # refused before any folder was written
