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
    targets = list(cfg.lora_target_modules) or default_target_modules(model)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# Fused attention projections, by the names families give them, for a model type peft has no
# default for (Phi-3: qkv_proj).
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")


def default_target_modules(model) -> list[str]:
    """The layers that get adapters when `lora_target_modules` is empty: peft's default for the
    model type (q_proj + v_proj for Llama, Qwen2, Mistral, Gemma, OPT; c_attn for GPT-2;
    query_key_value for GPT-NeoX), else for its text model's type (Gemma-3's multimodal layout:
    gemma3_text), else the attention's query and value projections found by name (q_proj and
    v_proj, or a fused one: Phi-3's qkv_proj). Only the language model's layers: a multimodal
    model's vision tower has layers of the same names, which are left out (named in full)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    config = model.config
    types = [config.model_type, getattr(config.get_text_config(), "model_type", None)]
    leaves = next((list(PEFT_DEFAULTS[t]) for t in types if t in PEFT_DEFAULTS), None)
    decoder = model.get_decoder()
    if leaves is None:
        leaves = _attention_projections(decoder)
    if not leaves:
        raise ValueError(f"lora_target_modules: no default LoRA layers for model type {config.model_type!r} (peft "
                         f"has none, and no q_proj/v_proj or fused qkv projection was found); name them, e.g. "
                         f"lora_target_modules=[q_proj,v_proj]")
    inside = {id(m) for m in decoder.modules()}
    matched = [(n, id(m) in inside) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in leaves]
    if all(ok for _, ok in matched):
        return leaves
    return [n for n, ok in matched if ok]


def _attention_projections(decoder) -> list[str]:
    """Query and value projections of the decoder's attention layers, found by their names."""
    names = {n.rsplit(".", 1)[-1] for n, m in decoder.named_modules()
             if any(k in n.lower() for k in ("attn", "attention")) and hasattr(m, "weight") and m.weight.dim() == 2}
    if {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    return [n for n in FUSED_QKV if n in names][:1]


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
