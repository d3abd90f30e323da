"""LoRA through `peft`: the policy trains low-rank adapters on frozen base weights, and ReFT's frozen
reference is the same model with the adapter switched off, so the base weights are in memory once.

QLoRA (`lora_quantize=nf4|fp4|int8`) loads that base with bitsandbytes-quantized linear layers;
the reference is then the quantized base, as the policy's own base is.

Checkpoints stay ordinary HF folders: `policy/` holds the MERGED weights (base + adapter), which
`AutoModelForCausalLM`, `reftune eval`/`compare` and the vLLM engine load like any model; the
adapter itself travels in the trainer state for an exact resume (the base is `cfg.model` again).
"""

from __future__ import annotations

import contextlib

from reftune.models import is_peft, is_quantized


def lora_enabled(cfg) -> bool:
    return getattr(cfg, "lora_r", 0) > 0


def apply_lora(model, cfg):
    """Wrap `model` with a LoRA adapter per `cfg` (lora_r, lora_alpha, lora_dropout, lora_target_modules).
    A quantized base (lora_quantize) is first prepared as QLoRA does: every weight frozen, the
    unquantized ones (norms, embeddings) in fp32."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        raise ImportError("lora_r > 0 needs the peft package: pip install peft (or reftune[lora])") from None
    if is_quantized(model):
        # Checkpointing was already set by the caller; peft must not switch it on by default.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules) or None, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def reference_mode(model):
    """A context in which `model` computes the frozen reference: its adapter disabled (LoRA), or
    nothing to do (the caller then uses a separate reference model)."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)
