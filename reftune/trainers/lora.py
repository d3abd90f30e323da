"""LoRA through `peft`: the policy trains low-rank adapters on frozen base weights, and ReFT's frozen
reference is the same model with the adapter switched off, so the base weights are in memory once.

Checkpoints stay ordinary HF folders: `policy/` holds the MERGED weights (base + adapter), which
`AutoModelForCausalLM`, `reftune eval`/`compare` and the vLLM engine load like any model; the
adapter itself travels in the trainer state for an exact resume (the base is `cfg.model` again).
"""

from __future__ import annotations

import contextlib

import torch


def lora_enabled(cfg) -> bool:
    return getattr(cfg, "lora_r", 0) > 0


def apply_lora(model, cfg):
    """Wrap `model` with a LoRA adapter per `cfg` (lora_r, lora_alpha, lora_dropout, lora_target_modules)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("lora_r > 0 needs the peft package: pip install peft (or reftune[lora])") from None
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules) or None, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")


def reference_mode(model):
    """A context in which `model` computes the frozen reference: its adapter disabled (LoRA), or
    nothing to do (the caller then uses a separate reference model)."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + scale * B @ A), under the
    plain HF parameter names, computed without changing `model`."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter)
                    deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out[clean] = value + deltas[clean].to(value.dtype) if clean in deltas else value
    return out


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)
