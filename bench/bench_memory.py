"""Peak memory of ReFT steps: full fine-tuning against LoRA, on the demo's tiny model and a ~50 M
parameter Llama, each configuration in a fresh process (peak RSS is per process), side by side.

    .venv/bin/python bench/bench_memory.py [--sizes tiny 50m] [--steps 2]

Full fine-tuning holds the policy, a second frozen copy as the KL reference, gradients and two
AdamW moments: about 5 copies of the weights. LoRA holds the base once (the reference is the same
model with its adapter disabled) plus small adapters and their optimizer state. The table prints
the peak RSS above the process's baseline (torch + transformers imported, nothing loaded) and
the size of one fp32 copy of the weights, so the ratio reads directly as "copies of the model".
Batches are kept small (2 questions x 2 samples, 16 new tokens) so that activations do not hide
the model state; at real batch sizes activations and logits add the same amount to both modes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # TinyModelConfig overrides
    "tiny": {},
    "50m": dict(hidden_size=640, intermediate_size=1728, num_layers=10, num_heads=10),
}


def child(size: str, lora: bool, steps: int, workdir: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from reftune.tasks import DataConfig, load_task
    from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus
    from reftune.trainers.reft import ReFTConfig, run_reft

    data = DataConfig(n_train=64, n_test=16, validation_size=8, max_steps=3)
    task = load_task(data)
    model_dir = Path(workdir) / f"model-{size}"
    if not model_dir.exists():
        build_tiny_model(model_dir, tokenizer_corpus(task), TinyModelConfig(**SIZES[size]))
        return {"built": str(model_dir)}
    import peft  # noqa: F401  (imported in both modes, so the baseline below holds the same libraries)
    n_params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(model_dir / "model.safetensors")).values())
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lora_kw = dict(lora_r=8, lora_alpha=16.0, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]) if lora else {}
    cfg = ReFTConfig(model=str(model_dir), data=data, out_dir=str(Path(workdir) / f"run-{size}-{lora}"), steps=steps,
                     questions_per_step=2, samples_per_prompt=2, mini_batch_size=2, ppo_epochs=1, lr=1e-4,
                     max_new_tokens=16, eval_every=0, eval_max_new_tokens=8, save_every=0, device="cpu",
                     progress=False, tensorboard=False, **lora_kw)
    run_reft(cfg, task=task)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"size": size, "lora": lora, "params": n_params, "peak_mib": (peak - baseline) / 1024,
            "weights_mib": n_params * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "50m"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "LORA", "WORKDIR"))
    args = parser.parse_args()
    if args.child:
        size, lora, workdir = args.child
        print(json.dumps(child(size, lora == "1", args.steps, workdir)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            for lora in (None, False, True):  # None: build the model first, in its own process
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", size,
                                      "1" if lora else "0", workdir], capture_output=True, text=True,
                                     env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, check=True)
                if lora is not None:
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| model | params | mode | peak RSS above baseline (MiB) | one fp32 copy (MiB) | copies |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params'] / 1e6:.1f} M | {'LoRA r=8' if r['lora'] else 'full'} | "
              f"{r['peak_mib']:.0f} | {r['weights_mib']:.0f} | {r['peak_mib'] / r['weights_mib']:.1f} |")
    for size in args.sizes:
        full, lora = (next(r for r in rows if r["size"] == size and r["lora"] is m) for m in (False, True))
        print(f"{size}: LoRA / full peak = {lora['peak_mib'] / full['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
