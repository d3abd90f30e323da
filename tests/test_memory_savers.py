"""Memory savers change memory, not training: gradient checkpointing, chunked log-probs and the
inference-mode reference forward give what the plain computation gives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import small_data
from reftune.config import ConfigError
from reftune.models import enable_activation_checkpointing
from reftune.trainers.policy import ValueHead, frozen_forward, policy_forward
from reftune.trainers.reft import ReFTConfig, run_reft

B, P, R = 3, 5, 11  # rows, prompt length, response length (11 is prime: most chunk sizes leave a remainder)
TEMPERATURE = 0.7


def reft_config(warmup_model, out_dir, **kw) -> ReFTConfig:
    small = dict(steps=2, questions_per_step=4, samples_per_prompt=2, mini_batch_size=4, lr=1e-3, score_none=0.5,
                 max_new_tokens=16, eval_every=0, eval_max_new_tokens=16, save_every=0, device="cpu", progress=False,
                 tensorboard=False)
    return ReFTConfig(model=warmup_model, data=small_data(), out_dir=str(out_dir), **{**small, **kw})


def test_gradient_checkpointing_trains_identically(warmup_model, small_task, tmp_path):
    def run(name, **kw):
        return run_reft(reft_config(warmup_model, tmp_path / name, **kw), task=small_task)["history"]

    plain, checkpointed = run("plain"), run("ckpt", gradient_checkpointing=True)
    for a, b in zip(plain, checkpointed):
        for key in ("reft/score", "reft/kl", "reft/pg_loss", "reft/vf_loss", "reft/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.filterwarnings("error::FutureWarning")
def test_activation_checkpointing_is_switched_on_without_deprecated_names(tiny_model):
    """The trainers' switch turns checkpointing on in every decoder layer through the name that
    transformers keeps in v6 (its deprecated aliases warn with a FutureWarning, an error here)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not model.is_activation_checkpointing
    enable_activation_checkpointing(model)
    layers = model.model.layers
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in layers)


# --- chunked log-probs ------------------------------------------------------------------------------

@pytest.fixture
def batch():
    """Left-padded prompts + responses of the tiny model's vocabulary."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 300, (B, P + R), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    return input_ids, attention_mask, input_ids[:, P:]


def tiny_policy(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    value_head = ValueHead(model.config.hidden_size, dropout=0.0)
    torch.nn.init.normal_(value_head.linear.weight)  # not the zero init: values and their gradients must show
    return model, value_head


def forward_and_grads(model, value_head, batch, chunk_size):
    """Log-probs, values, entropy and every parameter's gradient of a loss that uses all three."""
    model.zero_grad(set_to_none=True)
    value_head.zero_grad(set_to_none=True)
    input_ids, attention_mask, response_ids = batch
    logprobs, values, entropy = policy_forward(model, value_head, input_ids, attention_mask, response_ids, P,
                                               TEMPERATURE, chunk_size, with_entropy=True)
    (logprobs.exp().sum() + logprobs.sum() + (values ** 2).sum()).backward()
    params = [p for p in [*model.parameters(), *value_head.parameters()] if p.requires_grad]
    return logprobs.detach(), values.detach(), entropy, [p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk_size", [1, 4, R, 64])
def test_chunked_logprobs_values_entropy_and_gradients_match(tiny_model, batch, chunk_size):
    model, value_head = tiny_policy(tiny_model)
    plain = forward_and_grads(model, value_head, batch, 0)
    chunked = forward_and_grads(model, value_head, batch, chunk_size)
    for a, b in zip(plain[:3], chunked[:3]):
        assert a.shape == (B, R)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not chunked[2].requires_grad  # entropy is a metric
    for ga, gb in zip(plain[3], chunked[3]):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_through_a_lora_wrapper(tiny_model, batch):
    from peft import LoraConfig, get_peft_model

    model, value_head = tiny_policy(tiny_model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain, chunked = forward_and_grads(model, value_head, batch, 0), forward_and_grads(model, value_head, batch, 3)
    for a, b in zip(plain[:3], chunked[:3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(plain[3], chunked[3]):  # the adapters and the value head
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_under_bf16_autocast(tiny_model, batch):
    model, _ = tiny_policy(tiny_model)
    input_ids, attention_mask, response_ids = batch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _, _ = policy_forward(model, None, input_ids, attention_mask, response_ids, P, TEMPERATURE)
        chunked, _, _ = policy_forward(model, None, input_ids, attention_mask, response_ids, P, TEMPERATURE, 4)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)


def vocab_sized_saved_tensors(model, batch, chunk_size) -> list[tuple[int, ...]]:
    """Shapes of the (B, positions > 1, V) activations autograd keeps for backward."""
    vocab, shapes = model.config.vocab_size, []

    def pack(t):
        if t.dim() == 3 and t.shape[0] == B and t.shape[1] > 1 and t.shape[-1] == vocab:
            shapes.append(tuple(t.shape))
        return t

    input_ids, attention_mask, response_ids = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        policy_forward(model, None, input_ids, attention_mask, response_ids, P, TEMPERATURE, chunk_size)
    return shapes


def test_chunking_keeps_no_logits_for_backward(tiny_model, batch):
    """Unchunked, backward holds (B, R, V) logits; chunked, the per-chunk checkpoints hold only their
    hidden states (and the forward's own head saw only the last position: (B, 1, V))."""
    model, _ = tiny_policy(tiny_model)
    assert (B, R, model.config.vocab_size) in vocab_sized_saved_tensors(model, batch, 0)
    assert vocab_sized_saved_tensors(model, batch, 4) == []


def test_chunking_refuses_logits_that_are_not_the_plain_head(tiny_model, batch):
    model, _ = tiny_policy(tiny_model)

    def logit_scale(_module, _args, out):  # what Cohere's models do after their head
        out["logits"] = 0.0625 * out["logits"]
        return out

    model.register_forward_hook(logit_scale)
    input_ids, attention_mask, response_ids = batch
    with torch.no_grad(), pytest.raises(ValueError, match="logprob_chunk_size"):
        policy_forward(model, None, input_ids, attention_mask, response_ids, P, 1.0, 4)


def test_logprob_chunk_size_is_validated():
    ReFTConfig(logprob_chunk_size=128).validate()
    with pytest.raises(ConfigError, match="logprob_chunk_size"):
        ReFTConfig(logprob_chunk_size=-1).validate()


def final_weights(result) -> dict[str, torch.Tensor]:
    policy = Path(result["last_checkpoint"])
    return {**load_file(str(policy / "model.safetensors")),
            **{f"value_head.{k}": v for k, v in torch.load(policy.parent / "value_head.pt").items()}}


LORA = dict(lora_r=4, lora_alpha=8.0, lora_target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("setup", [{}, LORA], ids=["full", "lora"])
def test_reft_with_chunked_logprobs_trains_identically(warmup_model, small_task, tmp_path, setup):
    """Chunks of 3 (not a divisor of the responses' lengths), at temperature 0.8; with LoRA together
    with gradient checkpointing, as the LoRA recipes run (two kinds of checkpoint nested in one step)."""
    savers = dict(logprob_chunk_size=3, gradient_checkpointing=bool(setup))
    plain = run_reft(reft_config(warmup_model, tmp_path / "plain", temperature=0.8, **setup), task=small_task)
    chunked = run_reft(reft_config(warmup_model, tmp_path / "chunked", temperature=0.8, **setup, **savers),
                       task=small_task)
    for a, b in zip(plain["history"], chunked["history"]):
        for key in ("reft/score", "reft/kl", "reft/pg_loss", "reft/vf_loss", "reft/entropy", "reft/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    wa, wb = final_weights(plain), final_weights(chunked)
    start = load_file(str(Path(warmup_model) / "model.safetensors"))
    assert any(not torch.equal(wa[k], start[k]) for k in start)  # it trained
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


# --- the reference forward in inference mode -------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [0, 4])
def test_reference_in_inference_mode_gives_the_same_logprobs(tiny_model, batch, chunk_size):
    model, _ = tiny_policy(tiny_model)
    model.eval().requires_grad_(False)
    args = (model, None, *batch, P, TEMPERATURE, chunk_size)
    with torch.no_grad():
        expected, _, _ = policy_forward(*args)
    with torch.no_grad(), frozen_forward(separate_model=True):
        assert torch.is_inference_mode_enabled()
        got, _, _ = policy_forward(*args)
    assert got.is_inference() and torch.equal(got, expected)
    with frozen_forward(separate_model=False):  # the LoRA reference is the policy: plain no_grad there
        assert not torch.is_inference_mode_enabled()


def test_reft_with_the_kl_as_a_loss_uses_the_inference_mode_reference(warmup_model, small_task, tmp_path):
    """The k3 loss term takes the reference's log-probs into the graph: they must be normal tensors."""
    cfg = reft_config(warmup_model, tmp_path / "kl_loss", steps=1, kl_in_reward=False, kl_estimator="k3",
                      logprob_chunk_size=5)
    history = run_reft(cfg, task=small_task)["history"]
    assert [h["step"] for h in history] == [1] and math.isfinite(history[-1]["reft/kl"])
