"""A tiny instruct-style model built locally, with Qwen2.5-Instruct's conventions: a ChatML chat
template, `<|im_end|>` as the tokenizer's EOS (the end-of-turn token), `<|endoftext|>` as pad, and
a saved `generation_config` whose `eos_token_id` lists both (where instruct models list their
end-of-turn tokens), plus an engine that records every prompt it is given."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reftune.engines.static import StaticSampler
from reftune.tasks.prompts import conversation

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chatml_texts(task, system_prompt: str = "") -> list[str]:
    """Rendered conversations of the task (the tokenizer's training text)."""
    out = []
    for ex in task.train + task.validation + task.test:
        turns = conversation(ex.question, system_prompt)
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns)
        out.append(f"{text}{IM_START}assistant\n{ex.cot or ''}{IM_END}\n")
    return out


def build_instruct_model(out_dir: Path, texts: list[str], vocab_size: int = 400) -> str:
    """Tokenizer (byte-level BPE, digits split) + a tiny random Llama, saved like a Hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                        additional_special_tokens=[IM_START], clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML
    eot, eos = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=eos, bos_token_id=None, eos_token_id=[eot, eos])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eot, eos], pad_token_id=eos)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    saved = json.loads((out_dir / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [eot, eos], saved
    return str(out_dir)


class RecordingEngine(StaticSampler):
    """The static engine, keeping every prompt it is asked to continue (class-wide, in call order)."""

    prompts: list[str] = []

    def generate(self, prompts, **kwargs):
        RecordingEngine.prompts.extend(prompts)
        return super().generate(prompts, **kwargs)
