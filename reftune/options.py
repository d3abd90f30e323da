"""The config sections every command is composed of: each field is declared and documented here
once, and a command's config inherits the sections it needs (keys stay flat: `device=cpu`,
`temperature=0.7`, `lora_r=8`).

    @dataclass
    class EvalConfig(Sampling, Runtime): ...     # engine, gen_batch_size, temperature, ..., device, dtype

Each section checks its own fields in `validate`, and calls `super().validate(prefix)`, so a
command's `validate` runs every section's checks once, whatever the order of its bases.
A command may give a field another default by re-declaring only its default (the documentation
stays here). No torch here: configs load before any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from reftune.config import ConfigError
from reftune.validate import MIXED_PRECISION, Checks

EVAL_SPLITS = ("validation", "test")
PARALLEL_MODES = ("ddp", "fsdp2")
QUANTIZE = ("no", "nf4", "fp4", "int8")


class Section:
    """Root of every section: the end of the `validate` chain, and the table of renamed keys."""

    renamed: ClassVar[dict[str, str]] = {}
    """Old key -> new key: a config that still uses the old name is refused with the new one."""

    def validate(self, prefix: str = "") -> None:
        """Refuse a bad value before any model is loaded or any folder written."""


@dataclass
class Runtime(Section):
    """Where and how a command computes."""

    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"""
    seed: int = 0
    """Seed of everything random the command does (data order, sampling, initialisation)."""
    progress: bool = True
    """Show progress bars."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).device().dtype().int("seed", 0, 2**32 - 1).bool("progress")


@dataclass
class TrainRuntime(Runtime):
    """What a training command adds to the runtime: precision, distribution, memory savers."""

    mixed_precision: str = "no"
    """Forward passes under bf16 autocast, weights and optimizer in fp32: no | bf16 | auto (where bf16 is native)."""
    parallel: str = "ddp"
    """With several processes (torchrun / accelerate launch): ddp (replicated weights) | fsdp2 (sharded)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (less memory, ~30% more compute)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.choice("mixed_precision", MIXED_PRECISION).choice("parallel", PARALLEL_MODES).bool("gradient_checkpointing")


@dataclass
class Tracking(Section):
    """Where a training run's metrics, config and sampled CoTs go besides metrics.jsonl (reftune.trackers)."""

    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])
    """Trackers besides metrics.jsonl (always written): tensorboard | wandb | trackio | mlflow | jsonl | none | all | package.module:Class (reftune.trackers)."""
    log_samples_every: int = 0
    """Steps between tables of sampled CoTs (prompt, completion, answers, reward) sent to the trackers and samples.jsonl (ReFT, Online-ST; 0: off)."""
    tensorboard: bool = True
    """Deprecated (use report_to): false removes tensorboard from report_to."""

    def validate(self, prefix: str = "") -> None:
        from reftune.trackers import check_report_to

        super().validate(prefix)
        check_report_to(self, prefix)


@dataclass
class LoRA(Section):
    """Low-rank adapters instead of full fine-tuning (peft), optionally on a quantized base (QLoRA)."""

    lora_r: int = 0
    """LoRA rank (0: full fine-tuning). With LoRA the reference is the adapter-disabled base (peft)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names that get adapters (empty: peft's default for the architecture, e.g. q_proj, v_proj)."""
    lora_quantize: str = "no"
    """QLoRA: load the frozen base's linear layers quantized by bitsandbytes: no | nf4 | fp4 | int8 (needs lora_r > 0)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.int("lora_r", 0).float("lora_alpha", 0.0, lo_open=True).float("lora_dropout", 0.0, 1.0, hi_open=True)
        c.choice("lora_quantize", QUANTIZE)
        if self.lora_quantize != "no" and not self.lora_r:
            c.fail("lora_quantize", "quantizes the frozen base of a LoRA run: set lora_r > 0 too (e.g. lora_r=16)")
        if self.lora_r and getattr(self, "parallel", "ddp") == "fsdp2":
            c.fail("lora_r", "with parallel=fsdp2 is not supported yet: use parallel=ddp (LoRA's trainable "
                             "state is small, sharding it buys little)")


@dataclass
class Optimizer(Section):
    """AdamW and gradient clipping."""

    lr: float = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).float("lr", 0.0, lo_open=True).float("weight_decay", 0.0).float("max_grad_norm", 0.0, lo_open=True)


@dataclass
class Schedule(Section):
    """A linear warm-up then linear decay of the learning rate (supervised trainers)."""

    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up; linear decay to 0 after."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).float("warmup_ratio", 0.0, 1.0)


@dataclass
class Decoding(Section):
    """The generation engine and how many sequences it decodes at once."""

    renamed: ClassVar[dict[str, str]] = {"batch_size": "gen_batch_size", "eval_batch_size": "gen_batch_size"}

    engine: str = "auto"
    """Generation engine (reftune.engines.ENGINES: auto = static on CPU, cached on GPU | cached | static | hf | vllm, or package.module:Class)."""
    gen_batch_size: int = 64
    """Sequences decoded at once."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).engine().int("gen_batch_size", 1)


@dataclass
class Sampling(Decoding):
    """Sampled CoTs: temperature, nucleus and length."""

    temperature: float = 1.0
    """Sampling temperature (the paper: 1)."""
    top_p: float = 1.0
    """Nucleus sampling (1: off, as in the paper)."""
    max_new_tokens: int = 256
    """Longest CoT generated."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).temperature().top_p().int("max_new_tokens", 1)


@dataclass
class SampleCount(Section):
    """How many CoTs are sampled per question at inference."""

    k: int = 16
    """Samples per question (the paper: 100 for voting, reranking and self-training)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).int("k", 1)


@dataclass
class SampleFile(SampleCount, Sampling):
    """k samples per question appended to a resumable JSONL file, a chunk of questions at a time."""

    chunk_size: int = 64
    """Questions sampled and appended to the file at a time (what a kill can lose)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).int("chunk_size", 1)


@dataclass
class Evaluation(Section):
    """Greedy evaluation during training, which picks the best checkpoint."""

    eval_split: str = "validation"
    """Split evaluated during training to pick the best checkpoint: validation | test (| none: SFT only)."""
    eval_max_new_tokens: int = 256
    """Longest CoT generated in evaluation."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        Checks(self, prefix).choice("eval_split", EVAL_SPLITS + ("none",)).int("eval_max_new_tokens", 1)


@dataclass
class Rewards(Section):
    """What a sampled CoT scores: ReFT's correctness score and reward functions of your own (TRL's
    convention, reftune/rewards/functions.py), summed with weights."""

    reward_funcs: list[str] = field(default_factory=lambda: ["correctness"])
    """Reward functions summed into the reward: built-ins (correctness: ReFT's score; answered) or package.module:function / file.py:function, TRL's signature."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward function, in order (empty: 1 each)."""
    score_correct: float = 1.0
    """Reward of a correct answer."""
    score_wrong: float = 0.1
    """Reward of an extracted but wrong answer."""
    score_none: float = 0.0
    """Reward when no answer could be extracted."""
    reward_model: str = ""
    """A sequence-classification reward model (e.g. `reftune reward-model`'s checkpoint): its P(correct) of each CoT is one more reward."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score."""

    @property
    def reward(self):
        """ReFT's correctness score settings (a `RewardSpec`)."""
        from reftune.rewards.score import RewardSpec

        return RewardSpec(self.score_correct, self.score_wrong, self.score_none)

    def reward_sources(self) -> list:
        """The configured reward functions, loaded (`reftune.rewards.functions.RewardSource`)."""
        from reftune.rewards.functions import build_sources

        return build_sources(self.reward_funcs, self.reward_weights, self.reward)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        c = Checks(self, prefix)
        c.float("score_correct").float("score_wrong").float("score_none").float("reward_model_weight")
        c.str("reward_model")
        if not isinstance(self.reward_funcs, list) or not all(isinstance(n, str) and n for n in self.reward_funcs):
            c.fail("reward_funcs", "must be a list of names: built-ins (correctness, answered) or package.module:function")
        if not self.reward_funcs and not self.reward_model:
            c.fail("reward_funcs", "is empty and there is no reward_model: nothing would score the samples "
                                   "(the default is [correctness], ReFT's score)")
        weights = self.reward_weights
        if not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                    and math.isfinite(w) for w in weights):
            c.fail("reward_weights", "must be a list of finite numbers, one per reward function")
        if weights and len(weights) != len(self.reward_funcs):
            c.fail("reward_weights", f"has {len(weights)} weight(s) for {len(self.reward_funcs)} reward function(s) "
                                     f"{self.reward_funcs}: give one per function, or none (1 each)")
        from reftune.rewards.functions import RewardFunctionError

        try:
            self.reward_sources()  # imports the user's modules now, before any model is loaded
        except RewardFunctionError as e:
            raise ConfigError(f"{prefix}reward_funcs={self.reward_funcs!r}: {e}") from None
