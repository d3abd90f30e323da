"""Peak memory and time of ReFT steps with each memory saver on its own, against a baseline
measured in the same run: gradient checkpointing, chunked log-probs, LoRA, QLoRA (the same
adapters on an nf4 base), bf16 autocast (and checkpointing + chunking together, since the two
shrink different transients).

    .venv/bin/python bench/bench_memory.py [--sizes 23m] [--vocab 32000] [--steps 4] [--chunk 16] [--savers LoRA]

Every configuration runs `run_reft` in a fresh process (peak RSS is per process) on an untrained
Llama whose vocabulary is padded with unused tokens up to --vocab: real vocabularies are 32k-152k,
and the (batch, tokens, vocab) logits are what chunking saves. Default: 384 wide, 6 layers, 23 M
parameters (12 M of them the 32k embedding, tied to the head); 8 questions with one sample each
(the paper's setting), prompt + up to 48 new tokens per row, all in one PPO mini-batch. One sample
per question keeps the shared-prompt forward (several samples of a question run their prompt
once; checkpointing and chunking turn it off) out of the comparison.

Memory, in the steady state (steps 2 to N-1: the AdamW state exists, the last step's final
checkpoint stays out): the peak RSS, and the step transient = that peak minus the RSS when step
2 begins (weights, frozen reference, gradients, AdamW state: what LoRA shrinks; the transient is
what checkpointing and chunking shrink), both above the process's RSS once torch, transformers
and peft are imported. Large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so freed tensors
leave the RSS. Time: CPU seconds (one thread, like the tests) of the whole step and of its
scoring + PPO part (the step minus generation), medians over the same steps; CPU time rather than
wall time because on a shared machine wall times of the same step vary by 50%.

bf16 autocast runs only where the CPU has native bf16 (`cpu_has_native_bf16`); emulated bf16 is
many times slower than fp32 and measures nothing useful.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # TinyModelConfig overrides
    "tiny": {},
    "23m": dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6),
    "50m": dict(hidden_size=640, intermediate_size=1728, num_layers=10, num_heads=10),
}
REFERENCE_ROUNDS = 7  # of the three reference forwards, interleaved; the first warms up
LORA = dict(lora_r=8, lora_alpha=16.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def savers(chunk: int) -> dict[str, dict]:
    """ReFTConfig overrides of each configuration, the baseline first."""
    return {"baseline": {}, "gradient checkpointing": {"gradient_checkpointing": True},
            f"logprob_chunk_size={chunk}": {"logprob_chunk_size": chunk}, "LoRA r=8 (attention)": LORA,
            "QLoRA nf4, r=8 (attention)": {**LORA, "lora_quantize": "nf4"},
            "bf16 autocast": {"mixed_precision": "bf16"},
            "checkpointing + chunking": {"gradient_checkpointing": True, "logprob_chunk_size": chunk}}


def build(model_dir: Path, size: str, vocab: int, task) -> None:
    """The tiny-model builder's Llama, its tokenizer padded with unused tokens to `vocab`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus

    build_tiny_model(model_dir, tokenizer_corpus(task), TinyModelConfig(**SIZES[size]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(vocab - len(tokenizer))])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def rss_mib(field: str) -> float:
    """VmRSS, or VmHWM (its peak), of this process from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Make the peak RSS the current RSS (Linux: `5` in clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(size: str, saver: str, args, workdir: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from reftune.tasks import DataConfig, load_task

    data = DataConfig(n_train=64, n_test=16, validation_size=8, max_steps=3)
    task = load_task(data)
    model_dir = Path(workdir) / f"model-{size}"
    if saver == "build":
        build(model_dir, size, args.vocab, task)
        return {"built": str(model_dir)}
    import peft  # noqa: F401  (imported for every saver, so the baseline below holds the same libraries)
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
    if saver == "reference":
        return {"size": size, "saver": saver, "params": n_params, **measure_reference(model_dir, data, task, saver, args, workdir)}
    weights = weight_mib(model_dir, savers(args.chunk)[saver])
    return {"size": size, "saver": saver, "params": n_params, "weights_mib": weights,
            **measure_reft(model_dir, data, task, saver, args, workdir)}


def weight_mib(model_dir: Path, overrides: dict) -> float:
    """MiB of the tensors the policy and its frozen reference hold, loaded as ReFT loads them
    (LoRA: the reference is the same model; QLoRA: packed base weights). Counted from the tensors
    themselves: on CPU the RSS also holds the safetensors file's pages, mapped copy-on-write, so it
    does not show what quantization saves (on a GPU the weights are device memory)."""
    import torch

    from reftune.models import load_causal_lm
    from reftune.trainers.lora import apply_lora
    from reftune.trainers.reft import ReFTConfig

    cfg = ReFTConfig(**overrides)
    model = load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32, quantize=cfg.lora_quantize)
    if cfg.lora_r:
        model = apply_lora(model, cfg)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    reference = 0 if cfg.lora_r else sum(storages.values())  # a second, frozen copy
    return (sum(storages.values()) + reference) / 2**20


def measure_reft(model_dir: Path, data, task, saver: str, args, workdir: str) -> dict:
    """Steady-state peak, step transient and CPU seconds of `run_reft` with `saver`'s overrides."""
    from reftune.trainers import reft
    from reftune.trainers.loop import Callbacks

    cfg = reft.ReFTConfig(model=str(model_dir), data=data, out_dir=str(Path(workdir) / re.sub(r"\W+", "-", f"{model_dir.name} {saver}")),
                          steps=args.steps, questions_per_step=args.questions, samples_per_prompt=1,
                          mini_batch_size=args.questions, ppo_epochs=1, lr=1e-4, max_new_tokens=args.new_tokens,
                          eval_every=0, eval_max_new_tokens=8, save_every=0, device="cpu", progress=False,
                          tensorboard=False, **savers(args.chunk)[saver])
    baseline = rss_mib("VmRSS")
    seen: dict = {"cpu": [], "gen_cpu": [], "wall": []}
    generate = reft.sample_and_score

    def timed_generate(*a, **kw):  # its CPU time, to tell generation from scoring + PPO
        t0 = time.process_time()
        out = generate(*a, **kw)
        seen["gen_cpu"].append(time.process_time() - t0)
        return out

    def on_step_begin(step: int) -> None:
        if step == 1:  # the AdamW state exists from the first update on: this is the steady state
            seen["static"] = rss_mib("VmRSS") - baseline
            reset_peak_rss()
        if step == args.steps - 1:  # before the last step, whose end writes the final checkpoint
            seen["peak"] = rss_mib("VmHWM") - baseline
        seen["t0"] = time.process_time()

    def on_step_end(_done: int, metrics: dict) -> None:
        seen["cpu"].append(time.process_time() - seen["t0"])
        seen["wall"].append(metrics["reft/seconds"])

    reft.sample_and_score = timed_generate
    reft.run_reft(cfg, task=task, callbacks=Callbacks(on_step_begin=on_step_begin, on_step_end=on_step_end))
    steps = slice(1, args.steps - 1)  # not the first (warm-up, lazy AdamW state) nor the last (checkpoint)
    train_cpu = [c - g for c, g in zip(seen["cpu"], seen["gen_cpu"])]
    return {"peak_mib": seen["peak"], "transient_mib": seen["peak"] - seen["static"],
            **{k: statistics.median(v[steps]) for k, v in
               {"cpu_s": seen["cpu"], "train_cpu_s": train_cpu, "wall_s": seen["wall"]}.items()}}


def measure_reference(model_dir: Path, data, task, saver: str, args, workdir: str) -> dict:
    """The frozen reference's log-prob forward over one rollout batch's shape (one row per question, a
    64-token prompt + new tokens): no_grad (before), inference mode (now), inference mode + chunks.
    Peak RSS above the RSS before each forward, median CPU seconds over interleaved rounds."""
    import torch

    from reftune.models import load_causal_lm
    from reftune.trainers.policy import frozen_forward, policy_forward

    ref = load_causal_lm(str(model_dir), torch.device("cpu"), torch.float32).eval().requires_grad_(False)
    rows, prompt = args.questions, 64
    input_ids = torch.randint(0, ref.config.vocab_size, (rows, prompt + args.new_tokens),
                              generator=torch.Generator().manual_seed(0))
    mask, response = torch.ones_like(input_ids), input_ids[:, prompt:]
    modes = {"no_grad": (False, 0), "inference_mode": (True, 0),
             f"inference_mode, chunk {args.chunk}": (True, args.chunk)}
    seen: dict = {m: {"mib": [], "cpu": []} for m in modes}
    for _ in range(REFERENCE_ROUNDS):
        for mode, (inference, chunk) in modes.items():
            before = rss_mib("VmRSS")
            reset_peak_rss()
            t0 = time.process_time()
            with torch.no_grad(), frozen_forward(inference):
                policy_forward(ref, None, input_ids, mask, response, prompt, 1.0, chunk)
            seen[mode]["cpu"].append(time.process_time() - t0)
            seen[mode]["mib"].append(rss_mib("VmHWM") - before)
    return {"forwards": {m: {k: statistics.median(v[1:]) for k, v in d.items()} for m, d in seen.items()},
            "tokens": list(input_ids.shape)}  # round 1 warms up


def run_child(args, size: str, saver: str, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", size, saver, workdir, "--vocab", str(args.vocab), "--steps",
           str(args.steps), "--chunk", str(args.chunk), "--questions", str(args.questions), "--new-tokens",
           str(args.new_tokens)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{size} / {saver} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], args, skipped: list[str]) -> None:
    print(f"ReFT on CPU, 1 thread: {args.questions} questions x 1 sample, up to {args.new_tokens} new tokens, one "
          f"PPO mini-batch of all {args.questions} rows, vocabulary {args.vocab}; steps 2-{args.steps - 1} "
          f"of {args.steps} (peak, median CPU seconds)\n")
    print("| model | saver | policy + reference weights MiB | peak MiB | x baseline | step transient MiB | x baseline "
          "| CPU s / step | x baseline | scoring + PPO CPU s | x baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["saver"] == "baseline")
        cells = [f"{r[k]:.{digits}f} | {r[k] / base[k]:.2f}" for k, digits in
                 (("peak_mib", 0), ("transient_mib", 0), ("cpu_s", 2), ("train_cpu_s", 2))]
        print(f"| {r['size']} ({r['params'] / 1e6:.0f} M) | {r['saver']} | {r['weights_mib']:.0f} | " + " | ".join(cells) + " |")
    for saver in skipped:
        print(f"\n{saver}: not run, this CPU has no native bf16 (emulated bf16 is many times slower than fp32)")


def print_reference_table(ref: dict) -> None:
    rows, tokens = ref["tokens"]
    print(f"\nThe frozen reference's log-prob forward, {rows} rows x {tokens} tokens "
          f"(median of rounds 2-{REFERENCE_ROUNDS}, interleaved)\n")
    print("| reference forward | peak above the RSS before (MiB) | CPU s |")
    print("|---|---|---|")
    for mode, r in ref["forwards"].items():
        print(f"| {mode} | {r['mib']:.0f} | {r['cpu']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["23m"], choices=sorted(SIZES))
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary padded to this size")
    parser.add_argument("--steps", type=int, default=4, help="ReFT steps per configuration (at least 3)")
    parser.add_argument("--chunk", type=int, default=16, help="logprob_chunk_size of the chunking row")
    parser.add_argument("--questions", type=int, default=8, help="questions per step (one sample each)")
    parser.add_argument("--new-tokens", type=int, default=48, help="max_new_tokens")
    parser.add_argument("--savers", nargs="+", default=[], help="run only the savers whose names contain one of "
                        "these (the baseline always runs)")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "SAVER", "WORKDIR"))
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3: the first warms up, the last writes the checkpoint")
    if args.child:
        size, saver, workdir = args.child
        print(json.dumps(child(size, saver, args, workdir)))
        return
    sys.path.insert(0, str(ROOT))
    from reftune.models import cpu_has_native_bf16

    skipped = [] if cpu_has_native_bf16() else ["bf16 autocast"]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            run_child(args, size, "build", workdir)  # in its own process: the builder's memory stays out
            for saver in savers(args.chunk):
                wanted = saver == "baseline" or not args.savers or any(w in saver for w in args.savers)
                if wanted and saver not in skipped:
                    rows.append(run_child(args, size, saver, workdir))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        reference = run_child(args, args.sizes[0], "reference", workdir)
    print_table(rows, args, skipped)
    print_reference_table(reference)


if __name__ == "__main__":
    main()
