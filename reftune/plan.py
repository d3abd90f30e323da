"""Run plans without loading weights: per-device batches, accumulation, tokens per optimizer step,
memory per device and a time estimate, for a reftune config on W devices.

    plan = plan_run(cfg, world_size=8, gpu_memory_gib=80)       # a RunPlan, or PlanError
    python -m reftune.recipes -c configs/recipes/paper_reft.yaml --command train --world-size 8 --gpu-memory 80

Memory per device mirrors what the trainers allocate. N parameters (N_t trainable), w bytes per
weight (4 fp32, 2 bf16/fp16; `auto` = bf16 on a GPU), a bytes per activation (2 under bf16 weights
or bf16 autocast, else 4), W devices, s_x = W if the strategy shards x else 1:

    weights     N w / s_p        (+ LoRA adapters 4 N_t: PEFT keeps them in fp32)
                QLoRA (lora_quantize): the N_lin weights of the decoder layers' linear modules at
                q bytes (nf4/fp4 0.5 + 0.016 for double-quantized scales, int8 1), the rest (embeddings,
                LM head, norms, biases) in fp32, as peft's prepare_model_for_kbit_training casts them
    grads       N_t g / s_g      g = w for full fine-tuning, 4 for LoRA adapters
    optimizer   2 N_t g / s_o    AdamW exp_avg + exp_avg_sq, in the trainable parameters' dtype
    ddp_buckets N_t g            DDP's gradient buckets (a second copy of the grads), W > 1 only
    value_head  4 (h + 1) w      ReFT with GAE: weights, grad, two AdamW states
    reference   N w              ReFT full fine-tuning: a frozen, unsharded copy on every rank
                                 (LoRA: none, the reference is the adapter-disabled base)
    replica     N w              fsdp2: the unsharded copy that rollouts and evaluation sample from
    gathered    2 N_layer w      fsdp2/zero3: the all-gathered decoder layer and the prefetched next
    engine      vllm: its gpu_memory_utilization share of the GPU (own weights + KV cache)
  transient, by phase (only the largest counts: they are never live together):
    train       activations + logits of one micro/mini-batch of b rows of S tokens, R of them response:
                per layer A = b S (6h + 2 kv_dim + m I) a (norm in/outputs, q/k/v, attention output,
                MLP intermediates; SDPA/flash attention keeps no S x S scores; m = 4 gated MLP, 2 plain)
                activations L A, or with gradient_checkpointing b S h a L + A (one layer recomputed)
                logits: ReFT b V (2 S a + 16 R) (lm-head output + grad, fp32 copy of the response part
                + grad, entropy temporaries); SFT / Online-ST b V S (2a + 12) (output, fp32 copy,
                log-softmax, their grads); with logprob_chunk_size c, S and R become min(c, .)
    scoring     ReFT's no-grad forward over all rollout rows of the rank: b V (S a + 8 R) + A / L
    generation  KV cache of the built-in engines (cached, hf): b_gen S L 2 kv_dim w

    total = (static + largest transient) (1 + FRAGMENTATION) + CUDA_CONTEXT_GIB

Strategies: ddp (nothing sharded), fsdp2 (weights, grads, optimizer; reftune's `parallel=fsdp2`),
zero2 (grads, optimizer), zero3 (all). reftune wraps the model itself with ddp or fsdp2; zero2/zero3
are what the DeepSpeed launcher configs in configs/accelerate/ describe, planned for comparison.

Time (an estimate under the labelled `GPUS` datasheet figures and `Assumptions`, NOT a measurement):
training 6N FLOPs per token (8N with checkpointing) and a no-grad forward 2N, at train_mfu of the
bf16 peak; one decode step of b sequences max(2N / bandwidth, 2N b / peak) / decode_efficiency; the
built-in engines decode fixed batches until the longest sample stops (max_new_tokens steps), vLLM
batches continuously (mean response length); plus a fixed overhead per RL iteration and the
periodic greedy evaluation.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = 1024 ** 3
FRAGMENTATION = 0.10  # assumption: allocator slack and temporaries the formulas leave out
CUDA_CONTEXT_GIB = 1.5  # assumption: CUDA context, cuBLAS workspaces, NCCL buffers
VLLM_GPU_MEMORY_UTILIZATION = 0.3  # reftune/engines/vllm.py default (REFTUNE_VLLM_GPU_MEMORY_UTILIZATION)
VLLM_MAX_SEQS = 256  # vLLM's default max_num_seqs: sequences decoded at once
PROMPT_CAP = 300  # prompt tokens planned when data.max_prompt_tokens = 0: the release's max_input_length
TRANSIENT = ("activations", "logits", "scoring", "kv_cache")


class PlanError(ValueError):
    """A run that cannot work as configured on the given devices; the message says why and what to change."""


@dataclass(frozen=True)
class ModelSpec:
    """The shapes the plan needs of an architecture."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    gated_mlp: bool = True  # gate/up/down (Llama, Qwen2), else fc1 -> activation -> fc2 (OPT/Galactica)
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False
    bias: bool = False  # biases on every linear layer and norm (OPT)
    positions: int = 0  # learned position embeddings (OPT: max_position_embeddings + 2); 0 with rotary
    published_params: float = 0.0  # the model card's count, a check on `params`
    source: str = ""

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of a layer, by its HF name (LoRA targets)."""
        h, q, kv, i = self.hidden, self.heads * (self.head_dim or self.hidden // self.heads), self.kv_dim, self.intermediate
        mlp = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)} if self.gated_mlp else {"fc1": (h, i), "fc2": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), ("o_proj" if self.gated_mlp else "out_proj"): (q, h), **mlp}

    @property
    def layer_params(self) -> int:
        shapes = self.module_shapes()
        biases = sum(o for _, o in shapes.values()) if self.bias else (
            sum(shapes[k][1] for k in ("q_proj", "k_proj", "v_proj")) if self.qkv_bias else 0)
        return sum(i * o for i, o in shapes.values()) + biases + 2 * self.hidden * (2 if self.bias else 1)

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2) + self.positions * self.hidden
        return self.layers * self.layer_params + embed + self.hidden * (2 if self.bias else 1)


# The recipes' architectures, from each model's config.json on the Hugging Face Hub (hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size / ffn_dim,
# vocab_size, tie_word_embeddings) and the parameter count its model card states.
KNOWN_MODELS = {m.name.lower(): m for m in (
    ModelSpec("codellama/CodeLlama-7b-hf", 4096, 32, 32, 32, 11008, 32016, False, published_params=6.74e9,
              source="codellama/CodeLlama-7b-hf config.json: the Llama-2-7B shape, vocab 32016; 6.74B"),
    ModelSpec("facebook/galactica-6.7b", 4096, 32, 32, 32, 16384, 50000, True, gated_mlp=False, positions=2050,
              published_params=6.7e9, source="facebook/galactica-6.7b config.json: OPT, ffn_dim 16384, learned "
              "positions 2048 + 2, lm_head tied to the embedding; the Galactica paper: no biases; 6.7B"),
    ModelSpec("facebook/galactica-125m", 768, 12, 12, 12, 3072, 50000, True, gated_mlp=False, positions=2050,
              published_params=125e6, source="facebook/galactica-125m config.json: OPT shape; 125M"),
    ModelSpec("Qwen/Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, qkv_bias=True, published_params=0.49e9,
              source="Qwen/Qwen2.5-0.5B config.json; model card: 0.49B"),
    ModelSpec("Qwen/Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, qkv_bias=True, published_params=1.54e9,
              source="Qwen/Qwen2.5-1.5B config.json; model card: 1.54B"),
    ModelSpec("Qwen/Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True, published_params=7.61e9,
              source="Qwen/Qwen2.5-7B config.json; model card: 7.61B"),
)}
for _base in ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B"):  # -Instruct: the same shapes
    KNOWN_MODELS[f"{_base}-Instruct".lower()] = replace(KNOWN_MODELS[_base.lower()], name=f"{_base}-Instruct")


def spec_from_config_json(path: str | Path) -> ModelSpec:
    """A ModelSpec from an HF `config.json` (Llama-like incl. Qwen2, or OPT/Galactica keys)."""
    path = Path(path)
    c = json.loads(path.read_text())
    if not all(c.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")):
        raise PlanError(f"{path}: not a decoder config the planner knows (it needs hidden_size, num_hidden_layers, "
                        f"num_attention_heads, vocab_size); pass model_spec= / --arch instead")
    h, L, heads, V = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["vocab_size"]
    if c.get("model_type") == "opt" or "ffn_dim" in c:
        return ModelSpec(str(path.parent), h, L, heads, heads, c["ffn_dim"], V, c.get("tie_word_embeddings", True),
                         gated_mlp=False, bias=c.get("enable_bias", True),
                         positions=c.get("max_position_embeddings", 2048) + 2, source=str(path))
    return ModelSpec(str(path.parent), h, L, heads, c.get("num_key_value_heads") or heads, c["intermediate_size"], V,
                     c.get("tie_word_embeddings", False), head_dim=c.get("head_dim") or 0,
                     qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias")), source=str(path))


def resolve_model_spec(model: str, model_spec: ModelSpec | str | None = None) -> ModelSpec:
    """`model_spec` (a ModelSpec or a known id), else the local folder's config.json, else the table."""
    if isinstance(model_spec, ModelSpec):
        return model_spec
    if not model_spec and (Path(model) / "config.json").is_file():
        return spec_from_config_json(Path(model) / "config.json")
    name = model_spec or model
    if name.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[name.lower()]
    raise PlanError(f"no architecture for model {name!r}: not a local folder with a config.json and not a known id "
                    f"({', '.join(sorted({m.name for m in KNOWN_MODELS.values()}))}); pass model_spec= (or --arch) "
                    f"naming its base architecture")


@dataclass(frozen=True)
class Strategy:
    shards_params: bool
    shards_grads: bool
    shards_optimizer: bool
    reftune_parallel: str | None  # the `parallel` value under which reftune does this (None: no such mode)


STRATEGIES = {"ddp": Strategy(False, False, False, "ddp"), "fsdp2": Strategy(True, True, True, "fsdp2"),
              "zero2": Strategy(False, True, True, None), "zero3": Strategy(True, True, True, None)}


def strategy_from_accelerate(config: dict) -> str:
    """The strategy an accelerate launcher config (the parsed YAML) describes."""
    kind = config.get("distributed_type")
    if kind == "MULTI_GPU":
        return "ddp"
    if kind == "FSDP":
        version = int((config.get("fsdp_config") or {}).get("fsdp_version", 1))
        if version != 2:
            raise PlanError(f"fsdp_version {version}: reftune shards with FSDP2 (fsdp_version: 2)")
        return "fsdp2"
    if kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 2))
        if stage not in (2, 3):
            raise PlanError(f"DeepSpeed ZeRO stage {stage}: the planner knows stages 2 and 3")
        return f"zero{stage}"
    raise PlanError(f"distributed_type {kind!r}: expected MULTI_GPU, FSDP or DEEPSPEED")


# --- assumptions of the time estimate (NOT measurements) -------------------------------------------

@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense bf16 tensor-core peak, vendor datasheet
    bandwidth_gbs: float  # memory bandwidth, vendor datasheet


GPUS = {g.name: g for g in (GPU("A100-80GB", 80, 312, 2039), GPU("H100-80GB", 80, 989, 3350),
                            GPU("H200", 141, 989, 4800), GPU("L4", 24, 121, 300))}


@dataclass(frozen=True)
class Assumptions:
    """The time estimate's assumptions; replace them with measurements when you have them."""

    train_mfu: float = 0.35  # achieved fraction of the bf16 peak in training and scoring passes
    decode_efficiency: dict = field(default_factory=lambda: {"cached": 0.15, "hf": 0.15, "vllm": 0.6})
    """Fraction of the decode roofline one step reaches, per engine."""
    mean_prompt_tokens: int = 150
    mean_response_tokens: int = 200  # sampled or gold CoT on GSM8K-like data (capped by max_new_tokens)
    iteration_overhead_s: float = 1.0  # per RL iteration: grading, engine weight sync, Python, logging
    offline_kept_per_question: float = 4.0  # Offline-ST: distinct correct samples kept (<= max_per_question)
    rm_distinct_per_question: float = 30.0  # reward model: distinct completions out of rm_k samples


# Questions per split, for epochs -> steps and the sampling work. Train: ../shared/data/README.md
# (GSM8K, SVAMP) or the release's step counts x 48 (gsm8k_reft P-CoT 154/epoch, mathqa 318 and 310,
# mathqa-numeric 187); test: ../shared/data/README.md.
TRAIN_SIZES = {"gsm8k": 7473, ("gsm8k_reft", "program"): 7392, ("gsm8k_reft", "nl"): 7473,
               ("svamp", "program"): 3043, ("svamp", "nl"): 3076, ("mathqa", "program"): 15264,
               ("mathqa", "nl"): 14880, "mathqa_numeric": 8976}
TEST_SIZES = {"gsm8k": 1319, "gsm8k_reft": 1319, "svamp": 1000, "mathqa": 1605, "mathqa_numeric": 1605}


def train_size(data) -> int:
    """Training questions after the validation split (0: unknown)."""
    if data.name == "arithmetic":
        n = data.n_train
    else:
        n = TRAIN_SIZES.get((data.name, data.style), TRAIN_SIZES.get(data.name, 0))
    n = min(n, data.max_train) if data.max_train else n
    return max(n - data.validation_size, 0)


# --- the plan ----------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    kind: str
    model: str
    world_size: int
    strategy: str
    per_device: dict  # rows per device: rollout_rows, mini_batch (ReFT, Online-ST), micro_batch (SFT; ReFT with accumulation), gen_batch
    grad_accum: int
    global_batch: int  # sequences per optimizer step, all devices together
    optimizer_steps: int  # per iteration (ReFT, Online-ST) or per epoch (SFT)
    tokens_per_optimizer_step: int  # global_batch x seq_len (prompt cap + max_new_tokens, or max_length)
    seq_len: int
    trainable_params: int
    params: int
    memory_gib: dict
    total_gib: float
    gpu_memory_gib: float | None
    peak_phase: str = "train"  # the transient phase that sets the peak: train, scoring or generation
    hours: float | None = None
    gpu_hours: float | None = None
    time_breakdown: dict = field(default_factory=dict)  # hours per part: generate, train, overhead, eval, sample
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.gpu_memory_gib is None or self.total_gib <= self.gpu_memory_gib

    def summary(self) -> str:
        per = "iteration" if self.kind in ("reft", "online_st") else "epoch"
        parts = lambda transient: ", ".join(f"{k} {v:.2f}" for k, v in self.memory_gib.items()  # noqa: E731
                                            if v and (k in TRANSIENT) == transient)
        lines = [f"{self.kind}: {self.model} on {self.world_size} device(s), {self.strategy}",
                 f"  per device {self.per_device}; grad_accum {self.grad_accum}; global batch {self.global_batch}; "
                 f"{self.optimizer_steps} optimizer steps per {per}; {self.tokens_per_optimizer_step:,} tokens per "
                 f"optimizer step (sequence {self.seq_len})",
                 f"  params {self.params / 1e9:.2f}B, trainable {self.trainable_params / 1e6:.1f}M",
                 f"  static GiB: {parts(False)}", f"  transient GiB by phase: {parts(True)}",
                 f"  total {self.total_gib:.1f} GiB per device (peak: {self.peak_phase})"
                 + (f" of {self.gpu_memory_gib:g}" if self.gpu_memory_gib else "")]
        if self.hours is not None:
            lines.append(f"  time, estimated under reftune.plan's assumptions: {self.hours:,.1f} h wall, "
                         f"{self.gpu_hours:,.0f} GPU-hours (" + ", ".join(f"{k} {v:,.1f} h" for k, v in self.time_breakdown.items()) + ")")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _kind(cfg) -> str:
    """Which trainer a config is for, by its fields (the trainers need not be imported)."""
    for attr, kind in (("ppo_epochs", "reft"), ("update_epochs", "online_st"), ("base_model", "offline_st"),
                       ("rm", "compare"), ("balance_classes", "reward_model"), ("grad_accum", "sft")):
        if hasattr(cfg, attr):
            return kind
    raise PlanError(f"{type(cfg).__name__}: not a training config the planner knows")


QUANTIZED_BYTES = {"nf4": 0.5 + 0.016, "fp4": 0.5 + 0.016, "int8": 1.0}
"""Bytes per quantized weight: 4 bits plus double-quantized absmax (8 bits per 64, fp32 per 256 of
those: 0.127 bits), or 8 bits (the fp32 per-row scales are negligible)."""


def _quantized_weights(spec: ModelSpec, quantize: str) -> float:
    """A QLoRA base in bytes: decoder linear weights quantized, everything else fp32."""
    linear = spec.layers * sum(i * o for i, o in spec.module_shapes().values())
    return linear * QUANTIZED_BYTES[quantize] + (spec.params - linear) * 4


def _activations(spec: ModelSpec, b: int, s: int, a: int, checkpointing: bool) -> int:
    layer = b * s * (6 * spec.hidden + 2 * spec.kv_dim + (4 if spec.gated_mlp else 2) * spec.intermediate) * a
    return b * s * spec.hidden * a * spec.layers + layer if checkpointing else spec.layers * layer


def _logits(spec: ModelSpec, b: int, s: int, r: int, a: int, chunk: int, mode: str) -> int:
    if chunk:
        s, r = min(chunk, s), min(chunk, r)
    return b * spec.vocab * {"train": 2 * s * a + 16 * r, "score": s * a + 8 * r, "ce": s * (2 * a + 12)}[mode]


def plan_run(cfg, world_size: int, gpu_memory_gib: float | None = None, model_spec: ModelSpec | str | None = None,
             *, strategy: str | None = None, gpu: str | None = None, assumptions: Assumptions = Assumptions()) -> RunPlan:
    """The plan of `cfg` (SFT, ReFT, Online-ST, Offline-ST, compare's reward model) on `world_size`
    devices of `gpu_memory_gib` each (see the module doc for the formulas). strategy: ddp | fsdp2 |
    zero2 | zero3 (default cfg.parallel); gpu: a `GPUS` name for the time estimate (default: the
    one with that memory). Raises PlanError when batches do not split over the devices or the
    estimate exceeds gpu_memory_gib."""
    if world_size < 1:
        raise PlanError(f"world_size must be at least 1, got {world_size}")
    kind = _kind(cfg)
    gpu = gpu or {80: "A100-80GB", 141: "H200", 24: "L4"}.get(int(gpu_memory_gib or 0))
    if kind in ("offline_st", "compare"):
        return _plan_composite(cfg, kind, world_size, gpu_memory_gib, model_spec, strategy, gpu, assumptions)
    spec = resolve_model_spec(cfg.model, model_spec)
    strategy = strategy or getattr(cfg, "parallel", "ddp")
    if strategy not in STRATEGIES:
        raise PlanError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    W, notes = world_size, []
    num = _numerics(cfg, spec)
    prompt = (getattr(cfg.data, "max_prompt_tokens", 0) if hasattr(cfg, "data") else 0) or PROMPT_CAP
    batches = _online_batches if kind in ("reft", "online_st") else _supervised_batches
    b = batches(cfg, kind, W, prompt, notes, assumptions)
    mem, phases = _memory(cfg, kind, spec, strategy, W, num, b, gpu_memory_gib)
    peak = max(phases, key=phases.get)
    static = sum(v for k, v in mem.items() if k not in TRANSIENT)
    total = (static + phases[peak]) * (1 + FRAGMENTATION) / GIB + CUDA_CONTEXT_GIB
    if num.w == 2 and not num.lora_r and getattr(cfg, "lr", 1.0) < 1e-5:
        notes.append(f"bf16 weights with lr {cfg.lr:g}: most AdamW updates that small round away in bf16 "
                     f"(the release keeps fp32 master weights): consider dtype=float32 mixed_precision=bf16")
    plan = RunPlan(kind, spec.name, W, strategy, b.per_device, b.grad_accum, b.global_batch, b.optimizer_steps,
                   b.global_batch * b.S, b.S, num.trainable, spec.params, {k: v / GIB for k, v in mem.items()},
                   round(total, 2), gpu_memory_gib, peak, notes=notes)
    if gpu in GPUS:
        _train_time(plan, cfg, kind, spec, GPUS[gpu], num.engine, num.checkpointing, assumptions)
    if not plan.fits:
        top = sorted(((v, k) for k, v in plan.memory_gib.items()), reverse=True)[:3]
        raise PlanError(f"{kind} of {spec.name} needs about {plan.total_gib:.1f} GiB per device, more than "
                        f"{gpu_memory_gib:g} GiB (largest: {', '.join(f'{k} {v:.1f}' for v, k in top)}): shard "
                        f"(parallel=fsdp2) over more devices, or use LoRA, smaller batches, gradient checkpointing "
                        f"or logprob chunking")
    return plan


def _plan_composite(cfg, kind: str, world_size: int, gpu_memory_gib: float | None, model_spec, strategy: str | None,
                    gpu: str | None, assumptions: Assumptions) -> RunPlan:
    """Offline-ST and compare: the plan of their training part (the SFT from the base model, the
    reward model), plus the sampling before it."""
    inner = copy.copy(cfg.sft if kind == "offline_st" else cfg.rm)  # a copy keeps `pending` attributes
    if kind == "offline_st":
        inner.model, inner.data = cfg.base_model, cfg.data
    else:
        inner.model = cfg.rm.model or cfg.sft or cfg.warmup  # what compare initialises it from
    if kind == "compare" and world_size > 1:  # (`reftune reward-model` trains it on several)
        world_size = 1
    plan = plan_run(inner, world_size, gpu_memory_gib, model_spec, strategy=strategy, gpu=gpu, assumptions=assumptions)
    if kind == "compare" and plan.world_size == 1:
        plan.notes.append("compare runs in one process (its reward model too): planned on one device; "
                          "`reftune reward-model` trains the reward model on several")
    plan.kind = kind
    _sampling_time(plan, cfg, kind, resolve_model_spec(inner.model, model_spec), gpu, assumptions)
    return plan


@dataclass(frozen=True)
class _Numerics:
    """What a config's precision, LoRA and memory savers mean for the formulas."""

    w: int  # bytes per weight
    a: int  # bytes per activation
    lora_r: int
    quantize: str  # no | nf4 | fp4 | int8 (QLoRA's base)
    checkpointing: bool
    chunk: int  # logprob_chunk_size
    engine: str  # the engine whose memory is planned: cached (auto, static), hf or vllm
    trainable: int  # N_t
    g: int  # bytes per gradient and per optimizer value


def _numerics(cfg, spec: ModelSpec) -> _Numerics:
    w = 4 if getattr(cfg, "dtype", "auto") in ("float32", "fp32") else 2
    a = 2 if w == 2 or getattr(cfg, "mixed_precision", "no") in ("bf16", "auto") else 4
    lora_r = getattr(cfg, "lora_r", 0) or 0
    quantize = getattr(cfg, "lora_quantize", "no") if lora_r else "no"
    engine = getattr(cfg, "engine", "auto")
    engine = "cached" if engine in ("auto", "static") else engine  # (auto on a GPU; static's cache is cached's size)
    trainable, g = spec.params, w
    if lora_r:
        targets = list(getattr(cfg, "lora_target_modules", None) or ["q_proj", "v_proj"])  # PEFT's default
        unknown = sorted(set(targets) - set(spec.module_shapes()))
        if unknown:
            raise PlanError(f"lora_target_modules {unknown}: not linear modules of {spec.name} "
                            f"({', '.join(spec.module_shapes())})")
        trainable, g = spec.layers * sum(lora_r * sum(spec.module_shapes()[t]) for t in targets), 4
    return _Numerics(w, a, lora_r, quantize, bool(getattr(cfg, "gradient_checkpointing", False)),
                     getattr(cfg, "logprob_chunk_size", 0) or 0, engine, trainable, g)


@dataclass
class _Batches:
    """Rows and sequence lengths per device."""

    per_device: dict
    grad_accum: int
    global_batch: int
    optimizer_steps: int
    b_train: int  # rows of one training forward
    S: int  # tokens of a training sequence
    R: int  # response tokens of one
    S_gen: int  # tokens of a generated sequence
    gen_rows: int = 0  # sequences decoded at once
    score_rows: int = 0  # rows of ReFT's no-grad scoring pass


def _online_batches(cfg, kind: str, W: int, prompt: int, notes: list, A: Assumptions) -> _Batches:
    """ReFT and Online-ST: each device takes an equal share of the questions and of each mini-batch."""
    for key in ("questions_per_step", "mini_batch_size"):
        if getattr(cfg, key) % W:
            raise PlanError(f"{key}={getattr(cfg, key)} does not split over {W} devices; use a multiple of {W}")
    rows = cfg.questions_per_step * cfg.samples_per_prompt
    mb = cfg.mini_batch_size // W
    if rows % cfg.mini_batch_size:
        notes.append(f"{rows} rollout rows are not a multiple of mini_batch_size {cfg.mini_batch_size}: "
                     f"each epoch ends with a smaller mini-batch")
    S = S_gen = prompt + cfg.max_new_tokens
    if kind == "online_st":
        S = min(S, cfg.max_length)
    epochs = cfg.ppo_epochs if kind == "reft" else cfg.update_epochs
    micro = getattr(cfg, "micro_batch_size", 0) or mb  # ReFT's gradient accumulation
    if mb % micro:
        raise PlanError(f"micro_batch_size={micro} does not divide the {mb} rows per device of a mini-batch")
    b_train = micro if kind == "reft" else 2 * mb  # Online-ST: each update holds own samples AND gold CoTs
    gen_rows = min(cfg.gen_batch_size, rows // W)
    per_device = {"rollout_rows": rows // W, "mini_batch": mb, "gen_batch": gen_rows}
    if micro != mb:
        per_device["micro_batch"] = micro
    return _Batches(per_device, mb // micro, cfg.mini_batch_size, math.ceil(rows / cfg.mini_batch_size) * epochs,
                    b_train, S, cfg.max_new_tokens, S_gen, gen_rows, rows // W if kind == "reft" else 0)


def _supervised_batches(cfg, kind: str, W: int, prompt: int, notes: list, A: Assumptions) -> _Batches:
    """SFT and the reward model: each micro-batch of batch_size rows is split over the devices
    (loop.TrainingRun.share)."""
    grad_accum = getattr(cfg, "grad_accum", 1)  # the reward model: no accumulation
    b_train = math.ceil(cfg.batch_size / W)
    if cfg.batch_size % W:
        notes.append(f"batch_size={cfg.batch_size} does not split evenly over {W} devices: some ranks run "
                     f"fewer rows (or a zero-weight stand-in)")
    global_batch = cfg.batch_size * grad_accum
    b = _Batches({"micro_batch": b_train}, grad_accum, global_batch, math.ceil(_train_rows(cfg, kind, A) / global_batch),
                 b_train, cfg.max_length, cfg.max_length, prompt + getattr(cfg, "eval_max_new_tokens", 0))
    if kind == "sft" and cfg.eval_split != "none":
        b.gen_rows = b.per_device["gen_batch"] = cfg.gen_batch_size
    return b


def _memory(cfg, kind: str, spec: ModelSpec, strategy: str, W: int, num: _Numerics, b: _Batches,
            gpu_memory_gib: float | None) -> tuple[dict, dict]:
    """(bytes per device of each part, transient bytes of each phase): see the module doc."""
    st = STRATEGIES[strategy if W > 1 else "ddp"]
    N, N_t, w, g = spec.params, num.trainable, num.w, num.g
    mem = {
        "weights": (N * w / (W if st.shards_params else 1) if num.quantize == "no"
                    else _quantized_weights(spec, num.quantize)) + (4 * N_t if num.lora_r else 0),
        "grads": N_t * g / (W if st.shards_grads else 1),
        "optimizer": 2 * N_t * g / (W if st.shards_optimizer else 1),
        "ddp_buckets": N_t * g if strategy == "ddp" and W > 1 else 0,
        "value_head": 4 * (spec.hidden + 1) * w if kind == "reft" and getattr(cfg, "advantage", "gae") == "gae" else 0,
        "reference": N * w if kind == "reft" and not num.lora_r else 0,
        "replica": N * w if strategy == "fsdp2" and W > 1 and kind != "reward_model" else 0,  # (no rollouts)
        "gathered": 2 * spec.layer_params * w if st.shards_params and W > 1 else 0,
        "engine": 0,
    }
    kv = b.gen_rows * b.S_gen * spec.layers * 2 * spec.kv_dim * w
    if num.engine == "vllm":
        own = 2 * N + kv  # vLLM's own bf16 copy and its KV cache live in its share of the GPU
        mem["engine"] = VLLM_GPU_MEMORY_UTILIZATION * gpu_memory_gib * GIB if gpu_memory_gib else own
        if mem["engine"] < own:
            raise PlanError(f"vLLM's share ({VLLM_GPU_MEMORY_UTILIZATION:g} x {gpu_memory_gib:g} GiB) cannot hold its "
                            f"weights and KV cache ({own / GIB:.1f} GiB): raise REFTUNE_VLLM_GPU_MEMORY_UTILIZATION")
        kv = 0
    a, S, R = num.a, b.S, b.R
    mem["activations"] = _activations(spec, b.b_train, S, a, num.checkpointing)
    mem["logits"] = {"reft": _logits(spec, b.b_train, S, R, a, num.chunk, "train"), "reward_model": 0}.get(
        kind, _logits(spec, b.b_train, S, R, a, 0, "ce"))  # a sequence classifier has no (b, S, V) logits
    # (the cross-entropy updates, SFT's and Online-ST's, never chunk: only log-prob passes do)
    mem["scoring"] = (_logits(spec, b.score_rows, S, R, a, num.chunk, "score")
                      + _activations(spec, b.score_rows, S, a, False) // spec.layers)
    mem["kv_cache"] = kv
    return mem, {"train": mem["activations"] + mem["logits"], "scoring": mem["scoring"], "generation": kv}


def _decode_s(spec: ModelSpec, gpu: GPU, rows: int, batch: int, engine: str, max_new: int, A: Assumptions) -> float:
    """Seconds to sample `rows` CoTs on one device (see the module doc)."""
    def step(b: int) -> float:
        roofline = max(2 * spec.params / (gpu.bandwidth_gbs * 1e9), 2 * spec.params * b / (gpu.bf16_tflops * 1e12))
        return roofline / A.decode_efficiency.get(engine, 0.15)

    if rows <= 0:
        return 0.0
    if engine == "vllm":
        b = min(rows, VLLM_MAX_SEQS)
        return rows * min(A.mean_response_tokens, max_new) / b * step(b)
    b = min(rows, batch)
    return math.ceil(rows / b) * max_new * step(b)


def _train_rows(cfg, kind: str, A: Assumptions) -> int:
    """Rows of one supervised epoch: the training questions (SFT), or for a reward model their
    distinct samples (an assumption per question, capped by max_examples); 0 when unknown."""
    rows = train_size(cfg.data) if hasattr(cfg, "data") else 0
    if kind == "reward_model":
        rows = round(rows * A.rm_distinct_per_question)
        rows = min(rows, cfg.max_examples) if cfg.max_examples else rows
    return rows


def _train_time(plan: RunPlan, cfg, kind: str, spec: ModelSpec, gpu: GPU, engine: str, checkpointing: bool,
                A: Assumptions) -> None:
    W, N = plan.world_size, spec.params
    flops_s = gpu.bf16_tflops * 1e12 * A.train_mfu * W
    mult = 8 if checkpointing else 6
    val = math.ceil(cfg.data.validation_size / W) if hasattr(cfg, "data") else 0
    if kind in ("reft", "online_st"):
        resp = min(A.mean_response_tokens, cfg.max_new_tokens)
        tokens = cfg.questions_per_step * cfg.samples_per_prompt * (A.mean_prompt_tokens + resp)
        epochs = cfg.ppo_epochs if kind == "reft" else cfg.update_epochs
        flops = (4 * N * tokens + epochs * mult * N * tokens) if kind == "reft" else epochs * mult * N * 2 * tokens
        n_evals = cfg.steps // cfg.eval_every + 1 if cfg.eval_every else 1
        plan.time_breakdown = {
            "generate": cfg.steps * _decode_s(spec, gpu, plan.per_device["rollout_rows"], cfg.gen_batch_size, engine,
                                              cfg.max_new_tokens, A) / 3600,
            "train": cfg.steps * flops / flops_s / 3600,
            "overhead": cfg.steps * A.iteration_overhead_s / 3600,
            "eval": n_evals * _decode_s(spec, gpu, val, cfg.gen_batch_size, engine, cfg.eval_max_new_tokens, A) / 3600}
    else:
        n = _train_rows(cfg, kind, A)
        if not n:
            return
        seq = min(A.mean_prompt_tokens + A.mean_response_tokens, cfg.max_length)
        plan.time_breakdown = {"train": cfg.epochs * n * seq * mult * N / flops_s / 3600}
        if kind == "sft" and cfg.eval_split != "none":
            plan.time_breakdown["eval"] = cfg.epochs * _decode_s(spec, gpu, val, cfg.gen_batch_size, cfg.engine,
                                                                 cfg.eval_max_new_tokens, A) / 3600
    plan.hours = sum(plan.time_breakdown.values())
    plan.gpu_hours = plan.hours * W


def _sampling_time(plan: RunPlan, cfg, kind: str, spec: ModelSpec, gpu: str | None, A: Assumptions) -> None:
    """Offline-ST: k samples per training question, then SFT on gold + kept samples. compare: k samples
    per test question for each method (+ rm_k per training question unless rm_samples is given), then
    the reward model on the distinct ones. Sampling runs in one process."""
    n_train = train_size(cfg.data)
    if gpu not in GPUS or not n_train:
        plan.notes.append("time: unknown GPU or training-set size")
        return
    if kind == "offline_st":  # (`samples` given: they were drawn before, by `reftune sample`, on one GPU)
        sample_h = _decode_s(spec, GPUS[gpu], n_train * cfg.k, cfg.gen_batch_size, cfg.engine, cfg.max_new_tokens, A) / 3600
        scale = 1 + min(A.offline_kept_per_question, cfg.max_per_question)  # gold + kept samples per question
        sft_h = {k: v * (scale if k == "train" else 1) for k, v in plan.time_breakdown.items()}
        plan.time_breakdown = {"sample (1 GPU)": sample_h, **sft_h}
        plan.hours = sample_h + sum(sft_h.values())
        plan.gpu_hours = sample_h + sum(sft_h.values()) * plan.world_size
        return
    methods = sum(bool(getattr(cfg, m)) for m in ("warmup", "sft", "offline_st", "online_st", "reft"))
    rows = TEST_SIZES.get(cfg.data.name, 0) * cfg.k * methods + (0 if cfg.rm_samples else n_train * cfg.rm_k)
    seq = min(A.mean_prompt_tokens + A.mean_response_tokens, cfg.rm.max_length)
    mult = 8 if getattr(cfg.rm, "gradient_checkpointing", False) else 6
    rm_flops = cfg.rm.epochs * n_train * A.rm_distinct_per_question * seq * mult * spec.params
    plan.time_breakdown = {
        "sample": _decode_s(spec, GPUS[gpu], rows, cfg.gen_batch_size, cfg.engine, cfg.max_new_tokens, A) / 3600,
        "reward model": rm_flops / (GPUS[gpu].bf16_tflops * 1e12 * A.train_mfu) / 3600}
    plan.hours = plan.gpu_hours = sum(plan.time_breakdown.values())  # one process, one GPU
