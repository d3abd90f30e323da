"""Build a tiny causal LM from scratch: a byte-level BPE tokenizer trained on the task's text and a
small Llama, both saved with `save_pretrained`, so every later stage loads it exactly like a Hub
model (`AutoModelForCausalLM.from_pretrained(path)`).

Digits are always single tokens: a BPE that merges "17" and "170" into unrelated tokens makes
copying and comparing numbers much harder for a small model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reftune.runs import atomic_save

from reftune.tasks import DataConfig


@dataclass
class TinyModelConfig:
    """Size of the tiny model; the defaults train well in minutes on 2 CPU cores."""

    vocab_size: int = 1024
    """Tokenizer vocabulary size (byte-level BPE; digits stay single tokens)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the MLP."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    max_position_embeddings: int = 512
    """Longest sequence the model accepts."""
    seed: int = 0
    """Seed for the random initial weights."""

    def validate(self, prefix: str = "model.") -> None:
        from reftune.validate import Checks

        c = Checks(self, prefix)
        c.int("vocab_size", 259, note="byte-level BPE: 256 byte tokens + 3 special tokens at least")
        c.int("hidden_size", 2).int("intermediate_size", 1).int("num_layers", 1).int("num_heads", 1)
        c.int("max_position_embeddings", 16).int("seed", 0, 2**32 - 1)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            c.fail("num_heads", f"must divide hidden_size={self.hidden_size} into heads of an even size "
                                f"(rotary embeddings), e.g. num_heads={_heads_hint(self.hidden_size)}")


def _heads_hint(hidden: int) -> int:
    return next((h for h in (8, 4, 2, 1) if hidden % h == 0 and (hidden // h) % 2 == 0), 1)


TINY_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
"""The tiny model's special tokens, by role (no BOS is added to texts)."""


def train_tokenizer(texts: list[str], vocab_size: int, tokens: dict[str, str] | None = None,
                    added: tuple[str, ...] = (), add_bos: bool = False):
    """A byte-level BPE tokenizer (no unknown tokens: any text round-trips), digits split.

    `tokens`: special tokens by role (`pad_token`, `bos_token`, `eos_token`, `unk_token`; one token
    may hold several roles, a role may be missing), default `TINY_TOKENS`; `added`: more special
    tokens (an end-of-turn token, ...); `add_bos`: the tokenizer puts its BOS before every text, as
    Llama's, Mistral's and Gemma's do. Tests build other families' conventions with these."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokens = dict(TINY_TOKENS if tokens is None else tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    special = list(dict.fromkeys(list(tokens.values()) + list(added)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = tokens["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    more = [t for t in added if t not in tokens.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **tokens,
                                   **({"additional_special_tokens": more} if more else {}))


def build_tiny_model(out_dir: str | Path, texts: list[str], cfg: TinyModelConfig | None = None) -> Path:
    """Train a tokenizer on `texts`, initialise a small Llama, save both to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reftune.models import quiet_transformers

    quiet_transformers()
    cfg = cfg or TinyModelConfig()
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_cfg)

    def write(d: Path) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        (d / "reftune_tiny.json").write_text(json.dumps(asdict(cfg), indent=2))

    # Written beside the target and swapped in whole: a kill never leaves half a model folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save(write, out_dir)


def tokenizer_corpus(task) -> list[str]:
    """Text the tokenizer learns from: every training prompt and gold CoT (and test prompts, so
    question words never fall back to raw bytes)."""
    texts = [task.prompt(ex) + (ex.cot or "") for ex in task.train]
    return texts + [task.prompt(ex) for ex in task.validation + task.test]


@dataclass
class BuildTinyConfig:
    """`reftune build-tiny`: a tiny Llama + tokenizer trained on a task's text."""

    out_dir: str = "runs/tiny"
    """Where the model folder is saved."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task whose prompts and CoTs train the tokenizer."""
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Model size."""

    def validate(self, prefix: str = "") -> None:
        from reftune.validate import Checks

        Checks(self, prefix).out_dir()
        self.data.validate(prefix + "data.")
        self.model.validate(prefix + "model.")


def run_build_tiny(cfg: BuildTinyConfig, overwrite: bool = False) -> dict:
    """Build the model into `cfg.out_dir`; a folder that already holds something is refused unless
    `overwrite` (then the new model replaces it in one swap)."""
    from reftune.runs import LOCK_NAME, RunFolderError, claim_run
    from reftune.tasks import load_task

    cfg.validate()
    texts = tokenizer_corpus(load_task(cfg.data))
    with claim_run(cfg.out_dir, "reftune build-tiny") as folder:
        held = sorted(p.name for p in folder.path.iterdir() if p.name != LOCK_NAME)
        if held and not overwrite:
            kind = "a model" if "config.json" in held else "files"
            raise RunFolderError(f"{folder.path} already holds {kind} ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                                 f"choose another --out, or pass --overwrite to replace it")
        folder.begin()
        path = build_tiny_model(cfg.out_dir, texts, cfg.model)
    return {"model": str(path)}
