"""Warm-up SFT (reftune.trainers.sft): loss only on CoT + EOS, accumulation invariance, checkpoints, a tiny run,
and SFT on the shared loop: resume of an earlier state layout, the non-finite stop, another trainer's checkpoint refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from reftune import models
from reftune.trainers import sft as sft_module
from reftune.trainers.checkpoints import upgrade_state
from reftune.trainers.loop import Callbacks
from reftune.trainers.sft import SFTConfig, run_sft
from reftune.trainers.supervised import IGNORE, collate, encode_sft_example, linear_schedule, sft_loss


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def sft_config(model: str, out_dir, **kw) -> SFTConfig:
    base = dict(model=model, data=small_data(), out_dir=str(out_dir), epochs=1, batch_size=16, lr=3e-3,
                eval_split="none", device="cpu", progress=False, tensorboard=False)
    return SFTConfig(**{**base, **kw})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


# ------------------------------------------------------------------------------- loss masking

def test_encode_masks_exactly_the_prompt(tokenizer, small_task):
    ex = small_task.train[0]
    prompt, target = small_task.prompt(ex), small_task.target(ex)
    ids, labels = encode_sft_example(tokenizer, prompt, target, max_length=1024)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert ids == p + t + [tokenizer.eos_token_id]
    assert labels == [IGNORE] * len(p) + t + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids[len(p):-1]) == target  # the labelled part is exactly the CoT, then EOS


def test_encode_truncates_ids_and_labels_together(tokenizer, small_task):
    ex = small_task.train[0]
    prompt = small_task.prompt(ex)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids, labels = encode_sft_example(tokenizer, prompt, ex.cot, max_length=n_prompt + 5)
    assert len(ids) == len(labels) == n_prompt + 5
    assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]


def test_collate_pads_right_with_ignored_labels():
    batch = [([5, 6, 7], [IGNORE, 6, 7]), ([8, 9, 10, 11, 12], [IGNORE, IGNORE, 10, 11, 12])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, 10, 11, 12]]


class FixedLogits(torch.nn.Module):
    """A stand-in model that returns given logits, to look at `sft_loss` alone."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, use_cache=False):
        return type("Out", (), {"logits": self.logits})()


def test_sft_loss_counts_only_response_positions():
    torch.manual_seed(0)
    V, n_prompt = 11, 4
    ids = [1, 2, 3, 4, 5, 6, 7, 10]  # 4 prompt tokens, 3 CoT tokens, EOS=10
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    batch = collate([(ids, labels), (ids[:6], labels[:6])], pad_id=0)
    logits = torch.randn(2, len(ids), V)
    loss, n = sft_loss(FixedLogits(logits), batch)
    # by hand: position t predicts token t+1; only targets t+1 >= n_prompt count
    logp = torch.log_softmax(logits, dim=-1)
    expected = -sum(logp[0, t - 1, ids[t]] for t in range(n_prompt, 8)) - sum(logp[1, t - 1, ids[t]] for t in range(n_prompt, 6))
    assert n == (8 - n_prompt) + (6 - n_prompt)
    torch.testing.assert_close(loss, expected)

    # logits at positions that predict prompt tokens (and at padding) do not matter ...
    changed = logits.clone()
    changed[:, : n_prompt - 1] = torch.randn(2, n_prompt - 1, V) * 5
    changed[1, 6:] = float("nan")  # padding of row 1 (and the last position, which predicts nothing)
    changed[0, 7] = float("nan")
    loss2, _ = sft_loss(FixedLogits(changed), batch)
    torch.testing.assert_close(loss2, loss)
    # ... but the last prompt position predicts the first CoT token: it does
    changed[0, n_prompt - 1] += torch.randn(V) * 5
    loss3, _ = sft_loss(FixedLogits(changed), batch)
    assert not torch.isclose(loss3, loss)


def test_sft_loss_on_the_real_model_ignores_prompt_labels(tiny_model, tokenizer, small_task):
    """With the real tiny model: the loss equals cross-entropy over CoT+EOS tokens, and giving the
    prompt positions real labels would change it (so the masking is what keeps them out)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    exs = small_task.train[:3]
    data = [encode_sft_example(tokenizer, small_task.prompt(e), small_task.target(e), 1024) for e in exs]
    batch = collate(data, tokenizer.pad_token_id)
    with torch.no_grad():
        loss, n = sft_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, count = 0.0, 0
    for i, (ids, labels) in enumerate(data):
        for t in range(1, len(ids)):
            if labels[t] != IGNORE:
                expected -= torch.log_softmax(logits[i, t - 1], -1)[ids[t]].item()
                count += 1
    assert n == count == sum(len(tokenizer(e.cot, add_special_tokens=False)["input_ids"]) + 1 for e in exs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    unmasked = dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE))
    with torch.no_grad():
        loss_all, n_all = sft_loss(model, unmasked)
    assert n_all > n and loss_all.item() > loss.item()


def test_linear_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] > 0
    assert sched.get_last_lr()[0] == 0.0


# ------------------------------------------------------------------------------- accumulation

def test_gradient_accumulation_is_invariant(tiny_model, tokenizer, small_task, tmp_path, monkeypatch):
    """One optimizer step on the same 8 examples: batch 8 x accum 1 == batch 4 x accum 2 == 2 x 4,
    both the gradient the optimizer sees and the parameters after the step (the loss is summed
    per token and divided by the token count of the whole accumulated batch). The gradient is also
    checked against the token-mean cross-entropy of the 8 examples computed here directly."""
    examples = small_task.train[:8]
    grads: list[list[torch.Tensor]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, *args, **kwargs):  # run_sft clips right before optimizer.step(): see the grads
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    after = {}
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        cfg = sft_config(tiny_model, tmp_path / f"bs{bs}", batch_size=bs, grad_accum=ga, lr=1e-3)
        result = run_sft(cfg, task=small_task, train_examples=examples)
        assert len(result["checkpoints"]) == 1
        after[(bs, ga)] = weights(result["checkpoints"][1])
    assert len(grads) == 3  # one optimizer step per run

    # reference gradient: token-mean CE over all CoT+EOS tokens of the 8 examples, one batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    data = [encode_sft_example(tokenizer, small_task.prompt(e), small_task.target(e), 1024) for e in examples]
    loss, n = sft_loss(model, collate(data, tokenizer.pad_token_id))
    (loss / n).backward()
    reference = [p.grad for p in model.parameters()]
    for run_grads in grads:
        assert len(run_grads) == len(reference)
        for g, r in zip(run_grads, reference):
            torch.testing.assert_close(g, r, atol=1e-7, rtol=1e-4)

    base, ref = weights(tiny_model), after[(8, 1)]
    assert max((ref[k] - base[k]).abs().max().item() for k in ref) > 1e-4  # the step did something
    for key in [(4, 2), (2, 4)]:
        for name, tensor in after[key].items():
            torch.testing.assert_close(tensor, ref[name], atol=1e-6, rtol=1e-5, msg=f"{key}: {name}")


# ------------------------------------------------------------------------------- checkpoints

def test_epoch_checkpoint_round_trip(tiny_model, small_task, tmp_path, monkeypatch):
    """The saved epoch folder loads with AutoModelForCausalLM and gives the logits the in-memory
    model gave when it was saved."""
    probe = torch.tensor([[1, 5, 9, 20, 33, 60, 80, 2]])
    seen = []
    real_save = PreTrainedModel.save_pretrained

    def spy(model, out_dir, *args, **kwargs):  # every checkpoint write goes through save_pretrained
        with torch.no_grad():
            seen.append(model(input_ids=probe).logits.clone())
        real_save(model, out_dir, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", spy)
    result = run_sft(sft_config(tiny_model, tmp_path / "run", epochs=2), task=small_task)
    assert len(seen) == 2 and set(result["checkpoints"]) == {1, 2}
    for epoch, logits in zip((1, 2), seen):
        path = result["checkpoints"][epoch]
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=probe).logits, logits, atol=0, rtol=0)
        assert AutoTokenizer.from_pretrained(path).eos_token_id == AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    assert not torch.equal(seen[0], seen[1])


def test_save_epochs_keeps_the_chosen_ones_and_the_last(tiny_model, small_task, tmp_path):
    result = run_sft(sft_config(tiny_model, tmp_path / "run", epochs=3, save_epochs=[1]), task=small_task)
    assert set(result["checkpoints"]) == {1, 3}
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["epoch-1", "epoch-3"]  # no stray .tmp-* folders
    assert result["best_epoch"] == 3  # no evaluation: the last saved epoch


# ------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def sft_run(tiny_model, small_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = sft_config(tiny_model, out, epochs=3, eval_split="validation", eval_max_new_tokens=24, log_every=2)
    return cfg, run_sft(cfg, task=small_task)


def test_run_sft_learns(sft_run, tiny_model):
    cfg, result = sft_run
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert all(0.0 <= h["validation_accuracy"] <= 1.0 for h in history)
    assert result["best_epoch"] in (1, 2, 3)
    assert result["best_checkpoint"] == result["checkpoints"][result["best_epoch"]]
    base, last = weights(tiny_model), weights(result["checkpoints"][3])
    assert base.keys() == last.keys()
    assert all(not torch.equal(base[k], last[k]) for k in base)


def test_run_sft_writes_its_run_folder(sft_run):
    cfg, result = sft_run
    run = Path(cfg.out_dir)
    assert json.loads((run / "result.json").read_text())["history"] == result["history"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]  # 64 examples / 16 = 4 steps per epoch, logged every 2
    epochs = [r for r in records if "epoch/train_loss" in r]
    assert [r["epoch/epoch"] for r in epochs] == [1, 2, 3]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 3 and saved["data"]["n_train"] == 64 and saved["model"] == cfg.model
    assert not (run / "tb").exists()  # tensorboard=False


def test_run_sft_refuses_to_overwrite_a_run(sft_run, small_task):
    cfg, _ = sft_run
    before = (Path(cfg.out_dir) / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run_sft(cfg, task=small_task)
    assert (Path(cfg.out_dir) / "config.yaml").read_text() == before


def test_bf16_mixed_precision_learns_with_fp32_weights(tiny_model, small_task, tmp_path):
    """mixed_precision=bf16 (autocast forwards, fp32 master weights): the loss falls as in fp32
    and the checkpoint stays fp32."""
    result = run_sft(sft_config(tiny_model, tmp_path / "run", epochs=3, mixed_precision="bf16"), task=small_task)
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert all(t.dtype == torch.float32 for t in weights(result["checkpoints"][3]).values())


def test_mixed_precision_modes():
    cpu = torch.device("cpu")
    assert models.resolve_mixed_precision("no", cpu) is False
    assert models.resolve_mixed_precision("bf16", cpu) is True
    assert models.resolve_mixed_precision("auto", cpu) is models.cpu_has_native_bf16()
    with pytest.raises(ValueError, match="mixed_precision"):
        models.resolve_mixed_precision("fp8", cpu)


def test_empty_training_split_is_an_error(tiny_model, small_task, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        run_sft(sft_config(tiny_model, tmp_path / "run"), task=small_task, train_examples=[])


# ------------------------------------------------------------------------------- the shared loop

class Stop(Exception):
    """Raised from a callback: the run stops there, as a kill after that epoch's checkpoint would."""


def stop_after(epoch: int) -> Callbacks:
    def end(done: int, record: dict) -> None:
        if done == epoch:
            raise Stop
    return Callbacks(on_step_end=end)


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "elapsed"} for h in history]


def test_resume_of_an_earlier_sft_state_is_exact(tiny_model, small_task, tmp_path):
    """A run folder whose resume state has SFT's earlier layout (`best_acc`, no trainer label, a
    latest.json with the epoch first) resumes into the shared format: the straight run's weights,
    history and best epoch."""
    kw = dict(epochs=3, save_epochs=[3], eval_split="validation", eval_max_new_tokens=8)
    straight = run_sft(sft_config(tiny_model, tmp_path / "A", **kw), task=small_task)
    cfg = sft_config(tiny_model, tmp_path / "B", **kw)
    with pytest.raises(Stop):
        run_sft(cfg, task=small_task, callbacks=stop_after(1))
    run = tmp_path / "B"
    assert not (run / ".reftune.lock").exists()  # the stopped run let go of its folder
    state = torch.load(run / "resume" / "trainer_state.pt", weights_only=False)
    assert state["trainer"] == "sft" and state["epoch"] == 1 and "order_rng" in state and "scheduler" in state
    earlier = {k: v for k, v in state.items() if k not in ("trainer", "best_accuracy")}
    torch.save({**earlier, "best_acc": state["best_accuracy"]}, run / "resume" / "trainer_state.pt")
    (run / "latest.json").write_text(json.dumps({"epoch": 1, "step": state["step"], "path": "resume"}))

    resumed = run_sft(cfg, task=small_task, resume=True)
    assert untimed(resumed["history"]) == untimed(straight["history"])
    assert resumed["best_epoch"] == straight["best_epoch"]
    a, b = weights(straight["checkpoints"][3]), weights(resumed["checkpoints"][3])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_upgrade_names_fsdp2_optimizer_state_by_the_optimized_tree():
    """SFT's earlier fsdp2 state named AdamW's entries by the policy's parameters; the shared loop
    keys them by the tree of optimized modules, where the policy is entry 0. Numbered entries (a
    plain optimizer.state_dict()) stay as they are."""
    named = {"state": {"model.norm.weight": {"step": 3}}, "param_groups": [{"lr": 0.1, "params": ["model.norm.weight"]}]}
    upgraded = upgrade_state({"best_acc": 0.5, "optimizer": named, "order_rng": (), "step": 3})
    assert upgraded["optimizer"] == {"state": {"0.model.norm.weight": {"step": 3}},
                                     "param_groups": [{"lr": 0.1, "params": ["0.model.norm.weight"]}]}
    assert upgraded["best_accuracy"] == 0.5 and "best_acc" not in upgraded and upgraded["trainer"] == "sft"
    numbered = {"state": {0: {"step": 3}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    assert upgrade_state({"best_acc": 0.5, "optimizer": numbered})["optimizer"] == numbered
    current = {"best_accuracy": 0.5, "optimizer": named}
    assert upgrade_state(current) is current


def test_nan_loss_stops_sft_and_the_last_epoch_resumes(tiny_model, small_task, tmp_path, monkeypatch):
    """The loss turns nan in epoch 2: FloatingPointError naming the step and the last good
    checkpoint, the folder let go; a resume with a finite loss completes the run."""
    real = sft_module.sft_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan") if calls["n"] > 4 else loss), n  # 64 examples / 16: 4 steps per epoch

    monkeypatch.setattr(sft_module, "sft_loss", poisoned)
    cfg = sft_config(tiny_model, tmp_path / "run", epochs=2)
    with pytest.raises(FloatingPointError, match=r"sft: loss is nan at step 5; last good checkpoint: .*latest.json"):
        run_sft(cfg, task=small_task)
    run = tmp_path / "run"
    assert not (run / ".reftune.lock").exists()
    assert json.loads((run / "latest.json").read_text())["epoch"] == 1 and not (run / "result.json").exists()
    monkeypatch.setattr(sft_module, "sft_loss", real)
    result = run_sft(cfg, task=small_task, resume=True)
    assert [h["epoch"] for h in result["history"]] == [1, 2] and set(result["checkpoints"]) == {1, 2}


def test_another_trainers_checkpoint_is_refused_before_anything_is_written(sft_run, warmup_model, small_task):
    """Resuming an SFT run folder as ReFT: refused, naming the trainer that wrote it; the folder's
    config stays SFT's."""
    from reftune.trainers.reft import ReFTConfig, run_reft

    cfg, _ = sft_run
    before = (Path(cfg.out_dir) / "config.yaml").read_text()
    reft = ReFTConfig(model=warmup_model, data=small_data(), out_dir=cfg.out_dir, steps=1, device="cpu",
                      progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="checkpoint of sft, not of reft: resume it with the command that wrote it"):
        run_reft(reft, resume=True, task=small_task)
    assert (Path(cfg.out_dir) / "config.yaml").read_text() == before
