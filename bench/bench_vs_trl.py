"""One ReFT iteration against one TRL `GRPOTrainer` generation cycle on the same samples, same run.

    make bench-trl          # builds .venv-bench (CPU torch 2.13, trl 1.16, reftune editable), then:
    .venv-bench/bin/python bench/bench_vs_trl.py [--threads 1,2] [--questions 32] [--samples 4]
        [--max-new-tokens 96] [--mini-batch 32] [--repeats 5] [--sft-epochs 1] [--engines cached,static]
        [--model PATH] [--cache runs/bench-cache]

Model: the demo's tiny Llama (TinyModelConfig defaults, 0.9 M parameters, fp32) after `--sft-epochs`
of SFT on the demo task (`reftune.trainers.sft.run_sft`), so both trainers sample EOS-terminated
CoTs of realistic length; it is built once into `--cache` and reused. Workload per iteration, both
sides: `--questions` training questions x `--samples` samples at temperature 1 (full distribution),
at most `--max-new-tokens` new tokens, the task's grader as reward (`task.grade` -> 1 / 0.1 / 0),
a frozen reference loaded from the saved checkpoint and a KL term (`--beta`), then one pass of
optimizer steps over mini-batches of `--mini-batch` rows.

- reftune: `run_reft` with the demo's ReFT settings (value head, GAE, one PPO epoch, engine
  `cached` unless `--engines` says more) in fp32 (`mixed_precision=no`): rollout, reward, no-grad
  old+value and reference passes, PPO update.
- TRL: `GRPOTrainer` with `num_generations=--samples`, `per_device_train_batch_size=--mini-batch`,
  `steps_per_generation=rows/--mini-batch` (so old log-probs are computed, as PPO needs),
  `beta=--beta` (reference model loaded), `use_vllm=False`, `gradient_checkpointing=False`,
  `bf16=False` (fp32), `num_iterations=1`; one iteration = the `steps_per_generation` trainer
  steps that consume one generation batch (transformers `generate`, reward, old + ref passes,
  the optimizer steps).

Each framework runs in its own worker process (threads pinned with `reftune.runtime.
configure_threads` before torch loads, so both get the same OpenMP settings), blocked between
iterations; the parent tells them to run one iteration at a time, alternating the order every
round, so background load on the shared machine hits all alike. The first iteration of each is a
warm-up (printed, not in the medians). Reported per thread count: median samples/s (rows / wall
time of the iteration), the ratio of medians against TRL, the min-max of the per-round ratios,
mean response length (the workloads must match), the split of the median iteration, and each
process's peak RSS (absolute, and above the process after its imports).

Split: generate = the engine's call (reftune: `reft/seconds_generate` minus the grader; TRL:
`_generate_single_turn`); reward = time in `task.grade`; no-grad passes = old (+value head) and
reference forwards (reftune: `policy_forward` under no_grad; TRL: `_get_per_token_logps_and_
entropies` under no_grad); update = the rest of the iteration's training (reftune: `reft/seconds`
minus the above; TRL: the trainer steps outside `_generate_and_score_completions`); other = wall
minus all of these (reftune: end of step, logging; TRL: tokenising, decoding, advantages).
Timers wrap those functions from this file; nothing in reftune or trl is edited.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "@@bench "  # prefix of the worker's protocol lines on stdout (libraries may print too)
PARTS = ("generate", "reward", "passes", "update", "other")
ITERATIONS = 200  # reftune steps whose questions the TRL dataset holds (warm-up + repeats stay far below)


class Stop(Exception):
    """Raised inside a trainer's step callback to leave its loop when the parent says stop."""


# ---------------------------------------------------------------- worker side (both benches use it)

def emit(**message) -> None:
    print(TAG + json.dumps(message), flush=True)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Gate:
    """Blocks the trainer at the start of an iteration until the parent writes `go` (or `stop`),
    and keeps the iteration's timers."""

    def __init__(self, baseline_mib: float):
        self.baseline_mib, self.t_go, self.timers, self.questions, self.shape = baseline_mib, 0.0, {}, 0, []
        self.ready = False

    def wait(self) -> None:
        if not self.ready:
            import torch

            emit(ready=True, threads=torch.get_num_threads(), wait_policy=os.environ.get("OMP_WAIT_POLICY", ""))
            self.ready = True
        if sys.stdin.readline().strip() != "go":
            emit(stop=True, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 baseline_mib=self.baseline_mib)
            raise Stop
        self.timers = {}
        self.t_go = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_go

    def timed(self, name: str, fn, classify=None):
        """`fn` that adds its wall time to timer `name` (or to `classify()`'s answer, None: skip)."""
        def wrapper(*args, **kwargs):
            key = classify() if classify else name
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if key:
                    self.timers[key] = self.timers.get(key, 0.0) + time.perf_counter() - start
        return wrapper


def time_grader(task, gate: Gate) -> None:
    """Time `task.grade` (the reward) and note which questions it graded (a checksum the parent
    compares: every framework must see the same questions in the same iteration)."""
    import zlib

    grade = gate.timed("reward", task.grade)

    def wrapper(completions, examples):
        gate.questions = zlib.crc32("\n".join(sorted({str(ex.id) for ex in examples})).encode())
        return grade(completions, examples)
    task.grade = wrapper


def reftune_worker(args, gate: Gate) -> None:
    """run_reft with the demo's ReFT settings; one iteration per `go`."""
    import dataclasses

    import torch

    import reftune.trainers.reft as reft_module
    from reftune.demo import _demo_data, _demo_reft
    from reftune.tasks import load_task
    from reftune.trainers.loop import Callbacks

    task = load_task(_demo_data())
    time_grader(task, gate)
    nograd = lambda: None if torch.is_grad_enabled() else "passes"  # noqa: E731
    reft_module.policy_forward = gate.timed("", reft_module.policy_forward, classify=nograd)
    sample_and_score = reft_module.sample_and_score

    def sample_and_note_shape(*a, **kw):
        scored = sample_and_score(*a, **kw)
        gate.shape = [scored.rollout.prompt_ids.shape[0], scored.rollout.prompt_ids.shape[1],
                      scored.rollout.response_ids.shape[1]]
        return scored
    reft_module.sample_and_score = sample_and_note_shape

    def end(done: int, metrics: dict) -> None:
        wall, t = gate.elapsed(), gate.timers
        rows = args.questions * args.samples
        parts = dict(generate=metrics["reft/seconds_generate"] - t.get("reward", 0.0), reward=t.get("reward", 0.0),
                     passes=t.get("passes", 0.0))
        parts["update"] = metrics["reft/seconds"] - sum(parts.values())
        parts["other"] = wall - metrics["reft/seconds"]
        emit(wall=wall, rows=rows, response_length=metrics["reft/response_length"], parts=parts,
             questions=gate.questions, shape=gate.shape)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(
            _demo_reft(), model=args.model, data=_demo_data(), out_dir=f"{tmp}/reft", steps=1_000_000,
            questions_per_step=args.questions, samples_per_prompt=args.samples, mini_batch_size=args.mini_batch,
            max_new_tokens=args.max_new_tokens, kl_coef=args.beta, lr=args.lr, engine=args.engine,
            gen_batch_size=args.gen_batch_size or _demo_reft().gen_batch_size, eval_every=0, save_every=0,
            mixed_precision="no", dtype="float32", device="cpu", seed=args.seed, progress=False, tensorboard=False,
            dynamic_sampling=False)  # TRL's PPO trains on every sampled group
        try:
            reft_module.run_reft(cfg, task=task, callbacks=Callbacks(on_step_begin=lambda step: gate.wait(),
                                                                     on_step_end=end))
        except Stop:
            pass


def trl_worker(args, gate: Gate) -> None:
    """TRL GRPOTrainer on the same model, prompts, lengths and reward; one generation cycle per `go`."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reftune.demo import _demo_data
    from reftune.rewards.score import RewardSpec, correctness_score
    from reftune.tasks import load_task
    from reftune.trainers.rollout import step_questions

    task = load_task(_demo_data())
    time_grader(task, gate)
    spec = RewardSpec()
    lengths = []

    def reward(prompts, completions, completion_ids, row, **kwargs):  # the task's grader, as reftune's reward
        lengths.extend(len(ids) for ids in completion_ids)  # EOS included, as reftune's response_length
        return [correctness_score(g, spec) for g in task.grade(completions, [task.train[i] for i in row])]

    rows = args.questions * args.samples
    per_generation = rows // args.mini_batch
    # The questions of reftune's steps 0, 1, ... in order (and no shuffling): iteration k of both
    # trainers samples the same questions.
    index = {id(ex): i for i, ex in enumerate(task.train)}
    dataset = Dataset.from_list([{"prompt": task.prompt(ex, for_generation=True), "row": index[id(ex)]}
                                 for step in range(ITERATIONS)
                                 for ex in step_questions(task.train, step, args.questions, args.seed)])

    class GateCallback(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            if state.global_step % per_generation == 0:
                lengths.clear()
                gate.wait()

        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step % per_generation == 0:
                wall, t = gate.elapsed(), gate.timers
                parts = dict(generate=t.get("generate", 0.0), reward=t.get("reward", 0.0), passes=t.get("passes", 0.0),
                             update=wall - t.get("rollout", 0.0))
                parts["other"] = wall - sum(parts.values())
                emit(wall=wall, rows=len(lengths), response_length=sum(lengths) / max(len(lengths), 1), parts=parts,
                     questions=gate.questions)

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.mini_batch, steps_per_generation=per_generation,
            num_generations=args.samples, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
            top_k=0, beta=args.beta, num_iterations=1, epsilon=0.2, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, use_vllm=False,
            gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
            model_init_kwargs={"dtype": torch.float32}, max_steps=1_000_000, logging_steps=per_generation,
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=False,
            seed=args.seed)
        trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[GateCallback()])
        trainer._generate_single_turn = gate.timed("generate", trainer._generate_single_turn)
        trainer._generate_and_score_completions = gate.timed("rollout", trainer._generate_and_score_completions)
        nograd = lambda: None if torch.is_grad_enabled() else "passes"  # noqa: E731
        trainer._get_per_token_logps_and_entropies = gate.timed("", trainer._get_per_token_logps_and_entropies,
                                                                classify=nograd)
        try:
            trainer.train()
        except Stop:
            pass


# ---------------------------------------------------------------- parent side

class Worker:
    """A worker process: `step()` runs one iteration and returns its message; `stop()` its memory."""

    def __init__(self, name: str, argv: list[str], log_dir: str, threads: int, wait: bool = True):
        self.name = name
        self.log = open(Path(log_dir) / f"{name.replace('/', '_')}-{threads}.log", "w+")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("OMP_NUM_THREADS", None)
        self.proc = subprocess.Popen([sys.executable, *argv, "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)
        self.started = time.perf_counter()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until the worker has loaded everything and waits for its first iteration."""
        self.info = self._read()
        self.setup_s = time.perf_counter() - self.started

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        self.log.seek(0)
        raise RuntimeError(f"worker {self.name} exited ({self.proc.wait()}); its log:\n{self.log.read()[-4000:]}")

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait(timeout=120)
        return out


def interleaved(workers: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict, dict]:
    """({name: [warm-up messages]}, {name: [timed messages]}, {name: stop message}); order alternates per round."""
    names = list(workers)
    first = {n: [workers[n].step() for _ in range(warmup)] for n in names}
    timed = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            timed[n].append(workers[n].step())
            m = timed[n][-1]
            print(f"  round {r + 1}/{repeats} {n}: {m['wall']:.2f} s, {m['rows']} rows, "
                  f"{m['response_length']:.1f} response tokens", flush=True)
    return first, timed, {n: workers[n].stop() for n in names}


def median_message(messages: list[dict]) -> dict:
    """The message of the median wall time (its split is then one real iteration's)."""
    ordered = sorted(messages, key=lambda m: m["wall"])
    return ordered[(len(ordered) - 1) // 2]


def machine_info() -> str:
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{fields.get('Model name', '?')}, {os.cpu_count()} CPUs, flags: {' '.join(wanted) or 'none of avx512f/amx'}"
            f"; load average {os.getloadavg()[0]:.1f}")


def versions() -> str:
    import importlib.metadata as md

    out = []
    for pkg in ("torch", "transformers", "trl"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} missing")
    return ", ".join(out)


def prepare_model(cache: str, sft_epochs: int, seed: int) -> str:
    """The demo's tiny model after `sft_epochs` of SFT, built once into `cache` (in a child process,
    so this one stays free of torch)."""
    target = Path(cache) / f"warmup-sft{sft_epochs}-seed{seed}"
    if (target / "config.json").exists():
        return str(target)
    code = f"""
import shutil, sys, tempfile, time
from pathlib import Path
from reftune.runtime import configure_threads
configure_threads(0)
from reftune.demo import _demo_data
from reftune.tasks import load_task
from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus
from reftune.trainers.sft import SFTConfig, run_sft
start = time.time()
data = _demo_data(); data.seed = {seed}
task = load_task(data)
with tempfile.TemporaryDirectory() as tmp:
    path = build_tiny_model(Path(tmp) / "tiny", tokenizer_corpus(task), TinyModelConfig(seed={seed}))
    if {sft_epochs}:
        path = run_sft(SFTConfig(model=str(path), data=data, out_dir=tmp + "/sft", epochs={sft_epochs}, batch_size=32,
                                 lr=3e-3, eval_split="none", seed={seed}, device="cpu", dtype="float32",
                                 progress=False, tensorboard=False), task=task)["checkpoints"][{sft_epochs}]
    shutil.copytree(path, "{target}.tmp", dirs_exist_ok=True)
Path("{target}.tmp").rename("{target}")
print(f"built {target} in {{time.time() - start:.0f}} s", flush=True)
"""
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return str(target)


def split_row(name: str, m: dict) -> str:
    p = m["parts"]
    cells = " | ".join(f"{p[k]:.2f} ({100 * p[k] / m['wall']:.0f}%)" for k in PARTS)
    return f"| {name} | {m['wall']:.2f} | {cells} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured in its own workers")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--mini-batch", type=int, default=32, help="rows per optimizer step (the demo's mini_batch_size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sft-epochs", type=int, default=1)
    ap.add_argument("--engines", default="cached", help="reftune engines to measure, comma-separated (the demo: cached)")
    ap.add_argument("--gen-batch-size", type=int, default=0, help="reftune's gen_batch_size (0: the demo's)")
    ap.add_argument("--beta", type=float, default=0.01, help="KL weight (reftune's kl_coef for program CoTs)")
    ap.add_argument("--lr", type=float, default=2e-4, help="the demo's ReFT lr, both trainers")
    ap.add_argument("--model", help="warm-up model folder (default: built into --cache)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-trl", action="store_true", help="reftune engines only (e.g. where trl is not installed)")
    ap.add_argument("--worker", choices=("reftune", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="cached", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        from reftune.runtime import configure_threads

        configure_threads(int(args.threads))  # before torch loads
        import torch  # noqa: F401
        import transformers  # noqa: F401

        if args.worker == "trl":
            import trl  # noqa: F401
        gate = Gate(rss_mib())
        (reftune_worker if args.worker == "reftune" else trl_worker)(args, gate)
        return

    if (args.questions * args.samples) % args.mini_batch:
        ap.error("--questions * --samples must be a multiple of --mini-batch")
    import importlib.util

    use_trl = not args.no_trl
    if use_trl and importlib.util.find_spec("trl") is None:
        sys.exit("trl is not importable here: run `make bench-trl` (it builds .venv-bench), or pass --no-trl")
    model = args.model or prepare_model(args.cache, args.sft_epochs, args.seed)
    rows = args.questions * args.samples
    print(f"# reftune vs TRL GRPOTrainer: one iteration of {args.questions} questions x {args.samples} samples = {rows} "
          f"rows, <= {args.max_new_tokens} new tokens, mini-batch {args.mini_batch}, fp32, beta {args.beta}")
    print(f"machine: {machine_info()}\n{versions()}; model {model} (SFT epochs {args.sft_epochs})\n", flush=True)
    common = ["--model", model, "--questions", str(args.questions), "--samples", str(args.samples),
              "--max-new-tokens", str(args.max_new_tokens), "--mini-batch", str(args.mini_batch),
              "--beta", str(args.beta), "--lr", str(args.lr), "--seed", str(args.seed),
              "--gen-batch-size", str(args.gen_batch_size)]
    specs = {f"reftune/{e}": [__file__, "--worker", "reftune", "--engine", e, *common] for e in args.engines.split(",")}
    if use_trl:
        specs["trl"] = [__file__, "--worker", "trl", *common]
    summary = []
    with tempfile.TemporaryDirectory() as logs:
        for threads in [int(t) for t in args.threads.split(",")]:
            print(f"## {threads} thread(s)\n", flush=True)
            workers = {name: Worker(name, argv, logs, threads, wait=False) for name, argv in specs.items()}
            for name, w in workers.items():  # started together; each waits for its first `go`
                w.wait_ready()
                print(f"  {name}: ready in {w.setup_s:.0f} s, torch threads {w.info['threads']}, "
                      f"OMP_WAIT_POLICY={w.info['wait_policy']}", flush=True)
            first, timed, stops = interleaved(workers, args.repeats)
            same = all(len({timed[n][r]["questions"] for n in workers}) == 1 for r in range(args.repeats))
            base = "trl" if use_trl else next(iter(specs))
            med = {n: statistics.median(m["rows"] / m["wall"] for m in timed[n]) for n in workers}
            print(f"\n| {threads} thread(s) | samples/s | vs {base} | per-round ratio min-max | s/iteration "
                  f"| first iteration s | mean response tokens | peak RSS MiB | above imports MiB |")
            print("|---|---|---|---|---|---|---|---|---|")
            for n in workers:
                rounds = [(a["rows"] / a["wall"]) / (b["rows"] / b["wall"]) for a, b in zip(timed[n], timed[base])]
                s = stops[n]
                print(f"| {n} | {med[n]:.1f} | {med[n] / med[base]:.2f}x | {min(rounds):.2f}-{max(rounds):.2f} "
                      f"| {statistics.median(m['wall'] for m in timed[n]):.2f} | {first[n][0]['wall']:.2f} "
                      f"| {statistics.mean(m['response_length'] for m in timed[n]):.1f} "
                      f"| {s['peak_rss_mib']:.0f} | {s['peak_rss_mib'] - s['baseline_mib']:.0f} |")
                summary.append((threads, n, med[n] / med[base]))
            print(f"\nsame questions in every framework's iteration of each round: {'yes' if same else 'NO'}")
            print("\nsplit of the median iteration, seconds (share of wall):\n")
            print("| framework | wall | " + " | ".join(PARTS) + " |")
            print("|---|---|" + "---|" * len(PARTS))
            for n in workers:
                print(split_row(n, median_message(timed[n])))
            print(flush=True)
    if use_trl:
        print("samples/s ratio vs TRL: " + ", ".join(f"{n} at {t} thread(s) {r:.2f}x" for t, n, r in summary
                                                     if n != "trl"))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
