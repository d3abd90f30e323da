"""Generation engines side by side: the built-in KV-cache sampler (`CachedSampler`) against transformers'
`model.generate` (`HFGenerator`), measured in the same run on the same model and prompts.

    .venv/bin/python bench/bench_generation.py [--batch 64] [--max-new-tokens 64] [--repeats 3] [--threads 0]
                                               [--sft-epochs 1] [--sft-max-new-tokens 128]

Model: the demo's tiny Llama (TinyModelConfig defaults: hidden 128, 4 layers, BPE vocab up to 1024)
built from the demo task's text. Prompts: the first `--batch` test questions of that task.
Modes: greedy, and sampling at temperature 1 (full distribution, no top-k / top-p).

Two scenarios:
- untrained: fixed-length decoding, `--max-new-tokens` for every row: the raw per-token cost.
- warm-up: the same model after `--sft-epochs` of SFT on the demo task (about 15 s per epoch on one
  core): it writes program CoTs that end with EOS after 25-45 tokens, at different lengths per row,
  which is where dropping finished rows (CachedSampler) can pay; `--sft-max-new-tokens` is a cap
  that greedy decoding does not reach. Skipped with `--sft-epochs 0`.

Untrained, greedy decoding practically never picks EOS, so every row runs to `--max-new-tokens`
and both engines do the same work. Sampling draws EOS with probability about 1/vocab per token,
so some rows (roughly one in ten at 64 tokens) stop early, differently in each engine. Throughput
therefore counts the tokens each engine actually generated (EOS included, padding not), and the
tables show how many rows stopped with EOS. Timings: one warm-up call per engine and mode, then
`--repeats` timed calls, interleaved between engines (so background load hits both alike); the
median is reported. On a machine shared with other jobs, `--threads 1` gives much steadier (and
there, faster) numbers than torch's default thread pool, which spins against the other load.
Greedy outputs of the two engines are compared token by token.
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
from reftune.demo import _demo_data  # noqa: E402
from reftune.generation import CachedSampler, HFGenerator  # noqa: E402
from reftune.modeling import load_causal_lm, load_tokenizer  # noqa: E402
from reftune.sft import SFTConfig, run_sft  # noqa: E402
from reftune.tasks import load_task  # noqa: E402
from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus  # noqa: E402


def response_tokens(rollout) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(rollout.response_ids, rollout.response_mask)]


def timed(engine, prompts, mode: str, max_new_tokens: int):
    kwargs = dict(greedy=True) if mode == "greedy" else dict(temperature=1.0, top_p=1.0)
    start = time.perf_counter()
    rollout = engine.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
    return time.perf_counter() - start, rollout


def agreement(a, b) -> dict:
    ta, tb = response_tokens(a), response_tokens(b)
    same_rows = sum(x == y for x, y in zip(ta, tb))
    positions = sum(min(len(x), len(y)) for x, y in zip(ta, tb))
    # tokens equal up to the first divergence of each row (later tokens condition on different text)
    prefix = 0
    for x, y in zip(ta, tb):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix += n
    return {"rows": len(ta), "identical_rows": same_rows, "common_prefix_tokens": prefix, "positions": positions,
            "texts_equal": sum(x == y for x, y in zip(a.texts, b.texts))}


def measure(engines: dict, prompts: list[str], max_new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """{(mode, engine): timing row} and the greedy agreement of the engines."""
    results: dict[tuple[str, str], dict] = {}
    greedy_outputs = {}
    for mode in ("greedy", "sample"):
        for name, engine in engines.items():  # warm-up
            _, rollout = timed(engine, prompts, mode, max_new_tokens)
            if mode == "greedy":
                greedy_outputs[name] = rollout
        times = {name: [] for name in engines}
        tokens = {name: [] for name in engines}
        eos_rows = {name: [] for name in engines}
        for _ in range(repeats):
            for name, engine in engines.items():
                seconds, rollout = timed(engine, prompts, mode, max_new_tokens)
                times[name].append(seconds)
                tokens[name].append(int(rollout.response_mask.sum()))
                eos_rows[name].append(int(rollout.ended_with_eos.sum()))
        for name in engines:
            rates = [n / s for n, s in zip(tokens[name], times[name])]  # tokens/s per call, median over calls
            results[(mode, name)] = {"seconds": statistics.median(times[name]), "tokens": statistics.median(tokens[name]),
                                     "tok_s": statistics.median(rates), "eos_rows": max(eos_rows[name])}
    return results, agreement(greedy_outputs["cached"], greedy_outputs["hf"])


def report(title: str, results: dict, agree: dict, n_prompts: int) -> None:
    print()
    print(f"## {title}")
    print()
    print("| mode   | engine | seconds/call | tokens/call | tokens/s | vs hf | rows ending in EOS |")
    print("|--------|--------|--------------|-------------|----------|-------|--------------------|")
    for (mode, name), r in results.items():
        ratio = r["tok_s"] / results[(mode, "hf")]["tok_s"]
        print(f"| {mode:6s} | {name:6s} | {r['seconds']:12.3f} | {r['tokens']:11.0f} | {r['tok_s']:8.0f} | "
              f"{ratio:4.2f}x | {r['eos_rows']:>6d} / {n_prompts:<3d}        |")
    print()
    print(f"greedy agreement (cached vs hf): {agree['identical_rows']}/{agree['rows']} rows identical token for token, "
          f"{agree['texts_equal']}/{agree['rows']} decoded texts equal, "
          f"{agree['common_prefix_tokens']}/{agree['positions']} tokens before the first divergence")
    ratios = {mode: results[(mode, "cached")]["tok_s"] / results[(mode, "hf")]["tok_s"] for mode in ("greedy", "sample")}
    print(f"cached / hf throughput: greedy {ratios['greedy']:.2f}x, sampling {ratios['sample']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per row, untrained scenario")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per engine and mode")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-epochs", type=int, default=1, help="SFT epochs for the warm-up scenario (0: skip it)")
    ap.add_argument("--sft-max-new-tokens", type=int, default=128, help="token cap, warm-up scenario")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = _demo_data()  # the demo's task, so the tokenizer (and vocabulary) is the demo's
    data.seed, data.n_test = args.seed, max(data.n_test, args.batch)
    task = load_task(data)
    prompts = [task.prompt(ex, for_generation=True) for ex in task.test[: args.batch]]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_model(Path(tmp) / "tiny", tokenizer_corpus(task), TinyModelConfig(seed=args.seed)))
        tokenizer = load_tokenizer(path)
        scenarios = [("untrained, fixed length", path, args.max_new_tokens)]
        if args.sft_epochs:
            start = time.perf_counter()
            sft = run_sft(SFTConfig(model=path, data=data, out_dir=str(Path(tmp) / "sft"), epochs=args.sft_epochs,
                                    batch_size=32, lr=3e-3, eval_split="none", seed=args.seed, device="cpu",
                                    dtype="float32", progress=False, tensorboard=False), task=task)
            sft_seconds = time.perf_counter() - start
            scenarios.append((f"warm-up (SFT {args.sft_epochs} epoch(s), {sft_seconds:.0f} s), CoTs end with EOS",
                              sft["checkpoints"][args.sft_epochs], args.sft_max_new_tokens))
        models = [(title, load_causal_lm(p, torch.device("cpu"), torch.float32).eval(), cap) for title, p, cap in scenarios]

    n_params = sum(p.numel() for p in models[0][1].parameters())
    prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tiny Llama {n_params / 1e6:.2f} M params "
          f"(vocab {len(tokenizer)}); {len(prompts)} prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens; "
          f"median of {args.repeats} timed calls after 1 warm-up call")
    for title, model, cap in models:
        engines = {"hf": HFGenerator(model, tokenizer, batch_size=args.batch),
                   "cached": CachedSampler(model, tokenizer, batch_size=args.batch, seed=args.seed)}
        results, agree = measure(engines, prompts, cap, args.repeats)
        report(f"{title}; max_new_tokens={cap}", results, agree, len(prompts))


if __name__ == "__main__":
    main()
