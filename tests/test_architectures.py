"""The architecture matrix: tiny random-weight models of eleven family layouts, each with a tokenizer
built here on its family's special-token conventions (no pad, pad = EOS, a BOS the tokenizer adds
or not, a chat template, end-of-turn tokens listed as extra EOS ids in the generation config).

For every family: tokens are handled as docs/models.md says (BOS where the tokenizer adds one, a
pad that is not EOS where one exists, the tokenizer saved as it was given, every stop token
honoured), the value head reads what the LM head reads, LoRA finds its layers without
`lora_target_modules`, the static engine's greedy output equals `model.generate`'s; and (slow)
SFT -> ReFT -> eval -> sample runs with the default engine, then ReFT with LoRA (`lora_r=8`).
The context bound (learned positions), the `generation_config` EOS ids and the start-time option
checks have tests of their own below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from conftest import small_data

from reftune.engines import make_generator
from reftune.models import encode_prompt, load_causal_lm, load_tokenizer, stop_token_ids
from reftune.tiny import tokenizer_corpus, train_tokenizer
from reftune.trainers.policy import ValueHead, head_input_width, policy_forward

CONTEXT = 256  # the small task's longest SFT example is about 210 tokens with these tokenizers
WIDTH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CHAT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
LLAMA_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ENDOFTEXT = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


@dataclass
class Family:
    """One family's layout: its config class and fields, its tokenizer's conventions."""

    config: str
    """transformers config class."""
    fields: dict
    """Config fields besides vocabulary and special ids (token-valued ones are resolved by name)."""
    tokens: dict
    """Special tokens by role (the tokenizer's own; a missing pad_token means it has none)."""
    added: tuple = ()
    """More special tokens (end-of-turn markers...)."""
    add_bos: bool = False
    """The tokenizer puts its BOS before every text."""
    extra_eos: tuple = ()
    """Tokens the model's generation_config lists as EOS besides the tokenizer's."""
    chat_template: str | None = None
    learned_positions: bool = False
    own_pad: bool = field(default=False)
    """The tokenizer ships a pad token (so reftune leaves it as it is)."""


FAMILIES = {
    "gpt2": Family("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=CONTEXT), ENDOFTEXT,
                   learned_positions=True),
    "opt": Family("OPTConfig", dict(hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=CONTEXT),
                  {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                  add_bos=True, learned_positions=True, own_pad=True),
    # opt-350m's layout: a 64-wide residual stream projected to 32 before the LM head, post-norm.
    "opt-350m-style": Family("OPTConfig", dict(hidden_size=64, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                                               num_attention_heads=2, max_position_embeddings=CONTEXT,
                                               do_layer_norm_before=False),
                             {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                             add_bos=True, learned_positions=True, own_pad=True),
    "llama-pad-eos": Family("LlamaConfig", dict(WIDTH, max_position_embeddings=CONTEXT),
                            {**LLAMA_TOKENS, "pad_token": "</s>"}, add_bos=True, own_pad=True),
    "qwen2-chat": Family("Qwen2Config", dict(WIDTH, num_key_value_heads=1, max_position_embeddings=CONTEXT),
                         {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, added=("<|im_start|>",),
                         extra_eos=("<|endoftext|>",), chat_template=CHAT, own_pad=True),
    "mistral-sliding": Family("MistralConfig", dict(WIDTH, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                                                    sliding_window=48), LLAMA_TOKENS, add_bos=True),
    "gemma2": Family("Gemma2Config", dict(WIDTH, num_key_value_heads=1, head_dim=16, max_position_embeddings=CONTEXT,
                                          sliding_window=48, query_pre_attn_scalar=16),
                     GEMMA_TOKENS, added=("<start_of_turn>", "<end_of_turn>"), add_bos=True,
                     extra_eos=("<end_of_turn>",), own_pad=True),
    "gemma3-text": Family("Gemma3TextConfig", dict(WIDTH, num_key_value_heads=1, head_dim=16,
                                                   max_position_embeddings=CONTEXT, sliding_window=48),
                          GEMMA_TOKENS, added=("<start_of_turn>", "<end_of_turn>"), add_bos=True,
                          extra_eos=("<end_of_turn>",), own_pad=True),
    # Gemma-3 4B-27B: Gemma3ForConditionalGeneration, the text model's sizes in text_config only.
    "gemma3-multimodal": Family("Gemma3Config", dict(
        text_config=dict(WIDTH, num_key_value_heads=1, head_dim=16, max_position_embeddings=CONTEXT, sliding_window=48),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4),
        GEMMA_TOKENS, added=("<start_of_turn>", "<end_of_turn>"), add_bos=True, extra_eos=("<end_of_turn>",),
        own_pad=True),
    "phi3": Family("Phi3Config", dict(WIDTH, num_key_value_heads=2, max_position_embeddings=CONTEXT),
                   {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
                   added=("<|user|>", "<|assistant|>", "<|end|>"), extra_eos=("<|end|>",), own_pad=True),
    "gpt-neox": Family("GPTNeoXConfig", dict(WIDTH, max_position_embeddings=CONTEXT), ENDOFTEXT,
                       added=("<|padding|>",)),
}


def build_family(name: str, out: Path, texts: list[str]) -> str:
    """A tiny random-weight model of family `name` and its tokenizer, saved as a Hub folder."""
    fam = FAMILIES[name]
    tok = train_tokenizer(texts, 300, tokens=fam.tokens, added=fam.added, add_bos=fam.add_bos)
    if fam.chat_template:
        tok.chat_template = fam.chat_template
    ids = {role.removesuffix("_token") + "_token_id": tok.convert_tokens_to_ids(t) for role, t in fam.tokens.items()
           if role in ("bos_token", "eos_token", "pad_token")}
    fields = dict(fam.fields)
    if "text_config" in fields:  # the multimodal layout: sizes and ids belong to the text model
        fields["text_config"] = dict(fields["text_config"], vocab_size=len(tok), **ids)
    config = getattr(transformers, fam.config)(**fields, vocab_size=len(tok), **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    eos = [tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in fam.extra_eos]
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory, small_task):
    """name -> model folder, each family built once per module (read-only)."""
    built: dict[str, str] = {}
    texts = tokenizer_corpus(small_task)

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name) / "model", texts)
        return built[name]
    return get


@pytest.fixture(scope="module")
def prompts(small_task):
    return [small_task.prompt(ex, for_generation=True) for ex in small_task.test[:6]]


def loaded(folder: str):
    return load_causal_lm(folder, torch.device("cpu"), torch.float32).eval(), load_tokenizer(folder)


def rows(rollout) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]


# --------------------------------------------------------------------------- every family, fast

@pytest.mark.parametrize("name", FAMILIES)
def test_tokens_follow_the_familys_conventions(name, family_folder, prompts, tmp_path):
    from transformers import AutoTokenizer

    from reftune.models import save_tokenizer

    fam, folder = FAMILIES[name], family_folder(name)
    raw, tok = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    # What the tokenizer encodes and decodes is unchanged by the pad reftune may have given it.
    for text in prompts[:2] + ["a <unk> b <pad> 7"]:
        assert tok(text)["input_ids"] == raw(text)["input_ids"]
    assert tok.pad_token_id is not None
    if fam.own_pad:
        assert tok.pad_token == raw.pad_token
    elif name == "gpt2":  # one special token in all: EOS pads (a note says so)
        assert tok.pad_token_id == tok.eos_token_id
    else:
        assert tok.pad_token_id != tok.eos_token_id  # Mistral: <unk>; GPT-NeoX: <|padding|>
    # BOS where the tokenizer itself adds it, once, also when the text already starts with it.
    ids = encode_prompt(tok, prompts[0])
    assert (ids[0] == tok.bos_token_id) == fam.add_bos
    if fam.add_bos:
        assert encode_prompt(tok, tok.bos_token + prompts[0]) == ids
    # Every EOS id of the model's generation_config stops a response.
    model = load_causal_lm(folder, torch.device("cpu"), torch.float32)
    assert stop_token_ids(model, tok) == [tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in fam.extra_eos]
    # Checkpoints keep the tokenizer as it was given.
    save_tokenizer(tok, tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") == (raw.pad_token if fam.own_pad else None)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == raw.chat_template


def test_a_missing_pad_is_an_existing_token_named_as_one(small_task, tmp_path):
    """Llama-3's conventions: no pad, no unknown token, a reserved range, `<|finetune_right_pad_id|>`
    and a multimodal `<|image_pad|>` (never a pad: it marks image features); with a small
    embedding table, only candidates inside it count."""
    from reftune.models import assign_pad, pad_candidates

    added = ("<|image_pad|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>", "<|eot_id|>")
    texts = tokenizer_corpus(small_task)[:50]
    tok = train_tokenizer(texts, 300, tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
                          added=added, add_bos=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in added}
    assert pad_candidates(tok) == [ids["<|finetune_right_pad_id|>"], ids["<|reserved_special_token_0|>"]]
    before = [tok(t)["input_ids"] for t in texts[:3]]
    assign_pad(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and [tok(t)["input_ids"] for t in texts[:3]] == before
    small = train_tokenizer(texts, 300, tokens={"eos_token": "<|end_of_text|>"}, added=added)
    assign_pad(small, vocab_size=small.convert_tokens_to_ids("<|reserved_special_token_0|>") + 1)
    assert small.pad_token == "<|reserved_special_token_0|>"


@pytest.mark.parametrize("name", FAMILIES)
def test_value_head_reads_what_the_lm_head_reads(name, family_folder, prompts):
    model, tok = loaded(family_folder(name))
    head = ValueHead.for_model(model).eval()
    expected = model.get_output_embeddings().in_features
    assert head_input_width(model) == expected and head.linear.in_features == expected
    if name == "opt-350m-style":
        assert expected == 32 != model.config.hidden_size
    with torch.no_grad():
        torch.nn.init.normal_(head.linear.weight)
        ro = make_generator("cached", model, tok).generate(prompts[:2], num_samples=2, max_new_tokens=5)
        logprobs, values, _ = policy_forward(model, head, ro.input_ids, ro.attention_mask, ro.response_ids,
                                             ro.prompt_ids.shape[1])
    assert values.shape == logprobs.shape == ro.response_ids.shape and torch.isfinite(values).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_static_greedy_equals_generate(name, family_folder, prompts):
    model, tok = loaded(family_folder(name))
    static = make_generator("static", model, tok, batch_size=4).generate(prompts, greedy=True, max_new_tokens=12)
    hf = make_generator("hf", model, tok, batch_size=4).generate(prompts, greedy=True, max_new_tokens=12)
    assert rows(static) == rows(hf) and static.texts == hf.texts
    assert torch.equal(static.ended_with_eos, hf.ended_with_eos)
    first = static.prompt_ids[0][static.prompt_mask[0].bool()].tolist()
    assert first == encode_prompt(tok, prompts[0])  # the prompt as SFT sees it (with its BOS, if any)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_finds_its_layers_without_target_modules(name, family_folder):
    pytest.importorskip("peft")
    from reftune.trainers.lora import apply_lora
    from reftune.trainers.reft import ReFTConfig

    model, _ = loaded(family_folder(name))
    lora = apply_lora(model, ReFTConfig(lora_r=8))
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert not any("vision" in n for n in trained)  # the multimodal layout: the language model's layers only


# --------------------------------------------------------------------------- stop tokens, context bound

@pytest.mark.parametrize("name", ["llama-pad-eos", "gemma3-text"])  # the static loop, and its cached fallback
def test_every_engine_stops_at_the_generation_configs_eos_ids(name, family_folder, prompts):
    """An end-of-turn token listed only in the model's generation_config ends a response in every
    engine, as the tokenizer's EOS does (made a token the untrained model emits mid-answer)."""
    model, tok = loaded(family_folder(name))
    model.generation_config.eos_token_id = tok.eos_token_id
    free = rows(make_generator("hf", model, tok).generate(prompts, greedy=True, max_new_tokens=16))
    later = {t for row in free for t in row[1:]} - {row[0] for row in free}
    stop = max(later, key=lambda t: sum(t in row for row in free))
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    outs = {engine: make_generator(engine, model, tok).generate(prompts, greedy=True, max_new_tokens=16)
            for engine in ("static", "cached", "hf")}
    for engine, ro in outs.items():
        for row, ended in zip(rows(ro), ro.ended_with_eos.tolist()):
            assert stop not in row[:-1] and ended == (row[-1] == stop), engine
            assert ended or len(row) == 16, engine
        assert any(ro.ended_with_eos), engine
    assert rows(outs["static"]) == rows(outs["hf"]) == rows(outs["cached"])
    assert outs["static"].texts == outs["hf"].texts


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_generation_is_bounded_by_a_learned_position_context(name, family_folder, prompts, capsys):
    """Prompt + max_new_tokens past the position table: every engine stops at the context (the last
    sampled token at position context - 1), says so once, and agrees with the others."""
    model, tok = loaded(family_folder(name))
    model.generation_config.eos_token_id = tok.eos_token_id  # an untrained model: answers run to the bound
    longest = max(len(encode_prompt(tok, p)) for p in prompts)
    outs = {}
    for engine in ("static", "cached", "hf"):
        gen = make_generator(engine, model, tok, batch_size=4)
        outs[engine] = gen.generate(prompts, greedy=True, max_new_tokens=CONTEXT)
        gen.generate(prompts[:2], num_samples=2, max_new_tokens=CONTEXT)  # sampled, and noted only once
        assert capsys.readouterr().err.count(f"engine={engine}: answers bounded to {CONTEXT - longest} new tokens") == 1
        assert outs[engine].response_ids.shape[1] == CONTEXT - longest
    assert rows(outs["static"]) == rows(outs["hf"]) == rows(outs["cached"])
    with pytest.raises(ValueError, match="fills the model's context"):
        make_generator("static", model, tok).generate(["x" * 3 * CONTEXT], max_new_tokens=4)


# --------------------------------------------------------------------------- options checked at start

def test_chunked_logprobs_on_a_soft_capped_head_are_refused_before_any_rollout(family_folder, small_task, tmp_path):
    from reftune.trainers.loop import Callbacks
    from reftune.trainers.reft import ReFTConfig, run_reft

    started = []
    cfg = ReFTConfig(model=family_folder("gemma2"), data=small_data(), out_dir=str(tmp_path / "run"), steps=1,
                     questions_per_step=2, mini_batch_size=2, logprob_chunk_size=4, device="cpu", progress=False,
                     tensorboard=False)
    with pytest.raises(ValueError, match="logprob_chunk_size=4: Gemma2ForCausalLM .*final_logit_softcapping=30.0.* set logprob_chunk_size=0"):
        run_reft(cfg, task=small_task, callbacks=Callbacks(on_step_begin=started.append))
    assert not started


def test_an_sft_length_past_learned_positions_is_refused_at_start(family_folder, small_task, tmp_path):
    from reftune.trainers.sft import SFTConfig, run_sft

    cfg = SFTConfig(model=family_folder("gpt2"), data=small_data(), out_dir=str(tmp_path / "run"), epochs=1,
                    max_length=CONTEXT + 1, eval_split="none", device="cpu", progress=False, tensorboard=False)
    with pytest.raises(ValueError, match=f"max_length={CONTEXT + 1} is longer than the model's context"):
        run_sft(cfg, task=small_task)


# --------------------------------------------------------------------------- end to end (slow)

def common(out: Path, **kw) -> dict:
    return dict(data=small_data(), out_dir=str(out), device="cpu", **kw)


def quiet(out: Path) -> dict:
    return common(out, progress=False, tensorboard=False)


def reft_config(model: str, out: Path, **kw):
    from reftune.trainers.reft import ReFTConfig

    base = dict(model=model, steps=2, questions_per_step=4, samples_per_prompt=2, mini_batch_size=4, ppo_epochs=1,
                lr=1e-3, max_new_tokens=16, eval_max_new_tokens=16, eval_every=2, save_every=2, **quiet(out))
    return ReFTConfig(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_sft_reft_eval_sample_and_lora(name, family_folder, small_task, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from reftune.inference.evaluate import EvalConfig, run_eval
    from reftune.inference.sample import SampleConfig, run_sample
    from reftune.trainers.reft import run_reft
    from reftune.trainers.sft import SFTConfig, run_sft

    folder = family_folder(name)
    sft = run_sft(SFTConfig(model=folder, epochs=1, batch_size=16, lr=3e-3, eval_split="none", max_length=CONTEXT,
                            **quiet(tmp_path / "sft")), task=small_task)["checkpoints"][1]
    # The demo's setting: where the static engine runs its own loop, PPO's old log-probs and values
    # come from its decoding steps (Generator.set_value_head).
    reft = run_reft(reft_config(sft, tmp_path / "reft", engine_old_logprobs=True), task=small_task)
    assert len(reft["history"]) == 2 and all(torch.isfinite(torch.tensor(h["reft/kl"])) for h in reft["history"])
    policy = reft["best_checkpoint"]
    assert type(AutoModelForCausalLM.from_pretrained(policy)).__name__ == type(
        AutoModelForCausalLM.from_pretrained(folder)).__name__
    # The checkpoint's tokenizer is the one given: a pad reftune chose is not saved.
    saved = json.loads((Path(policy) / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") == json.loads((Path(folder) / "tokenizer_config.json").read_text()).get("pad_token")
    assert (Path(policy).parent / "value_head.pt").exists()
    summary = run_eval(EvalConfig(model=policy, split="test", max_new_tokens=16, **common(tmp_path / "eval")))
    assert summary["n"] == len(small_task.test)
    sampled = run_sample(SampleConfig(model=policy, split="test", k=2, max_new_tokens=16,
                                      **common(tmp_path / "sample", progress=False)))
    assert sampled["n"] == len(small_task.test)
    lora = run_reft(reft_config(sft, tmp_path / "lora", lora_r=8, steps=1, eval_every=1, save_every=1),
                    task=small_task)
    assert lora["history"][0]["reft/kl"] == pytest.approx(0.0, abs=1e-5)  # adapter B = 0: the policy is the base
    assert type(AutoModelForCausalLM.from_pretrained(lora["last_checkpoint"])).__name__ == type(
        AutoModelForCausalLM.from_pretrained(folder)).__name__


@pytest.mark.slow
def test_reft_past_a_learned_position_context_is_bounded(family_folder, small_task, tmp_path):
    """GPT-2 with max_new_tokens past its position table: rollouts stop at the context, and PPO's
    forward passes over prompt + response stay inside it."""
    from reftune.trainers.reft import run_reft

    result = run_reft(reft_config(family_folder("gpt2"), tmp_path / "run", steps=1, max_new_tokens=CONTEXT,
                                  eval_max_new_tokens=CONTEXT, eval_every=1, save_every=1), task=small_task)
    assert result["history"][0]["reft/response_length"] > 16
