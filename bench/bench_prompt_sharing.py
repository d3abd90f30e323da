"""Prompt sharing in the trainer's forward passes: each question's prompt once for its samples.

    .venv/bin/python bench/bench_prompt_sharing.py [--questions 32] [--samples 4] [--repeats 5] [--threads 1]

On the demo's tiny model (built untrained: the cost does not depend on the weights) and the demo's
task, a ReFT iteration's rows are `questions` prompts x `samples` responses (the gold programs,
so response lengths are the task's). Times, in the same run, the passes one PPO iteration makes:
the no-grad pass (policy log-probs and values, or the reference's), and forward + backward of a
32-row mini-batch, each with the full rows (`policy_forward(..., group_size=1)`) and with the
prompt shared (`group_size=samples`); prints medians of `repeats` and the ratio full / shared.
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
from reftune.batching import pad_with_mask  # noqa: E402
from reftune.demo import DemoConfig  # noqa: E402
from reftune.models import load_causal_lm, load_tokenizer  # noqa: E402
from reftune.tasks import load_task  # noqa: E402
from reftune.tiny import build_tiny_model, tokenizer_corpus  # noqa: E402
from reftune.trainers import algorithms as A  # noqa: E402
from reftune.trainers.policy import ValueHead, policy_forward  # noqa: E402


def rows(tok, task, questions: int, samples: int):
    prompts = [tok(task.prompt(e), add_special_tokens=False)["input_ids"] for e in task.train[:questions]]
    answers = [tok(e.cot, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in task.train[:questions]]
    prompt_ids, prompt_mask = pad_with_mask([p for p in prompts for _ in range(samples)], tok.pad_token_id, side="left")
    response_ids, response_mask = pad_with_mask([a for a in answers for _ in range(samples)], tok.pad_token_id,
                                                side="right")
    return (torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1), response_ids,
            response_mask.float(), prompt_ids.shape[1])


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    demo = DemoConfig()
    task = load_task(demo.data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "tiny", tokenizer_corpus(task), demo.tiny)
        tok, model = load_tokenizer(str(folder)), load_causal_lm(str(folder), torch.device("cpu"), torch.float32)
    head = ValueHead(model.config.hidden_size)
    input_ids, attention_mask, response_ids, response_mask, P = rows(tok, task, args.questions, args.samples)
    mb = slice(0, args.mini_batch)

    def no_grad(group):
        model.eval()
        with torch.no_grad():
            policy_forward(model, head, input_ids, attention_mask, response_ids, P, 1.0, group_size=group)

    def update(group):
        model.train()
        model.zero_grad(set_to_none=True)
        logprobs, values, _ = policy_forward(model, head, input_ids[mb], attention_mask[mb], response_ids[mb], P, 1.0,
                                             group_size=group)
        (A.masked_mean(logprobs, response_mask[mb]) + A.masked_mean(values, response_mask[mb])).backward()

    print(f"{args.questions} questions x {args.samples} samples, prompt {P} / response {response_ids.shape[1]} "
          f"tokens (padded), {args.threads} thread(s), median of {args.repeats}")
    print(f"{'pass':32s} {'full s':>8s} {'shared s':>9s} {'full/shared':>12s}")
    for name, fn in ((f"no-grad, {len(input_ids)} rows", no_grad), (f"forward+backward, {args.mini_batch} rows", update)):
        full, shared = median_seconds(lambda: fn(1), args.repeats), median_seconds(lambda: fn(args.samples),
                                                                                    args.repeats)
        print(f"{name:32s} {full:8.3f} {shared:9.3f} {full / shared:11.2f}x")


if __name__ == "__main__":
    main()
