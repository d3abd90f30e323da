"""One-command GPU check: SFT steps and ReFT iterations of a Qwen2.5-0.5B-shaped model with every
built-in engine, full fine-tuning and LoRA, timed and set against the GPU's own bf16 matmul peak.

    python bench/gpu_check.py                  # one CUDA GPU: at most about 7 minutes (--budget-s 420)
    python bench/gpu_check.py --out DIR        # where gpu_check.json and gpu_check.md go (default runs/gpu_check)
    python bench/gpu_check.py --toy            # a tiny model in fp32 on the CPU, in seconds (the test suite runs it)

Needs torch, transformers (with tokenizers), peft, pyyaml and tqdm, nothing else: no network, no
model hub, no vLLM, no install of reftune (the repository root is put on sys.path). A missing
package is named before anything runs. docs/gpu.md says how to run it on a lent GPU and how to
read the table.

Model: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 query / 2 KV heads, MLP 4864, tied
embeddings, its 151,936-row vocabulary: 494 M parameters) with random weights, in bf16. The
tokenizer is a byte-level BPE trained here on the task's text (reftune.tiny.train_tokenizer, about
a thousand tokens), so the embedding has more rows than the tokenizer has tokens, as Qwen's own
does; ids past the tokenizer decode to nothing. An untrained model almost never samples EOS, so
every rollout runs to max_new_tokens and the rows are comparable.

Workload: the built-in arithmetic task with natural-language CoTs. SFT: `sft_steps` optimizer
steps of `sft_batch` sequences (one epoch of that many examples, no evaluation). ReFT: the
library's defaults (value head + GAE, 2 PPO epochs, 1 sample per question, mini-batches of 8) with
32 questions per iteration and 256 new tokens, starting from the random model; per engine of
reftune.engines.ENGINES (`vllm` only where it imports) and per mode (full; LoRA r=16 on peft's
default modules for Qwen2, q_proj and v_proj).

Measured per row, through the library's public API only (run_sft / run_reft, their metrics and
the loop's Callbacks):
- ReFT iteration split: `reft/seconds` and `reft/seconds_generate` from the run's metrics; where
  the update begins is the first tensor autograd saves in the iteration (a saved-tensors hook:
  the rollout and the old-policy / reference passes run without gradients, the PPO update with
  them), stamped after a device synchronize. passes = that instant - generate; update = the rest.
- SFT step time: the gaps between consecutive `train/loss` records (log_every=1); the first step
  (warm-up) has no gap before it, so it is left out by construction.
- Peak memory: torch.cuda.max_memory_allocated over the run (CPU: the process's peak RSS so far).
- FLOPs, on real tokens (padding out, attention's quadratic term out): a forward pass costs
  2 * params * tokens, a backward 2x that with full fine-tuning (weights' and activations'
  gradients) and 1x with LoRA (activations' only; the frozen base gets no weight gradient).
  Per iteration: generation 1 forward over prompt + response, old policy and reference 2 forwards,
  update ppo_epochs * (forward + backward). The fraction of peak divides FLOP/s by the throughput
  of an n x n x n matmul in the run's dtype timed at the start of the same run.
Medians over the iterations after the first (the first is warm-up: kernel selection, allocator).

Time: --budget-s counts from the script's start, imports and setup included. Each run gets a fair
share of what is left; a ReFT run stops after the iteration that spends its share (never before 2
iterations unless the whole budget is gone), and a run that no longer fits (the last run's cost
outside its iterations says what one costs) is reported as skipped. The overrun past the budget is
at most one iteration. Each run folder (checkpoints with optimizer state, GBs at this size) is
deleted once its row is written, and both files are rewritten after every row, so a check killed
from outside still leaves what it finished.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

START = time.perf_counter()  # the budget counts from here: imports and setup included
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What reftune's training path imports beyond the standard library: import name -> (pip name, why).
NEEDED = {
    "torch": ("torch", "everything"),
    "transformers": ("transformers", "the model"),
    "tokenizers": ("tokenizers", "the tokenizer trained here"),
    "peft": ("peft", "the LoRA rows"),
    "yaml": ("pyyaml", "the run folders' config.yaml"),
    "tqdm": ("tqdm", "the trainers' progress bars"),
}


def missing_packages() -> list[str]:
    """One line per package this check needs that is not importable here."""
    return [f"{pip} (import {name}; needed for {why})" for name, (pip, why) in NEEDED.items()
            if importlib.util.find_spec(name) is None]


if missing_packages():
    sys.exit("bench/gpu_check.py cannot run: missing Python package(s):\n  " + "\n  ".join(missing_packages())
             + "\nOn a machine without network, carry them as wheels (pip download on a machine with one, "
               "then pip install --no-index); docs/gpu.md shows the commands.")

import torch  # noqa: E402

from reftune.engines import ENGINES, resolve_engine  # noqa: E402
from reftune.engines.static import fallback_reason  # noqa: E402
from reftune.runs import read_jsonl  # noqa: E402
from reftune.tasks import DataConfig, load_task  # noqa: E402
from reftune.tiny import tokenizer_corpus, train_tokenizer  # noqa: E402
from reftune.trainers.loop import Callbacks  # noqa: E402
from reftune.trainers.reft import ReFTConfig, run_reft  # noqa: E402
from reftune.trainers.sft import SFTConfig, run_sft  # noqa: E402
from reftune.trainers.supervised import encode_sft_example  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MODES = ("full", "lora")


@dataclass(frozen=True)
class Size:
    """The model and the workload of one check."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    model_vocab: int
    """Rows of the (tied) embedding; Qwen2.5: 151,936."""
    tokenizer_vocab: int
    """Vocabulary the local byte-level BPE is trained to (at most; a small corpus gives fewer)."""
    max_positions: int
    n_train: int
    """Built-in task problems (the tokenizer's corpus; SFT examples and ReFT questions come from it)."""
    validation: int
    """Validation questions: ReFT's one greedy evaluation at the end of each run."""
    sft_steps: int
    sft_batch: int
    reft_steps: int
    """ReFT iterations per run, at most (the time budget may stop a run earlier)."""
    questions: int
    max_new_tokens: int
    gen_batch: int
    mini_batch: int
    eval_new_tokens: int
    lora_r: int
    matmul_n: int
    """Side of the square matmul timed for the peak."""
    device: str
    dtype: str
    budget_s: float
    """Default --budget-s."""


QWEN25_05B = Size(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, model_vocab=151936,
                  tokenizer_vocab=1024, max_positions=32768, n_train=2000, validation=8, sft_steps=8, sft_batch=32,
                  reft_steps=3, questions=32, max_new_tokens=256, gen_batch=64, mini_batch=8, eval_new_tokens=32,
                  lora_r=16, matmul_n=8192, device="cuda", dtype="bfloat16", budget_s=420)
TOY = Size(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, model_vocab=512, tokenizer_vocab=300,
           max_positions=512, n_train=64, validation=4, sft_steps=3, sft_batch=4, reft_steps=2, questions=4,
           max_new_tokens=8, gen_batch=4, mini_batch=2, eval_new_tokens=4, lora_r=4, matmul_n=256, device="cpu",
           dtype="float32", budget_s=600)


class OutOfTime(Exception):
    """Raised from the loop's step-end callback when a run has spent its share of the budget."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak tensor memory on the GPU since the last reset; on a CPU the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


def matmul_peak(size: Size, device: torch.device) -> dict:
    """Throughput of an n x n x n matmul in the run's dtype: the achievable peak the rows are set against."""
    n, dtype = size.matmul_n, DTYPES[size.dtype]
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    warm_until = time.perf_counter() + 0.5  # long enough for the GPU's clocks to rise from idle
    while time.perf_counter() < warm_until:
        for _ in range(3):
            a @ b
        sync(device)
    repeats = 50
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"n": n, "dtype": size.dtype, "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def build_model(folder: Path, task, size: Size, device: torch.device) -> dict:
    """A Qwen2 causal LM of `size` with random weights and a locally trained tokenizer, saved to `folder`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(tokenizer_corpus(task), size.tokenizer_vocab)
    config = Qwen2Config(
        vocab_size=size.model_vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with device:  # initialised where it runs: a 0.5 B init on a CPU takes longer than the rest of the setup
        model = Qwen2ForCausalLM(config)
    model.to(DTYPES[size.dtype])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())  # the tied embedding once: it is the LM head's matmul
    embedding = model.get_input_embeddings().weight.numel()
    static_fallback = fallback_reason(model)
    del model
    return {"architecture": "Qwen2ForCausalLM", "hidden": size.hidden, "layers": size.layers, "heads": size.heads,
            "kv_heads": size.kv_heads, "intermediate": size.intermediate, "tied_embeddings": True,
            "model_vocab": size.model_vocab, "tokenizer_vocab": len(tokenizer), "params": params,
            "non_embedding_params": params - embedding, "weights": "random (seed 0)", "dtype": size.dtype,
            "static_engine_fallback": static_fallback, "tokenizer": tokenizer}


@dataclass
class Context:
    """What every run of one check shares."""

    size: Size
    device: torch.device
    work: Path
    model_path: str
    data: DataConfig
    task: object
    tokenizer: object
    params: int
    peak_tflops: float
    prompt_tokens: float
    """Mean prompt length of the training questions, in tokens (ReFT's FLOPs count real tokens)."""


def common(ctx: Context, out_dir: Path, mode: str) -> dict:
    """Config keys SFT and ReFT share here."""
    return dict(model=ctx.model_path, data=ctx.data, out_dir=str(out_dir), seed=0, device=str(ctx.device),
                dtype=ctx.size.dtype, lora_r=ctx.size.lora_r if mode == "lora" else 0, tensorboard=False,
                progress=False)


def backward_factor(mode: str) -> int:
    """Backward FLOPs as a multiple of the forward's: weights' and activations' gradients (full), or
    the activations' only (LoRA: the frozen base gets no weight gradient; the adapters are negligible)."""
    return 2 if mode == "full" else 1


def sft_row(ctx: Context, mode: str, out_dir: Path) -> dict:
    """A few SFT steps; step time from the gaps between consecutive logged steps."""
    size = ctx.size
    examples = ctx.task.train[:size.sft_steps * size.sft_batch]
    cfg = SFTConfig(**common(ctx, out_dir, mode), epochs=1, batch_size=size.sft_batch,
                    lr=1e-5 if mode == "full" else 1e-4, warmup_ratio=0.0, eval_split="none", log_every=1)
    start = time.perf_counter()
    run_sft(cfg, task=ctx.task, train_examples=examples)
    wall = time.perf_counter() - start
    stamps = [r["time"] for r in read_jsonl(out_dir / "metrics.jsonl") if "train/loss" in r]
    gaps = [max(b - a, 1e-3) for a, b in zip(stamps, stamps[1:])]  # stamps are rounded to the millisecond
    if not gaps:
        raise RuntimeError(f"sft logged {len(stamps)} step(s); at least 2 are needed to time one")
    step_s = statistics.median(gaps)
    tokens = sum(len(encode_sft_example(ctx.tokenizer, ctx.task.prompt(ex), ctx.task.target(ex), cfg.max_length)[0])
                 for ex in examples) / size.sft_steps
    flops = 2 * ctx.params * tokens * (1 + backward_factor(mode))
    return {"iterations": len(stamps), "measured_iterations": len(gaps), "seconds_per_iteration": step_s,
            "seconds_update": step_s, "train_tokens_per_s": tokens / step_s, "tokens_per_iteration": tokens,
            "flops_per_iteration": flops, "mfu": flops / step_s / (ctx.peak_tflops * 1e12), "seconds_run": wall}


class IterationTimer:
    """The loop's Callbacks plus a saved-tensors hook: when each ReFT iteration begins, when its
    update begins (the first tensor autograd saves for a backward in the iteration), its metrics,
    and a stop once the run has spent its time."""

    def __init__(self, device: torch.device, steps: int, share_end: float, hard_end: float):
        self.device, self.steps, self.share_end, self.hard_end = device, steps, share_end, hard_end
        self.records: list[dict] = []
        self.began, self.update_began, self.armed = 0.0, None, False

    def callbacks(self) -> Callbacks:
        return Callbacks(on_step_begin=self.begin, on_step_end=self.end)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda saved: saved)

    def begin(self, step: int) -> None:
        sync(self.device)
        self.began, self.update_began, self.armed = time.perf_counter(), None, True

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.armed = False
            sync(self.device)  # the passes' kernels are done before the update is stamped
            self.update_began = time.perf_counter()
        return tensor

    def end(self, done: int, metrics: dict) -> None:
        before = None if self.update_began is None else self.update_began - self.began
        self.records.append({**metrics, "seconds_before_update": before})
        now = time.perf_counter()
        if done < self.steps and (now > self.hard_end or (done >= 2 and now > self.share_end)):
            raise OutOfTime(f"stopped after {done} of {self.steps} iterations: its share of the time budget was spent")


def split(record: dict) -> dict:
    """One iteration's seconds: total, generate, the no-grad passes, the update."""
    total, generate = record["reft/seconds"], record["reft/seconds_generate"]
    before = record["seconds_before_update"]
    if before is None:
        raise RuntimeError("no gradient was recorded in a ReFT iteration: its update could not be timed")
    return {"seconds_per_iteration": total, "seconds_generate": generate,
            "seconds_passes": max(before - generate, 0.0), "seconds_update": max(total - before, 0.0),
            "response_tokens": record["reft/response_length"]}


def reft_numbers(ctx: Context, mode: str, records: list[dict], ppo_epochs: int) -> dict:
    """Medians of the iterations after the first (all of them when there is only one), tokens/s, FLOPs."""
    splits = [split(r) for r in records]
    measured = splits[1:] or splits
    med = {k: statistics.median(s[k] for s in measured) for k in measured[0]}
    rows = ctx.size.questions
    tokens = rows * (ctx.prompt_tokens + med["response_tokens"])  # prompt + response of every rollout row
    forward = 2 * ctx.params * tokens
    flops = {"generate": forward, "passes": 2 * forward,
             "update": ppo_epochs * forward * (1 + backward_factor(mode))}
    peak = ctx.peak_tflops * 1e12
    out = {**med, "iterations": len(records), "measured_iterations": len(measured),
           "first_iteration_seconds": splits[0]["seconds_per_iteration"],
           "generation_tokens_per_s": rows * med["response_tokens"] / med["seconds_generate"],
           "flops_per_iteration": sum(flops.values()), "mfu": sum(flops.values()) / med["seconds_per_iteration"] / peak}
    for phase, f in flops.items():
        out[f"flops_{phase}"] = f
        out[f"mfu_{phase}"] = f / med[f"seconds_{phase}"] / peak if med[f"seconds_{phase}"] > 0 else None
    return out


def reft_row(ctx: Context, engine: str, mode: str, out_dir: Path, share_end: float, hard_end: float) -> dict:
    size = ctx.size
    cfg = ReFTConfig(**common(ctx, out_dir, mode), steps=size.reft_steps, questions_per_step=size.questions,
                     samples_per_prompt=1, mini_batch_size=size.mini_batch, max_new_tokens=size.max_new_tokens,
                     gen_batch_size=size.gen_batch, engine=engine, lr=1e-6 if mode == "full" else 1e-5,
                     eval_every=0, eval_split="validation", eval_max_new_tokens=size.eval_new_tokens, save_every=0)
    timer = IterationTimer(ctx.device, size.reft_steps, share_end, hard_end)
    note, start = "", time.perf_counter()
    try:
        with timer.hooks():
            run_reft(cfg, task=ctx.task, callbacks=timer.callbacks())
    except OutOfTime as stop:
        note = str(stop)
    wall = time.perf_counter() - start
    return {**reft_numbers(ctx, mode, timer.records, cfg.ppo_epochs), "seconds_run": wall,
            **({"note": note} if note else {})}


def run_row(ctx: Context, phase: str, engine: str, mode: str, share_end: float, hard_end: float) -> dict:
    """One row: the run's numbers and `status` ok, or the error it stopped with (printed in full)."""
    out_dir = ctx.work / f"{phase}-{engine}-{mode}"
    row = {"phase": phase, "engine": engine, "mode": mode}
    if phase == "reft":
        probe = torch.nn.Linear(1, 1, device=ctx.device)  # what `auto` resolves to depends on where the model lives
        row["resolved_engine"] = resolve_engine(engine, probe)
    reset_memory(ctx.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            numbers = sft_row(ctx, mode, out_dir) if phase == "sft" else \
                reft_row(ctx, engine, mode, out_dir, share_end, hard_end)
            row.update(numbers, peak_memory_gib=peak_memory_gib(ctx.device), status="ok")
            if ctx.device.type == "cuda":
                row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(ctx.device) / 2**30
        except Exception as e:  # one broken engine or mode must not hide the others' numbers
            traceback.print_exc()
            row["status"] = f"error: {type(e).__name__}: {str(e)[:400]}"
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
            reset_memory(ctx.device)
    # An engine that fell back (e.g. `graphed` without its CUDA graphs) says so in its row.
    engine_warnings = sorted({str(w.message) for w in caught if str(w.message).startswith("engine=")})
    for w in caught:
        if str(w.message) not in engine_warnings:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if engine_warnings:
        row["warnings"] = engine_warnings
        row["note"] = "; ".join(filter(None, [row.get("note"), *(m[:200] for m in engine_warnings)]))
    return row


def plan(engines: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    """(phase, engine, mode) of every row, in running order: SFT, then each engine (auto last: it
    repeats one of the others)."""
    ordered = [e for e in engines if e != "auto"] + [e for e in engines if e == "auto"]
    return [("sft", "-", m) for m in modes] + [("reft", e, m) for e in ordered for m in modes]


def run_all(ctx: Context, jobs: list[tuple[str, str, str]], deadline: float, rows: list[dict],
            after_row: Callable[[], None]) -> None:
    """Run `jobs` into `rows` (calling `after_row` after each) until `deadline` (a perf_counter time)."""
    overhead = 0.0  # the last run's seconds outside its iterations: what a run costs at the least
    for i, (phase, engine, mode) in enumerate(jobs):
        now = time.perf_counter()
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            rows.append({"phase": phase, "engine": engine, "mode": mode,
                         "status": "skipped: vllm is not importable here (it needs pip install 'reftune[vllm]')"})
            after_row()
            continue
        if now + overhead > deadline:
            rows.append({"phase": phase, "engine": engine, "mode": mode,
                         "status": f"skipped: the time budget was spent ({max(deadline - now, 0.0):.0f} s left, "
                                   f"the last run took {overhead:.0f} s outside its iterations)"})
            after_row()
            continue
        share_end = now + (deadline - now) / (len(jobs) - i)
        print(f"[gpu_check] {phase} engine={engine} mode={mode} ...", file=sys.stderr, flush=True)
        row = run_row(ctx, phase, engine, mode, share_end, deadline)
        if row["status"] == "ok":
            iterations = row["seconds_per_iteration"] * max(row["iterations"] - 1, 0) + \
                row.get("first_iteration_seconds", row["seconds_per_iteration"])
            overhead = max(row["seconds_run"] - iterations, 0.0)
        rows.append(row)
        after_row()
        print(f"[gpu_check]   {row['status']}" + (f", {row['seconds_per_iteration']:.3f} s/iteration"
                                                   if row["status"] == "ok" else ""), file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                   multiprocessors=props.multi_processor_count)
    else:
        env.update(cpu=platform.processor() or platform.machine())
    return env


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


COLUMNS = [("phase", "phase"), ("engine", "engine"), ("mode", "mode"), ("iterations", "iters"),
           ("seconds_per_iteration", "s/iter"), ("seconds_generate", "generate s"), ("seconds_passes", "passes s"),
           ("seconds_update", "update s"), ("tokens_per_s", "tokens/s"), ("peak_memory_gib", "peak GiB"),
           ("mfu", "% of peak"), ("mfu_generate", "% gen"), ("mfu_passes", "% passes"), ("mfu_update", "% update"),
           ("status", "status")]


def markdown(report: dict) -> str:
    env, model, work, peak = report["environment"], report["model"], report["workload"], report["matmul_peak"]
    where = env.get("gpu") or env.get("cpu") or env["device"]
    lines = [
        f"# reftune GPU check: {where}", "",
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; {report['seconds_total']:.0f} s in all.",
        f"Model: {model['architecture']}, {model['params']:,} parameters ({model['non_embedding_params']:,} "
        f"outside the embedding): hidden {model['hidden']}, {model['layers']} layers, {model['heads']} heads / "
        f"{model['kv_heads']} KV heads, MLP {model['intermediate']}, tied embeddings of {model['model_vocab']:,} rows; "
        f"{model['weights']}, {model['dtype']}. Tokenizer: byte-level BPE of {model['tokenizer_vocab']} tokens trained "
        f"here on the task's text (smaller than the embedding; ids past it decode to nothing).",
        *([f"The static engine falls back to the cached loop on this model: {model['static_engine_fallback']}."]
          if model["static_engine_fallback"] else []),
        f"Peak: {peak['n']}x{peak['n']}x{peak['n']} {peak['dtype']} matmul at {peak['tflops']:.1f} TFLOP/s, measured in this run.",
        f"SFT step: {work['sft_batch']} sequences. ReFT iteration: {work['questions']} questions x 1 sample, "
        f"{work['max_new_tokens']} new tokens, mini-batch {work['mini_batch']}, {work['ppo_epochs']} PPO epochs; "
        f"medians over the iterations after the first.", "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            if key == "engine" and row.get("resolved_engine") not in (None, row["engine"]):
                value = f"{row['engine']} ({row['resolved_engine']})"
            elif key == "tokens_per_s":
                value = row.get("generation_tokens_per_s", row.get("train_tokens_per_s"))
            elif key.startswith("mfu") and value is not None:
                value = 100 * value
            cells.append(fmt(value) if key != "status" else str(value) + (f" ({row['note']})" if row.get("note") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "tokens/s: generated tokens per second of generation (ReFT), trained tokens per second (SFT). "
              "passes: the old-policy and reference forward passes; update: the PPO epochs (SFT: the whole step). "
              "% of peak: model FLOPs per second as a percentage of the matmul peak above (forward 2 x params x "
              "tokens, backward 2x that, 1x with LoRA; for the iteration and each of its phases). Peak GiB: "
              + ("torch.cuda.max_memory_allocated over the run." if env["device"].startswith("cuda")
                 else "the process's peak RSS so far (CPU).")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="a tiny Qwen2 in fp32 on the CPU (seconds): keeps this script tested")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for the whole check, imports and setup included (default {QWEN25_05B.budget_s:.0f}; --toy {TOY.budget_s:.0f})")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines (default: every registered one)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: full, lora")
    p.add_argument("--reft-steps", type=int, default=None,
                   help=f"ReFT iterations per run, at most (default {QWEN25_05B.reft_steps}; --toy {TOY.reft_steps})")
    p.add_argument("--work-dir", default="", help="where models and run folders go (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [e for e in args.engines if e not in ENGINES] + [m for m in args.modes if m not in MODES]
    if args.reft_steps is not None and args.reft_steps < 1:
        p.error(f"--reft-steps must be at least 1, got {args.reft_steps}")
    if bad:
        p.error(f"unknown engine or mode: {', '.join(bad)} (engines: {', '.join(ENGINES)}; modes: {', '.join(MODES)})")
    return args


def setup(size: Size, work: Path) -> tuple[Context, dict, dict]:
    device = torch.device(size.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py: no CUDA GPU is visible to torch here (torch.cuda.is_available() is False); "
                 "run it with --toy for the CPU-sized check")
    data = DataConfig(style="nl", n_train=size.n_train, n_test=size.validation, validation_size=size.validation)
    task = load_task(data)
    peak = matmul_peak(size, device)
    model = build_model(work / "model", task, size, device)
    tokenizer = model.pop("tokenizer")
    prompt_tokens = statistics.mean(len(tokenizer(task.prompt(ex), add_special_tokens=False)["input_ids"])
                                    for ex in task.train)
    ctx = Context(size, device, work, str(work / "model"), data, task, tokenizer, model["params"], peak["tflops"],
                  prompt_tokens)
    return ctx, model, peak


def write_report(report: dict, out: Path) -> None:
    """gpu_check.json and gpu_check.md, rewritten after every row: a check stopped from outside
    still leaves the rows it finished."""
    report["seconds_total"] = time.perf_counter() - START
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv=None) -> int:
    args = parse_args(argv)
    size = TOY if args.toy else QWEN25_05B
    if args.reft_steps is not None:
        size = replace(size, reft_steps=args.reft_steps)
    budget = args.budget_s if args.budget_s is not None else size.budget_s
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    try:
        ctx, model, peak = setup(size, work)
        print(f"[gpu_check] {model['params'] / 1e6:.1f} M parameters; {peak['dtype']} matmul peak "
              f"{peak['tflops']:.2f} TFLOP/s", file=sys.stderr, flush=True)
        workload = {k: v for k, v in asdict(size).items() if k != "budget_s"}
        report = {"environment": environment(ctx.device), "model": model, "matmul_peak": peak,
                  "workload": {**workload, "ppo_epochs": ReFTConfig.ppo_epochs, "samples_per_prompt": 1,
                               "task": "arithmetic (built-in), nl CoTs", "prompt_tokens_mean": ctx.prompt_tokens},
                  "budget_s": budget, "rows": []}
        run_all(ctx, plan(args.engines, args.modes), START + budget, report["rows"],
                lambda: write_report(report, out))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    write_report(report, out)
    print(markdown(report))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
    return 1 if any(r["status"].startswith("error") for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
