"""One PPO iteration's compute, fp32 against bf16 autocast (`mixed_precision=bf16`), same run, same data.

    .venv/bin/python bench/bench_mixed_precision.py [--sft-epochs 2] [--questions 32] [--samples 4]
                                                    [--mini-batch 32] [--repeats 5] [--threads 0]

Model: the demo's tiny Llama after `--sft-epochs` of SFT on the demo task (so its CoTs have
realistic lengths and end with EOS). One rollout batch (`--questions` x `--samples` sampled CoTs)
is drawn once; then, for each precision, the parts of a ReFT iteration that are not generation:
the no-grad forward of policy + value head and of the reference, and one forward+backward per
mini-batch (one PPO epoch), as `run_reft` does them. Timings are medians of `--repeats`, the two
precisions interleaved so background load hits both alike; the ratio is fp32 time / bf16 time.

Also printed: how far the bf16 log-probs of the sampled tokens are from the fp32 ones (the PPO
ratio sees this as noise; it should be far below the 0.2 clip).

bf16 is fast only where the CPU has native bf16 (AVX512-BF16 or AMX; see
`reftune.models.cpu_has_native_bf16`); elsewhere it is emulated and slower, and `auto` keeps fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reftune.trainers import algorithms as A  # noqa: E402
from reftune.demo import _demo_data  # noqa: E402
from reftune.engines.static import StaticSampler  # noqa: E402
from reftune.models import autocast, cpu_has_native_bf16, load_causal_lm, load_tokenizer  # noqa: E402
from reftune.trainers.policy import ValueHead, policy_forward  # noqa: E402
from reftune.rewards.score import RewardSpec  # noqa: E402
from reftune.trainers.rollout import sample_and_score  # noqa: E402
from reftune.trainers.sft import SFTConfig, run_sft  # noqa: E402
from reftune.tasks import load_task  # noqa: E402
from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus  # noqa: E402

CPU = torch.device("cpu")


def iteration_compute(model, ref_model, value_head, ro, mini_batch: int, amp: bool, group: int) -> float:
    """Seconds for the no-grad forwards and one PPO epoch of forward+backward (no optimizer step),
    each question's prompt run once for its `group` samples (as `run_reft` does on one process)."""
    P = ro.prompt_ids.shape[1]
    start = time.perf_counter()
    with torch.no_grad(), autocast(amp, CPU):
        policy_forward(model, value_head, ro.input_ids, ro.attention_mask, ro.response_ids, P, group_size=group)
        policy_forward(ref_model, None, ro.input_ids, ro.attention_mask, ro.response_ids, P, group_size=group)
    for idx in torch.arange(ro.input_ids.shape[0]).split(mini_batch):
        with autocast(amp, CPU):
            logprobs, values, _ = policy_forward(model, value_head, ro.input_ids[idx], ro.attention_mask[idx],
                                                 ro.response_ids[idx], P, group_size=group)
        mask = ro.response_mask[idx].float()
        (A.masked_mean(logprobs, mask) + A.masked_mean(values, mask)).backward()
    model.zero_grad(set_to_none=True)
    value_head.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-epochs", type=int, default=2)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native CPU bf16: {cpu_has_native_bf16()}")

    data = _demo_data()
    task = load_task(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "tiny", tokenizer_corpus(task), TinyModelConfig())
        if args.sft_epochs:
            sft = run_sft(SFTConfig(model=str(path), data=data, out_dir=f"{tmp}/sft", epochs=args.sft_epochs, lr=3e-3,
                                    eval_split="none", progress=False, tensorboard=False), task=task)
            path = sft["checkpoints"][args.sft_epochs]
        tokenizer = load_tokenizer(str(path))
        model = load_causal_lm(str(path), CPU, torch.float32)
        ref_model = load_causal_lm(str(path), CPU, torch.float32).eval().requires_grad_(False)
    value_head = ValueHead(model.config.hidden_size)
    ro = sample_and_score(StaticSampler(model, tokenizer, 64, seed=0), task, task.train[:args.questions],
                          args.samples, 1.0, 1.0, 64, RewardSpec()).rollout
    print(f"rollout batch {tuple(ro.input_ids.shape)}, {int(ro.response_mask.sum())} response tokens")

    P = ro.prompt_ids.shape[1]
    with torch.no_grad():
        lp32, _, _ = policy_forward(model, None, ro.input_ids, ro.attention_mask, ro.response_ids, P)
        with autocast(True, CPU):
            lp16, _, _ = policy_forward(model, None, ro.input_ids, ro.attention_mask, ro.response_ids, P)
    mask = ro.response_mask.bool()
    diff = (lp16 - lp32)[mask].abs()
    print(f"|logp_bf16 - logp_fp32| over response tokens: mean {diff.mean():.4f}, max {diff.max():.4f}")

    times = {False: [], True: []}
    for amp in (False, True):  # one untimed call each
        iteration_compute(model, ref_model, value_head, ro, args.mini_batch, amp, args.samples)
    for _ in range(args.repeats):
        for amp in (False, True):
            times[amp].append(iteration_compute(model, ref_model, value_head, ro, args.mini_batch, amp, args.samples))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"{'precision':10s} {'seconds/iteration':>18s}")
    print(f"{'fp32':10s} {fp32:18.3f}")
    print(f"{'bf16 amp':10s} {bf16:18.3f}")
    print(f"speed-up fp32/bf16: {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
