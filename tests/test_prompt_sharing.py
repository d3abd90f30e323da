"""Running each question's prompt once for its samples (policy.shared_prompt_forward) computes what
the full forward pass computes, and a ReFT run that uses it trains as one that does not."""

from __future__ import annotations

import pytest
import torch
from conftest import small_data
from test_reft import ParityTask, weights

from reftune.engines import make_generator
from reftune.models import load_causal_lm, load_tokenizer
from reftune.trainers import algorithms as A
from reftune.trainers.policy import ValueHead, forward_logits_values, policy_forward, shared_prompt_forward
from reftune.trainers.reft import ReFTConfig, run_reft, shuffled_groups


@pytest.fixture(scope="module")
def grouped(warmup_model, small_task):
    """(model, value head with non-zero weights, rollout of 3 samples for each of 5 prompts)."""
    torch.manual_seed(0)
    tok = load_tokenizer(warmup_model)
    model = load_causal_lm(warmup_model, torch.device("cpu"), torch.float32)
    head = ValueHead(model.config.hidden_size, dropout=0.0)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    gen = make_generator("cached", model, tok, 64, seed=0)
    rollout = gen.generate([small_task.prompt(e) for e in small_task.train[:5]], num_samples=3, max_new_tokens=24)
    assert len(set(rollout.response_mask.sum(-1).tolist())) > 1  # responses of several lengths
    return model, head, rollout


def both(model, head, ro):
    P = ro.prompt_ids.shape[1]
    full = forward_logits_values(model, head, ro.input_ids, ro.attention_mask, P)
    shared = shared_prompt_forward(model, head, ro.input_ids, ro.attention_mask, ro.response_ids, P, 3)
    return full, shared


def test_same_logits_and_values(grouped):
    model, head, ro = grouped
    model.eval()
    with torch.no_grad():
        (logits, values), (s_logits, s_values) = both(model, head, ro)
    mask = ro.response_mask.bool()
    assert s_logits.shape == logits.shape and s_values.shape == values.shape
    assert (s_logits - logits).abs()[mask].max() < 1e-4
    assert (s_values - values).abs()[mask].max() < 1e-5


def test_a_mini_batch_cut_to_its_longest_response_computes_the_same(grouped):
    """ReFT cuts each mini-batch to its longest response: columns of padding after every row's
    response change neither the log-probs nor the values of the kept positions (so no masked
    loss). Here the rollout gets 7 such columns and is compared with itself without them."""
    model, head, ro = grouped
    model.eval()
    P, extra = ro.prompt_ids.shape[1], 7
    pad = lambda t, v: torch.cat([t, t.new_full((t.shape[0], extra), v)], 1)  # noqa: E731
    with torch.no_grad():
        cut = policy_forward(model, head, ro.input_ids, ro.attention_mask, ro.response_ids, P, group_size=3)
        wide = policy_forward(model, head, pad(ro.input_ids, 0), pad(ro.attention_mask, 0), pad(ro.response_ids, 0),
                              P, group_size=3)
    mask, R = ro.response_mask.bool(), ro.response_ids.shape[1]
    for a, b in zip(wide[:2], cut[:2]):
        assert a.shape[1] == R + extra and (a[:, :R] - b).abs()[mask].max() < 1e-5


def test_same_gradients(grouped):
    model, head, ro = grouped
    model.train()
    P, mask = ro.prompt_ids.shape[1], ro.response_mask.float()
    grads = []
    for group in (1, 3):
        model.zero_grad(), head.zero_grad()
        logprobs, values, _ = policy_forward(model, head, ro.input_ids, ro.attention_mask, ro.response_ids, P, 0.7,
                                             group_size=group)
        (A.masked_mean(logprobs, mask) + A.masked_mean(values, mask)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in [*model.parameters(), *head.parameters()]]))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-5


def test_one_token_responses(grouped):
    model, head, ro = grouped
    model.eval()
    one = type(ro)(ro.prompt_ids, ro.prompt_mask, ro.response_ids[:, :1], ro.response_mask[:, :1], ro.texts,
                   ro.prompt_index, ro.ended_with_eos)
    with torch.no_grad():
        (logits, values), (s_logits, s_values) = both(model, head, one)
    assert torch.allclose(logits, s_logits, atol=1e-4) and torch.allclose(values, s_values, atol=1e-5)


def test_rows_that_are_not_groups_are_refused(grouped):
    model, head, ro = grouped
    swapped = ro.input_ids[[0, 1, 3, 2, *range(4, 15)]]  # row 2 (prompt 0) and row 3 (prompt 1) swapped
    with torch.no_grad(), pytest.raises(ValueError, match="not groups of 3"):
        shared_prompt_forward(model, head, swapped, ro.attention_mask, ro.response_ids, ro.prompt_ids.shape[1], 3)


def test_shuffled_groups_keep_groups_whole():
    torch.manual_seed(0)
    order = shuffled_groups(12, 3)
    assert sorted(order.tolist()) == list(range(12))
    assert all(g.tolist() == list(range(g[0], g[0] + 3)) and g[0] % 3 == 0 for g in order.view(4, 3))
    assert shuffled_groups(5, 1).sort().values.tolist() == list(range(5))


def test_reft_run_trains_as_without_sharing(warmup_model, small_task, tmp_path, monkeypatch):
    """Gradient checkpointing turns the sharing off and keeps the mini-batches (whole question
    groups): both runs must end with the same weights, to float rounding."""
    import reftune.trainers.policy as policy

    calls = []
    real = policy.shared_prompt_forward
    monkeypatch.setattr(policy, "shared_prompt_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = ParityTask(**vars(small_task))
    runs, shared_calls = [], []
    for name, checkpointing in (("shared", False), ("full", True)):
        calls.clear()
        cfg = ReFTConfig(model=warmup_model, data=small_data(), out_dir=str(tmp_path / name), steps=2,
                         questions_per_step=4, samples_per_prompt=2, mini_batch_size=4, ppo_epochs=2,
                         max_new_tokens=24, eval_every=0, save_every=0, lr=1e-3, device="cpu", progress=False,
                         tensorboard=False, gradient_checkpointing=checkpointing)
        runs.append(weights(run_reft(cfg, task=task)["last_checkpoint"]))
        shared_calls.append(len(calls))
    # per step: policy and reference without gradients, then 2 epochs x 2 mini-batches with them
    assert shared_calls == [2 * (2 + 2 * 2), 0]
    start = weights(warmup_model)
    assert any(not torch.equal(start[k], runs[0][k]) for k in start)
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.allclose(runs[0][k], runs[1][k], atol=1e-5), k
