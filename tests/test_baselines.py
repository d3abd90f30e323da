"""The paper's self-training baselines: Offline-ST's data (filter, dedupe, cap, gold once) and run,
Online-ST's cross-entropy data (own correct samples + gold only) and loop (it trains, it resumes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_data
from safetensors.torch import load_file

from reftune.engines.base import Rollout
from reftune.trainers.offline_st import OfflineSTConfig, build_offline_st_examples, run_offline_st
from reftune.trainers.online_st import OnlineSTConfig, build_ce_batch, online_st_config_from_reft, run_online_st, split_even
from reftune.trainers.reft import ReFTConfig
from reftune.trainers.rollout import ScoredRollout
from reftune.trainers.sft import SFTConfig
from reftune.trainers.supervised import IGNORE
from reftune.tasks import Example, Graded, Task


class ParityTask(Task):
    """Same questions; a completion is "correct" when its text has even length (so some are)."""

    def grade(self, completions, examples):
        return [Graded(str(len(c) % 2), len(c) % 2 == 0) for c in completions]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


# ------------------------------------------------------------------------------------ Offline-ST data

def sample(text, correct=True):
    return {"completion": text, "answer": "1" if correct else "2", "correct": correct}


def test_offline_st_keeps_distinct_correct_samples_and_the_gold_once():
    a = Example("a", "qa", "1", "gold a")
    b = Example("b", "qb", "2", "gold b")
    c = Example("c", "qc", "3", "gold c")
    records = [
        {"id": "a", "question": "qa", "samples": [sample("x"), sample("wrong", False), sample("x"), sample("gold a"),
                                sample(" x\n"), sample("y"), sample("z"), sample("w")]},
        {"id": "b", "question": "qb", "samples": [sample("wrong", False), sample("wrong", False)]},
    ]  # c has no samples at all
    out = build_offline_st_examples([a, b, c], records, max_per_question=2)
    assert [(e.id, e.cot) for e in out] == [
        ("a", "gold a"), ("a/sample-1", "x"), ("a/sample-2", "y"),  # x once, the gold copy dropped, capped at 2
        ("b", "gold b"),
        ("c", "gold c"),
    ]
    assert all(e.question == "qa" and e.answer == "1" for e in out[:3])
    # without a cap everything distinct and correct stays: x, y, z, w
    assert [e.cot for e in build_offline_st_examples([a], records[:1], 10)] == ["gold a", "x", "y", "z", "w"]
    with pytest.raises(ValueError, match="not training questions"):
        build_offline_st_examples([b], records, 10)
    # the same id with another question: the samples belong to another version of the task
    with pytest.raises(ValueError, match="another version"):
        build_offline_st_examples([Example("a", "changed", "1", "gold a")], records[:1], 10)


def test_offline_st_run_samples_and_trains_from_the_base_model(tiny_model, warmup_model, small_task, tmp_path):
    task = ParityTask(**vars(small_task))
    cfg = OfflineSTConfig(base_model=tiny_model, warmup_model=warmup_model, data=small_data(),
                          out_dir=str(tmp_path / "off"), k=2, max_per_question=1, max_new_tokens=30,
                          step_budget_epochs=2,
                          device="cpu", progress=False,
                          sft=SFTConfig(epochs=5, batch_size=16, lr=3e-3, eval_split="none", tensorboard=False))
    result = run_offline_st(cfg, task=task)
    lines = (tmp_path / "off" / "train_samples.jsonl").read_text().splitlines()
    assert len(lines) == len(task.train) and all(len(json.loads(x)["samples"]) == 2 for x in lines)
    assert result["n_gold"] == len(task.train) and 0 < result["n_kept"] <= len(task.train)
    # the step budget: 2 epochs of gold alone = round(2 * n_gold / (n_gold + n_kept)) epochs of the union
    assert result["epochs"] == max(1, round(2 * result["n_gold"] / (result["n_gold"] + result["n_kept"])))
    assert len(result["history"]) == result["epochs"]
    sft_cfg = (tmp_path / "off" / "sft" / "config.yaml").read_text()
    assert f"model: {tiny_model}" in sft_cfg  # from the BASE model, not the warm-up one
    assert weights(result["best_checkpoint"]).keys() == weights(tiny_model).keys()


# ------------------------------------------------------------------------------------ Online-ST data

def synthetic_scored(task: Task, examples: list[Example], texts: list[str], correct: list[bool]) -> ScoredRollout:
    n = len(texts)
    rollout = Rollout(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                      torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long), texts,
                      list(range(n)), torch.ones(n, dtype=torch.bool))
    graded = [Graded("1" if c else "2", c) for c in correct]
    scores = torch.tensor([1.0 if c else 0.1 for c in correct])
    return ScoredRollout(rollout, examples, graded, scores)


def labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE], skip_special_tokens=True)


def test_online_st_ce_batch_covers_only_correct_samples_and_gold(small_task, tiny_model):
    from reftune.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    q1, q2 = small_task.train[0], small_task.train[1]
    # three samples per question: rows 0-2 -> q1, rows 3-5 -> q2. Correct: rows 1 and 2 (the same CoT),
    # row 3 (q2's gold CoT itself) and row 4.
    texts = ["def solution():\n    return 1", "def solution():\n    return 2", "def solution():\n    return 2",
             q2.cot, "def solution():\n    return 4", "def solution():\n    return 5"]
    scored = synthetic_scored(small_task, [q1, q1, q1, q2, q2, q2], texts, [False, True, True, True, True, False])
    batch = build_ce_batch(small_task, scored, tok, max_length=512)
    assert [q.id for q in batch] == [q1.id, q2.id]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert [decode(t) for t in batch[0].targets] == [q1.cot, texts[1]]
    assert (batch[0].gold_count, batch[0].own_count) == ([1, 0], [0, 2])  # the twice-sampled CoT: one row, counted twice
    assert [decode(t) for t in batch[1].targets] == [q2.cot, texts[4]]
    assert (batch[1].gold_count, batch[1].own_count) == ([1, 0], [1, 1])  # the sample equal to the gold shares its row
    # the loss covers the CoT and the EOS, never the prompt
    for q, ex in zip(batch, (q1, q2)):
        assert q.prompt == tok(small_task.prompt(ex), add_special_tokens=False)["input_ids"]
        assert all(t[-1] == tok.eos_token_id for t in q.targets)
    # nothing correct: only the gold rows
    none = build_ce_batch(small_task, synthetic_scored(small_task, [q1, q2], texts[:2], [False, False]), tok, 512)
    assert [(q.id, len(q.targets), q.own_count) for q in none] == [(q1.id, 1, [0]), (q2.id, 1, [0])]


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared-prompts", "full-rows"])
def test_question_ce_is_the_token_mean_ce_of_every_copy(small_task, tiny_model, share_prompts):
    """The weighted rows give what `sft_loss` gives over the rows with every copy written out, per
    term, and the same gradients: a row counted n times is n copies of it. Prompts run once
    (`share_prompts`) or with every row; questions have different numbers of rows."""
    from transformers import AutoModelForCausalLM

    from reftune.models import load_tokenizer
    from reftune.trainers.online_st import QuestionCE, question_ce
    from reftune.trainers.supervised import collate, encode_sft_example, sft_loss

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ex = small_task.train[:3]
    other = [small_task.target(e) for e in small_task.train[3:6]]
    rows = {  # question -> (CoT text, gold count, own count)
        0: [(small_task.target(ex[0]), 1, 2), (other[0], 0, 1)],
        1: [(small_task.target(ex[1]), 1, 0)],
        2: [(small_task.target(ex[2]), 1, 0), (other[1], 0, 3), (other[2], 0, 1)],
    }
    questions, gold, own = [], [], []
    for i, cots in rows.items():
        enc = [encode_sft_example(tok, small_task.prompt(ex[i]), cot, 512) for cot, _, _ in cots]
        n_prompt = sum(lab == -100 for lab in enc[0][1])
        questions.append(QuestionCE(ex[i].id, enc[0][0][:n_prompt], [ids[n_prompt:] for ids, _ in enc],
                                    [g for _, g, _ in cots], [o for _, _, o in cots]))
        for e, (_, g, o) in zip(enc, cots):
            gold += [e] * g
            own += [e] * o

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    gold_loss, own_loss = question_ce(model, questions, tok.pad_token_id, torch.device("cpu"), share_prompts)
    got = grads(gold_loss + 2 * own_loss)
    want_gold, want_own = (s / n for s, n in (sft_loss(model, collate(part, tok.pad_token_id)) for part in (gold, own)))
    torch.testing.assert_close(gold_loss, want_gold)
    torch.testing.assert_close(own_loss, want_own)
    for g, w in zip(got, grads(want_gold + 2 * want_own)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # no own row at all: the own term is None
    only_gold = [QuestionCE(q.id, q.prompt, q.targets[:1], [1], [0]) for q in questions]
    assert question_ce(model, only_gold, tok.pad_token_id, torch.device("cpu"), share_prompts)[1] is None
    # max_length under the prompt's length leaves no target token: a zero loss, not a crash
    cut = [QuestionCE(q.id, q.prompt, [[]], [1], [1]) for q in questions]
    assert [float(x) for x in question_ce(model, cut, tok.pad_token_id, torch.device("cpu"), share_prompts)] == [0, 0]


def test_split_even_and_config_from_reft():
    assert [len(p) for p in split_even(list(range(7)), 3)] == [3, 2, 2]
    assert split_even([1], 3) == [[1], [], []]
    reft = ReFTConfig(model="m", steps=7, questions_per_step=5, samples_per_prompt=2, lr=1e-4, ppo_epochs=3,
                      temperature=0.7, max_new_tokens=33)
    cfg = online_st_config_from_reft(reft, out_dir="x")
    assert (cfg.model, cfg.steps, cfg.questions_per_step, cfg.samples_per_prompt, cfg.lr, cfg.update_epochs,
            cfg.temperature, cfg.max_new_tokens, cfg.out_dir) == ("m", 7, 5, 2, 1e-4, 3, 0.7, 33, "x")


# ------------------------------------------------------------------------------------ Online-ST loop

def online_config(model, out_dir, **kw) -> OnlineSTConfig:
    base = dict(model=model, data=small_data(), out_dir=str(out_dir), steps=2, questions_per_step=8,
                samples_per_prompt=2, mini_batch_size=8, max_new_tokens=30, eval_max_new_tokens=30, lr=1e-3,
                eval_every=0, save_every=1, device="cpu", progress=False, tensorboard=False)
    return OnlineSTConfig(**{**base, **kw})


def test_online_st_trains_and_resumes_exactly(warmup_model, small_task, tmp_path):
    task = ParityTask(**vars(small_task))
    result = run_online_st(online_config(warmup_model, tmp_path / "full"), task=task)
    before, after = weights(warmup_model), weights(result["last_checkpoint"])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    history = result["history"]
    assert [h["step"] for h in history] == [1, 2]
    assert all(h["online_st/own_examples"] > 0 and "online_st/loss_own" in h for h in history)
    assert "eval/validation_accuracy" in history[-1] and Path(result["best_checkpoint"]).exists()

    # one step, then resume for the second: the same weights as the uninterrupted run
    run_online_st(online_config(warmup_model, tmp_path / "cut", steps=1), task=task)
    resumed = run_online_st(online_config(warmup_model, tmp_path / "cut"), resume=True, task=task)
    again = weights(resumed["last_checkpoint"])
    assert all(torch.allclose(after[k], again[k], atol=1e-6) for k in after)
    # (the cut run also evaluated at its last step, 1: that record alone has an extra eval entry)
    def no_eval(rows):
        return [{k: v for k, v in h.items() if not k.startswith("eval/")} for h in rows]

    assert no_eval(resumed["history"]) == no_eval(history)
