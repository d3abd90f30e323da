"""LoRA ReFT (peft): only the adapters (and the value head) train, the reference is the same model
with the adapter disabled, checkpoints are plain merged HF folders, and resume is exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import small_data

pytest.importorskip("peft")

from reftune.models import merged_state_dict  # noqa: E402
from reftune.trainers.lora import apply_lora  # noqa: E402
from reftune.trainers.reft import ReFTConfig, run_reft  # noqa: E402

LORA = dict(lora_r=4, lora_alpha=8.0, lora_target_modules=["q_proj", "v_proj"])


def config(model, out, **kw):
    base = dict(model=model, data=small_data(), out_dir=str(out), steps=2, questions_per_step=4, samples_per_prompt=2,
                mini_batch_size=4, ppo_epochs=1, lr=1e-2, score_none=0.5, max_new_tokens=16, eval_max_new_tokens=16,
                eval_every=2, save_every=2, device="cpu", progress=False, tensorboard=False, **LORA)
    return ReFTConfig(**{**base, **kw})


def test_merged_state_dict_matches_peft_merge(tiny_model):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), ReFTConfig(**LORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero adapter
    ours = merged_state_dict(model)
    theirs = copy.deepcopy(model).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k])


def test_lora_reft_trains_adapters_only_with_the_base_as_reference(warmup_model, small_task, tmp_path):
    result = run_reft(config(warmup_model, tmp_path / "run"), task=small_task)
    before, after = load_file(f"{warmup_model}/model.safetensors"), load_file(f"{result['last_checkpoint']}/model.safetensors")
    assert before.keys() == after.keys()  # a plain HF folder: merged weights under the usual names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    assert AutoModelForCausalLM.from_pretrained(result["best_checkpoint"]) is not None
    # The adapter starts at zero (peft's B=0): the policy equals the reference, so the first KL is 0.
    assert result["history"][0]["reft/kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("quantize", ["no", "nf4"])
def test_lora_resume_is_exact(quantize, request, small_task, tmp_path):
    warmup_model = request.getfixturevalue("warmup_model" if quantize == "no" else "qlora_warmup_model")
    if quantize != "no":
        pytest.importorskip("bitsandbytes")  # QLoRA: the base is quantized again from the same weights
    straight = run_reft(config(warmup_model, tmp_path / "A", steps=4, lora_quantize=quantize), task=small_task)
    run_reft(config(warmup_model, tmp_path / "B", steps=2, lora_quantize=quantize), task=small_task)
    resumed = run_reft(config(warmup_model, tmp_path / "B", steps=4, lora_quantize=quantize), resume=True,
                       task=small_task)
    drop = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert drop(resumed["history"]) == drop(straight["history"])
    a = load_file(f"{straight['last_checkpoint']}/model.safetensors")
    b = load_file(f"{resumed['last_checkpoint']}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "B" / "latest.json").read_text())["step"] == 4


def test_default_lora_layers_per_family(tiny_model):
    """No lora_target_modules: peft's default for the model type, else the attention's projections
    by name (Phi-3: peft has no default, its fused qkv_proj is found); a layout with neither is
    refused, naming the option."""
    from transformers import Phi3Config, Phi3ForCausalLM, PretrainedConfig

    from reftune.trainers.lora import default_target_modules

    assert default_target_modules(AutoModelForCausalLM.from_pretrained(tiny_model)) == ["q_proj", "v_proj"]
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2))
    assert default_target_modules(phi3) == ["qkv_proj"]

    class Mystery(torch.nn.Module):
        config = PretrainedConfig()
        config.model_type = "mystery"

        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Sequential(torch.nn.Linear(4, 4))

        def get_decoder(self):
            return self.decoder

    with pytest.raises(ValueError, match="model type 'mystery'.*lora_target_modules"):
        default_target_modules(Mystery())
