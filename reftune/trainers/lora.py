"""LoRA through `peft`: the policy trains low-rank adapters on frozen base weights, and ReFT's frozen
reference is the same model with the adapter switched off, so the base weights are in memory once.

Checkpoints stay ordinary HF folders: `policy/` holds the MERGED weights (base + adapter), which
`AutoModelForCausalLM`, `reftune eval`/`compare` and the vLLM engine load like any model; the
adapter itself travels in the trainer state for an exact resume (the base is `cfg.model` again).
"""

from __future__ import annotations

import contextlib

from reftune.models import is_peft, merged_state_dict  # noqa: F401  (re-exported)


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
