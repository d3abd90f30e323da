"""Models as the library sees them: device, dtype and mixed-precision policy, loading any Hub id
or local folder (model and tokenizer, with messages that name the path), and saving an HF folder.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from pathlib import Path

import torch


from reftune.model_files import ModelLoadError  # noqa: F401  (raised by the checks there; re-exported)
from reftune.options import QUANTIZE


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 is slower for small models)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(table)}")
    return table[dtype]


def _check_model_path(name_or_path: str, tokenizer: bool = True) -> None:
    """A path-looking name that does not exist is a typo, not a Hub id, and a local folder must hold
    config, weights and tokenizer files: say which is missing before HF does (model_files)."""
    from reftune.model_files import check_model_source

    check_model_source(name_or_path, tokenizer=tokenizer)


def quiet_transformers() -> None:
    """Silence transformers' per-load/per-save progress bars: our own bars and logs say what runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer, with a pad token when it has none (`assign_pad`); EOS is required."""
    from transformers import AutoTokenizer

    name_or_path = str(name_or_path)
    _check_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer from {name_or_path!r}: {e}") from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer of {name_or_path!r} has no EOS token; the CoT format needs one")
    if tok.pad_token_id is None:
        assign_pad(tok, _model_vocab_size(name_or_path), name_or_path)
    return tok


# ---------------------------------------------------------------------------- token conventions
# BOS, pad and stop tokens follow the tokenizer's and the model's own conventions (docs/models.md).

_ASSIGNED_PAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""Tokenizers whose pad token reftune chose (saved without it: see `save_tokenizer`)."""
_PROMPT_PREFIX: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_NOTED_PAD: set[str] = set()


def _model_vocab_size(name_or_path: str) -> int | None:
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(name_or_path).get_text_config(), "vocab_size", None)
    except Exception:  # noqa: BLE001  (only narrows the pad candidates)
        return None


PAD_NAMES = ("pad", "padding", "pad_token", "finetune_right_pad_id")
"""Added tokens that are pads by name (brackets and bars aside): `<pad>`, `[PAD]`, `<|padding|>`, ..."""


def pad_candidates(tok) -> list[int]:
    """Ids of tokens that can pad without changing what the tokenizer encodes: special or added
    tokens already in its vocabulary that are neither EOS nor BOS: the unknown token (Llama-2's and
    Mistral's convention), then added tokens named as a pad (`PAD_NAMES`: `<|padding|>`, `<pad>`,
    Llama-3.1's `<|finetune_right_pad_id|>`), then reserved or unused special tokens (Llama-3's
    `<|reserved_special_token_0|>`, Gemma's `<unused0>`)."""
    taken = {tok.eos_token_id, tok.bos_token_id}
    added = [(i, str(t).strip("<>|[] ").lower()) for i, t in sorted(getattr(tok, "added_tokens_decoder", {}).items())]
    # By exact name: a multimodal tokenizer's `<|image_pad|>` marks where image features go.
    padlike = [i for i, name in added if name in PAD_NAMES]
    reserved = [i for i, name in added if name.startswith(("reserved", "unused"))]
    unk = [tok.unk_token_id] if tok.unk_token_id is not None else []
    return [i for i in dict.fromkeys(unk + padlike + reserved) if i not in taken]


def assign_pad(tok, vocab_size: int | None = None, name: str = "the model") -> None:
    """Give a tokenizer without a pad token one for batching (padding positions are always masked,
    so the token only has to exist): the first of `pad_candidates` inside the model's embedding
    table, else EOS (GPT-2's tokenizer has no other special token), said in a note. The tokenizer
    is otherwise unchanged, and checkpoints save it without the pad (`save_tokenizer`)."""
    fits = [i for i in pad_candidates(tok) if vocab_size is None or i < vocab_size]
    _ASSIGNED_PAD[tok] = True
    if fits:
        tok.pad_token = tok.convert_ids_to_tokens(fits[0])
        return
    tok.pad_token = tok.eos_token
    if not _NOTED_PAD:  # once per process: every checkpoint of a run has the same tokenizer
        _NOTED_PAD.add(name)
        # reftune.runs.note's format (runs is a sibling layer, not importable from here)
        print(f"reftune: note: the tokenizer of {name} has no pad token and no other special token to pad with: "
              f"padding uses its EOS token {tok.eos_token!r} (every mask is explicit, so this is safe; checkpoints "
              f"keep the tokenizer without a pad)", file=sys.stderr, flush=True)


def save_tokenizer(tok, out_dir: Path) -> None:
    """`save_pretrained`, as the tokenizer was loaded: a pad token reftune assigned stays out."""
    if tok not in _ASSIGNED_PAD:
        tok.save_pretrained(out_dir)
        return
    pad = tok.pad_token
    tok.pad_token = None
    try:
        tok.save_pretrained(out_dir)
    finally:
        tok.pad_token = pad


def prompt_prefix(tok) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (its BOS for Llama, Mistral, Gemma,
    OPT; nothing for GPT-2, Qwen2, GPT-NeoX, Phi-3): what `tok(text)` adds in front of
    `tok(text, add_special_tokens=False)`. Read from the tokenizer's behaviour, so the
    `add_bos_token` setting and a tokenizer.json post-processor count alike."""
    if tok in _PROMPT_PREFIX:
        return _PROMPT_PREFIX[tok]
    plain = tok("1", add_special_tokens=False)["input_ids"]
    full = tok("1")["input_ids"]
    special = set(tok.all_special_ids)
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    prefix = full[:starts[0]] if starts else []
    prefix = prefix if all(i in special for i in prefix) else []
    _PROMPT_PREFIX[tok] = prefix
    return prefix


def encode_prompt(tok, text: str) -> list[int]:
    """A prompt's token ids as every stage feeds them to the model: the text's tokens after the
    tokenizer's own prefix (`prompt_prefix`), unless the text already begins with it (a chat
    template that writes the BOS itself). Nothing is appended: the response follows."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prefix = prompt_prefix(tok)
    return ids if ids[:len(prefix)] == prefix else prefix + ids


def stop_token_ids(model, tok) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS, then every EOS id of the model's
    `generation_config` (instruct models list their end-of-turn tokens there, e.g. Llama-3's
    `<|eot_id|>`, Gemma-3's `<end_of_turn>`)."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys([tok.eos_token_id] + [int(i) for i in extra]))


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_from_config(values: dict) -> int | None:
    """The context length a config (as a dict) declares, at the top level or in its `text_config`
    (Gemma-3's multimodal layout); None when it does not say."""
    for source in (values, values.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    return None


def model_context(model) -> int | None:
    """The context length of a loaded model (through a peft wrapper), as `context_from_config`."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return context_from_config(config.to_dict()) if hasattr(config, "to_dict") else None


def has_learned_positions(model) -> bool:
    """Position embeddings looked up in a table (GPT-2, OPT): a position past the context has no
    row, so a longer sequence is an index error, not just a weaker model. Found as an embedding
    table in the decoder, besides the token embeddings, with about one row per position."""
    context = model_context(model)
    lm = model.get_base_model() if is_peft(model) else model
    if not context or not hasattr(lm, "get_decoder"):
        return False
    tokens = lm.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not tokens and context <= m.num_embeddings <= context + 2
               for m in lm.get_decoder().modules())

"""Ways to load a frozen base quantized by bitsandbytes (QLoRA): no, 4-bit NormalFloat / float, 8-bit."""


def quantization_config(quantize: str, dtype: torch.dtype):
    """The bitsandbytes config for `quantize` (None for "no"). 4-bit as in the QLoRA paper: double
    quantization of the scales, matmuls in the model's dtype (the adapters' gradients stay in it)."""
    if quantize == "no":
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    # On an AVX512-BF16 CPU, bitsandbytes warns at import that an optional fused-kernel package is
    # missing; that kernel serves the CPU repack `_check_4bit_layers` turns off, so the warning is noise.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(f"lora_quantize={quantize} needs the bitsandbytes package: pip install bitsandbytes "
                          f"(or reftune[qlora])") from None
    finally:
        cpu_ops_log.setLevel(level)
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def load_causal_lm(name_or_path: str | Path, device: torch.device, dtype: torch.dtype, quantize: str = "no"):
    """The model on `device` in `dtype`; with `quantize` its linear layers (not the embeddings or the
    LM head) hold bitsandbytes-quantized weights, placed on the device as they load."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    name_or_path = str(name_or_path)
    _check_model_path(name_or_path)
    quant = quantization_config(quantize, dtype)
    try:
        if quant is not None:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, quantization_config=quant,
                                                         device_map={"": device})
            return _check_4bit_layers(model)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model from {name_or_path!r}: {e}") from None
    return model.to(device)


def _check_4bit_layers(model):
    """Check and fix what bitsandbytes' CPU 4-bit kernels need (measured with bitsandbytes 0.50.2 on
    an AVX512-BF16 CPU): (1) their dequantize reads the wrong scales for a row (a layer's input
    features) that is not a whole number of quantization blocks, so such layers are refused on CPU
    (any Hub model's widths are multiples of 64; a tiny test model may not be); (2) on such a CPU
    the first no-grad eval forward rewrites a layer's packed weight in place into a kernel layout
    that peft's dequantize (our merged checkpoints, the vLLM sync) does not read, so that rewrite is
    turned off: the standard layout works on every path, the rewrite only speeds up CPU inference."""
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        block = getattr(state, "blocksize", 0)
        if module.weight.device.type == "cpu" and block and module.in_features % block:
            raise ValueError(f"{name}: {module.in_features} input features are not a multiple of bitsandbytes' "
                             f"{block}-value 4-bit block, which its CPU kernels dequantize wrongly; use "
                             f"lora_quantize=int8 or no, or a model whose widths are multiples of {block}")
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoints).
    transformers 5 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` and
    drops the old name in v6; releases before the rename have only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_quantized(model) -> bool:
    """Weights loaded through bitsandbytes (a QLoRA base)."""
    return getattr(model, "hf_quantizer", None) is not None


def cpu_has_native_bf16() -> bool:
    """True on a Linux x86 CPU with AVX512-BF16 or AMX, where bf16 matmuls run natively.

    Elsewhere (older x86, macOS, ARM) CPU bf16 is emulated and slower than fp32, so `auto`
    mixed precision stays off there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(mode: str, device: torch.device) -> bool:
    """no | bf16 | auto -> whether forward passes run under bf16 autocast.

    auto: on a CUDA GPU with bf16 support, or a CPU with native bf16 (see `cpu_has_native_bf16`).
    """
    if mode == "no":
        return False
    if mode == "bf16":
        return True
    if mode == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and cpu_has_native_bf16()
    raise ValueError(f"mixed_precision must be no, bf16 or auto, got {mode!r}")


def autocast(enabled: bool, device: torch.device):
    """Mixed precision for one forward pass: matmuls in bf16, weights, gradients, optimizer state and
    losses in the model's dtype (fp32 master weights). A no-op context when not enabled.

    Measured on a 2-core AMD EPYC with avx512_bf16, the demo's tiny model: a PPO iteration's forwards
    and backward 1.34x faster than fp32 at 1 thread, 1.19x at 2 (bench/bench_mixed_precision.py,
    commit 16b8002; docs/performance.md).
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def save_hf(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """An HF folder (config, weights, tokenizer); `state_dict` replaces the model's own (a sharded
    model's gathered weights)."""
    if state_dict is not None and hasattr(model, "get_base_model"):  # a peft model: save as the plain model
        model = model.get_base_model()
    if state_dict is not None and is_quantized(model):
        _save_dequantized(model, tokenizer, out_dir, state_dict)
        return
    if state_dict is not None and getattr(model.config, "tie_word_embeddings", False):
        # A gathered state dict holds tied weights under both names; the saved folder keeps one, as
        # save_pretrained does for the model's own.
        tied = getattr(model, "_tied_weights_keys", None) or []
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(out_dir, **({"state_dict": state_dict} if state_dict is not None else {}))
    save_tokenizer(tokenizer, out_dir)


def _save_dequantized(model, tokenizer, out_dir: Path, state_dict: dict) -> None:
    """A quantized base's merged (dequantized) weights saved as a plain model: without the
    quantization config, which would make every later load expect packed bitsandbytes weights."""
    config, quantizer = model.config, model.hf_quantizer
    quant = config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        save_hf(model, tokenizer, out_dir, state_dict)
    finally:
        model.hf_quantizer = quantizer
        if quant is not None:
            config.quantization_config = quant


def is_peft(model) -> bool:
    """A peft (LoRA) wrapper around an HF model."""
    return hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")


def merged_state_dict(model, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + scale * B @ A), under the
    plain HF parameter names, computed without changing `model` (each tensor moved to `device`
    when given: "cpu" for saving). See `merged_weights` for a quantized base."""
    return {name: t if device is None else t.to(device) for name, t in merged_weights(model)}


def merged_weights(model):
    """(name, tensor) pairs of `merged_state_dict`, one at a time: a quantized base's layers are
    dequantized as they come (their packed data and quantization state stay out), so a QLoRA
    weight sync never holds a second full-precision copy of the model at once."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight

    base = model.get_base_model()
    adapted, quantized = {}, {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            adapted[f"{name}.weight"] = module
            continue  # (its `weight` is the base layer's, dequantized under the base layer's name)
        if type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
            quantized[name] = module
    dtype = base.get_input_embeddings().weight.dtype
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            owner, _, leaf = key.rpartition(".")
            if owner in quantized and leaf == "weight":
                module = quantized[owner]
                value = dequantize_bnb_weight(module.weight, getattr(module, "state", None))
                value = value.to(getattr(module, "compute_dtype", None) or dtype)
            elif (owner in quantized and leaf != "bias") or key.partition(".weight.")[0] in quantized:
                continue  # quantization state (absmax, quant_map, SCB, ...): folded into the weight
            clean = key.replace(".base_layer.", ".")
            if clean in adapted:
                layer = adapted[clean]
                for adapter in (a for a in layer.active_adapters if a in layer.lora_A):
                    value = value + layer.get_delta_weight(adapter).to(value.dtype)
            yield clean, value
