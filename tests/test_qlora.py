"""QLoRA (peft + bitsandbytes, here on CPU): the base's linear layers load quantized, only the
adapters train, the reference is the quantized base with the adapter off, checkpoints are plain
dequantized HF folders that load without bitsandbytes, and the built-in engines sample the quantized
policy like `generate` does. (Resume: tests/test_lora.py, with and without quantization.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import small_data

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from reftune.engines import make_generator  # noqa: E402
from reftune.models import ModelLoadError, is_quantized, load_causal_lm, load_tokenizer, merged_state_dict  # noqa: E402
from reftune.trainers.lora import apply_lora  # noqa: E402
from reftune.trainers.reft import ReFTConfig, run_reft  # noqa: E402
from reftune.trainers.sft import SFTConfig, run_sft  # noqa: E402

LORA = dict(lora_r=4, lora_alpha=8.0, lora_target_modules=["q_proj", "v_proj"])
CPU = torch.device("cpu")


def reft_config(model, out, **kw):
    base = dict(model=model, data=small_data(), out_dir=str(out), steps=2, questions_per_step=4, samples_per_prompt=2,
                mini_batch_size=4, ppo_epochs=1, lr=1e-2, score_none=0.5, max_new_tokens=16, eval_max_new_tokens=16,
                eval_every=2, save_every=2, device="cpu", progress=False, tensorboard=False,
                lora_quantize="nf4", **LORA)
    return ReFTConfig(**{**base, **kw})


def quantized_peft(path, quantize):
    model = apply_lora(load_causal_lm(path, CPU, torch.float32, quantize=quantize), ReFTConfig(**LORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))  # a non-zero adapter
    return model.eval()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_linear_layers_load_quantized_and_merge_into_a_plain_model(qlora_warmup_model, quantize, tmp_path):
    model = quantized_peft(qlora_warmup_model, quantize)
    plain = AutoModelForCausalLM.from_pretrained(qlora_warmup_model)
    packed = model.get_base_model().model.layers[0].mlp.up_proj.weight
    assert packed.dtype in (torch.uint8, torch.int8)  # stored quantized, not as fp32
    merged = merged_state_dict(model)
    assert merged.keys() == plain.state_dict().keys()  # plain names: no base_layer, absmax, SCB, lora_*
    for key, value in merged.items():
        assert value.shape == plain.state_dict()[key].shape and value.is_floating_point(), key
    # The merged weights reproduce the quantized policy: a plain model loaded with them gives its logits.
    plain.load_state_dict(merged)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-2, rtol=0)
    # Quantization loses little: dequantized weights stay near the fp32 ones the base was loaded from.
    w = AutoModelForCausalLM.from_pretrained(qlora_warmup_model).state_dict()["model.layers.0.mlp.up_proj.weight"]
    err = (merged["model.layers.0.mlp.up_proj.weight"] - w).abs().max() / w.abs().max()
    assert 0 < err < (0.2 if quantize == "nf4" else 0.02)


@pytest.mark.parametrize("engine", ["static", "cached"])
def test_built_in_engines_decode_a_quantized_policy_like_generate(qlora_warmup_model, small_task, engine):
    model, tok = quantized_peft(qlora_warmup_model, "nf4"), load_tokenizer(qlora_warmup_model)
    prompts = [small_task.prompt(ex, for_generation=True) for ex in small_task.test[:6]]
    ours = make_generator(engine, model, tok, 8).generate(prompts, greedy=True, max_new_tokens=20)
    hf = make_generator("hf", model, tok, 8).generate(prompts, greedy=True, max_new_tokens=20)
    assert ours.texts == hf.texts


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qlora_reft_trains_adapters_only_and_saves_plain_checkpoints(qlora_warmup_model, small_task, quantize, tmp_path):
    result = run_reft(reft_config(qlora_warmup_model, tmp_path / "run", lora_quantize=quantize), task=small_task)
    last = result["last_checkpoint"]
    assert "quantization_config" not in json.loads(open(f"{last}/config.json").read())  # loads without bitsandbytes
    before, after = load_file(f"{qlora_warmup_model}/model.safetensors"), load_file(f"{last}/model.safetensors")
    assert before.keys() == after.keys()
    # Every quantized layer comes back dequantized (changed by rounding); only q/v moved beyond it.
    moved = {k for k in before if (before[k] - after[k]).abs().max() > 0.25 * before[k].abs().max()}
    assert not moved - {k for k in before if "q_proj" in k or "v_proj" in k}
    torch.testing.assert_close(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # not quantized
    model = AutoModelForCausalLM.from_pretrained(result["best_checkpoint"])
    assert not getattr(model, "hf_quantizer", None)
    # The adapter starts at zero (B = 0): the policy is its own quantized base, so the first KL is 0.
    assert result["history"][0]["reft/kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["history"][-1]["reft/kl"] != 0.0  # the adapters trained away from the reference


def test_qlora_sft_checkpoints_train_the_adapters(qlora_warmup_model, small_task, tmp_path):
    cfg = SFTConfig(model=qlora_warmup_model, data=small_data(), out_dir=str(tmp_path / "sft"), epochs=1, batch_size=16,
                    lr=1e-2, eval_split="none", device="cpu", progress=False, tensorboard=False,
                    lora_quantize="nf4", **LORA)
    path = run_sft(cfg, task=small_task)["checkpoints"][1]
    after = load_file(f"{path}/model.safetensors")
    # Against the quantized base with a zero adapter: the adapted layers moved, the others are the
    # same dequantized weights exactly.
    base = merged_state_dict(apply_lora(load_causal_lm(qlora_warmup_model, CPU, torch.float32, quantize="nf4"),
                                        ReFTConfig(**LORA)))
    for key in after:  # (a tied LM head is saved once, as the embedding)
        if "q_proj" in key or "v_proj" in key:
            assert not torch.equal(base[key], after[key]), key
        else:
            torch.testing.assert_close(base[key], after[key], rtol=0, atol=0, msg=key)


def test_lora_quantize_needs_lora(qlora_warmup_model, tmp_path):
    with pytest.raises(ValueError, match="lora_quantize.*lora_r > 0"):
        reft_config(qlora_warmup_model, tmp_path / "x", lora_r=0).validate()
    with pytest.raises(ValueError, match="lora_quantize"):
        reft_config(qlora_warmup_model, tmp_path / "x", lora_quantize="int4").validate()


def test_4bit_layers_narrower_than_a_block_are_refused_on_cpu(warmup_model):
    """bitsandbytes' CPU kernels dequantize rows that are not whole 64-value blocks wrongly (the
    32-wide tiny model), so such a base is refused with the layer named, not trained on bad weights."""
    with pytest.raises(ModelLoadError, match=r"epoch-2.*q_proj: 32 input features are not a multiple of .*64-value"):
        load_causal_lm(warmup_model, CPU, torch.float32, quantize="nf4")
    assert is_quantized(load_causal_lm(warmup_model, CPU, torch.float32, quantize="int8"))  # 8-bit rows are fine
