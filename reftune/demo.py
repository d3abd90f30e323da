"""`reftune demo`: the whole method end to end on the built-in task with a tiny model, on a CPU.

1. build a tiny Llama + tokenizer from the task's text (saved like any Hub model),
2. SFT for `sft.epochs` epochs; the warm-up model is epoch `warmup_epoch`, the SFT baseline the
   best epoch on the validation split (the paper's protocol, with validation instead of test),
3. ReFT (PPO) from the warm-up checkpoint, best step chosen on validation,
4. Offline self-training: the warm-up model's correct samples on the training set + gold CoTs,
   SFT from the base tiny model,
5. Online self-training with ReFT's budget (same loop, cross-entropy update),
6. `reftune compare` over all methods: greedy top-1, voting@k and reranking@k on the test split
   with a reward model trained on the warm-up model's training-set samples (the ones step 4
   drew), `compare.html`; then `summary.json` and `report.md`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reftune.trainers.reft import ReFTConfig
from reftune.trainers.reward_model import RewardModelConfig
from reftune.trainers.sft import SFTConfig
from reftune.tasks import DataConfig
from reftune.compare.plots import plot_learning_curves
from reftune.tiny import TinyModelConfig


def _demo_data() -> DataConfig:
    return DataConfig(name="arithmetic", style="program", n_train=2000, n_test=400, validation_size=300,
                      min_steps=2, max_steps=3, max_number=20, gold_order="random")


def _demo_sft() -> SFTConfig:
    # lr 3e-3: a 0.9M-parameter model trained from scratch (the paper's 1e-5 is for 7B models).
    # The task's gold programs are at most 41 tokens: 64 new tokens cut only runaway samples. The
    # static engine (greedy: the same tokens as `generate`) is the fastest on a CPU.
    return SFTConfig(epochs=18, batch_size=32, lr=3e-3, eval_max_new_tokens=64, log_every=10, engine="static")


def _demo_reft() -> ReFTConfig:
    # The library defaults are the paper's (for 7B models on GPUs). A 0.9M model trained from scratch
    # on 2 CPU cores needs a larger lr and more samples per question, and above all many cheap PPO
    # steps: validation accuracy still climbs after 300 of them, so one PPO epoch per rollout and
    # mini-batches of 32. lam 1.0 and vf_coef 1 keep a zero-initialised critic from starving early
    # tokens of credit or pulling the shared backbone off its SFT solution. The static engine's own
    # log-probs and values stand in for the no-grad policy pass (fp32 only, hence no bf16 autocast:
    # fp32 is also the same numeric path on every CPU). Rollouts one step off (max_staleness=1; the
    # paper's loop is synchronous): sampled in a second process during the update, 1.8x the steps per
    # second on 2 cores, and on validation at least as good over seeds 0-2. Dynamic sampling (DAPO's;
    # not the paper's): about half the questions get 4 equal rewards, which contrast nothing, and
    # training only on mixed groups doubled the margin over SFT on seeds 0-2, for more than twice
    # the time per iteration (the refills). Measurements and the study behind these choices: docs/demo-results.md.
    return ReFTConfig(steps=450, questions_per_step=32, samples_per_prompt=4, mini_batch_size=32, ppo_epochs=1,
                      lr=2e-4, lam=1.0, vf_coef=1.0, max_new_tokens=64, eval_max_new_tokens=64, eval_every=20,
                      save_every=50, engine="static", engine_old_logprobs=True, max_staleness=1,
                      dynamic_sampling=True)


def _demo_reward_model() -> RewardModelConfig:
    # A tiny model needs a far larger lr than the paper's 1e-6 for 7B; the warm-up model's samples
    # are mostly wrong (~10% right), so the rare correct class is up-weighted. One epoch over 4000
    # of the ~7500 distinct samples: measured as good as all of them at half the time (~40 s).
    return RewardModelConfig(epochs=1, lr=1e-3, batch_size=32, balance_classes=True, max_examples=4000)


@dataclass
class DemoConfig:
    """`reftune demo`: every stage on the built-in task with a tiny model."""

    out_dir: str = "runs/demo"
    """Run folder: the tiny model, each stage's run, summary.json and report.md."""
    quick: bool = False
    """A run of seconds for tests: few problems, epochs and steps (accuracy is meaningless)."""
    seed: int = 0
    """Seed of the task, the model's init, and every stage."""
    warmup_epoch: int = 13
    """SFT epoch whose checkpoint is the warm-up model ReFT starts from."""
    threads: int = 0
    """CPU threads for torch (0: automatic, see reftune.runtime.configure_threads)."""
    data: DataConfig = field(default_factory=_demo_data)
    """The built-in task."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Size of the tiny model."""
    sft: SFTConfig = field(default_factory=_demo_sft)
    """SFT settings (model, data and out_dir are set by the demo)."""
    reft: ReFTConfig = field(default_factory=_demo_reft)
    """ReFT settings (model, data and out_dir are set by the demo)."""
    baselines: bool = True
    """Run Offline-ST, Online-ST and the reward model (False: warm-up, SFT and ReFT with top-1 and voting only)."""
    parallel_stages: bool = True
    """Train ReFT in a second process while Offline-ST and Online-ST run in this one, each with half the CPU threads (the same results as one after the other)."""
    train_samples_k: int = 4
    """Samples per training question from the warm-up model, for Offline-ST and the reward model (the paper: 100)."""
    offline_st_epochs: int = 0
    """Offline-ST: SFT epochs from the base model (0: as many optimizer steps as the SFT run; the rest as `sft`)."""
    offline_st_max_per_question: int = 10
    """Offline-ST: distinct correct samples kept per question besides the gold CoT (the paper: 10)."""
    compare_k: int = 8
    """Samples per test question for voting@k and reranking@k (the paper: 100)."""
    reward_model: RewardModelConfig = field(default_factory=_demo_reward_model)
    """Reward model for reranking, initialised from the SFT checkpoint (model and out_dir are set by the demo)."""

    def validate(self, prefix: str = "") -> None:
        from reftune.validate import Checks

        c = Checks(self, prefix)
        c.out_dir().bool("quick", "baselines", "parallel_stages").int("seed", 0, 2**32 - 1).int("threads", 0, note="0: torch's default")
        c.int("train_samples_k", 1).int("offline_st_epochs", 0).int("offline_st_max_per_question", 0)
        c.int("compare_k", 1)
        self.data.validate("data.")
        self.tiny.validate("tiny.")
        self.sft.validate("sft.")
        self.reft.validate("reft.")
        self.reward_model.validate("reward_model.")
        c.int("warmup_epoch", 1, self.sft.epochs, note="an epoch of the SFT run, 1 to sft.epochs")
        by = "the demo (from data.*, seed, and its own stage folders)"
        for section, default in (("sft", SFTConfig()), ("reft", ReFTConfig()), ("reward_model", RewardModelConfig())):
            c.derived(section, {"model": (default.model,), "out_dir": (getattr(DemoConfig(), section).out_dir,),
                                "seed": (default.seed, self.seed)}, by)
        c.derived("sft", {"data": (DataConfig(), self.data)}, by).derived("reft", {"data": (DataConfig(), self.data)}, by)


# `--quick`: the preset that shrinks the demo to seconds (for tests). Dotted keys, so keys the user
# set (in a config file or as overrides) can win over it.
QUICK = {
    "warmup_epoch": 1, "train_samples_k": 2, "offline_st_epochs": 1, "compare_k": 4,
    "data.n_train": 64, "data.n_test": 32, "data.validation_size": 16,
    "tiny.hidden_size": 32, "tiny.intermediate_size": 64, "tiny.num_layers": 2, "tiny.vocab_size": 300,
    "sft.epochs": 2, "sft.batch_size": 16, "sft.eval_max_new_tokens": 40,
    "reft.steps": 2, "reft.questions_per_step": 8, "reft.mini_batch_size": 4, "reft.eval_every": 2,
    "reft.save_every": 2, "reft.max_new_tokens": 40, "reft.eval_max_new_tokens": 40,
    "reward_model.epochs": 1,
}


def apply_quick(cfg: DemoConfig, explicit: set[str] | None = None) -> DemoConfig:
    """A copy of `cfg` shrunk so the demo runs in well under a minute (for tests). Keys in `explicit`
    (what the user set) are kept; without it, a value that differs from the demo's default counts
    as set by the user."""
    out = copy.deepcopy(cfg)
    default = DemoConfig()
    for key, value in QUICK.items():
        section, _, leaf = key.rpartition(".")
        target, base = (getattr(out, section), getattr(default, section)) if section else (out, default)
        user_set = key in explicit if explicit is not None else getattr(target, leaf) != getattr(base, leaf)
        if not user_set:
            setattr(target, leaf, value)
    return out


def run_demo(cfg: DemoConfig, overwrite: bool = False, explicit: set[str] | None = None) -> dict:
    """Every stage into `cfg.out_dir` (see the module doc). A folder that holds a demo run is
    refused unless `overwrite`; `explicit`: the keys the user set, which `--quick` leaves alone."""
    from reftune.runs import claim_run

    start = time.time()
    # stage configs below are derived, never the caller's
    cfg = apply_quick(cfg, explicit) if cfg.quick else copy.deepcopy(cfg)
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with claim_run(cfg.out_dir, "reftune demo") as folder:
        out = folder.path
        held = [stage for stage in ("tiny", "sft", "reft", "offline_st", "online_st", "compare", "eval", "summary.json")
                if (out / stage).exists()]
        if held and not overwrite:
            raise FileExistsError(f"{out} already holds a demo run ({', '.join(held[:3])}); choose another --out, "
                                  f"or pass --overwrite to replace it")
        if overwrite:
            folder.clear()
        cfg = seeded(cfg)
        folder.begin(cfg)
        return _run_stages(cfg, out, start)


def seeded(cfg: DemoConfig) -> DemoConfig:
    """`cfg` with its seed given to the task and every stage."""
    r = dataclasses.replace
    return r(cfg, data=r(cfg.data, seed=cfg.seed), tiny=r(cfg.tiny, seed=cfg.seed), sft=r(cfg.sft, seed=cfg.seed),
             reft=r(cfg.reft, seed=cfg.seed), reward_model=r(cfg.reward_model, seed=cfg.seed))


def reft_stage_config(cfg: DemoConfig, warmup_ckpt: str, out: Path) -> ReFTConfig:
    """Step 3's config: the demo's ReFT settings from the warm-up checkpoint into `out/reft`. Rollouts
    one step off are sampled on the CPU: where `device=auto` finds a GPU, ReFT runs synchronously."""
    from reftune.models import resolve_device

    reft = dataclasses.replace(cfg.reft, model=warmup_ckpt, data=cfg.data, out_dir=str(out / "reft"))
    if reft.max_staleness and resolve_device(reft.device).type != "cpu":
        print(f"[demo] ReFT trains on {resolve_device(reft.device)}: max_staleness=0 (rollouts one step off are "
              f"sampled on the CPU)", flush=True)
        reft = dataclasses.replace(reft, max_staleness=0)
    return reft


def _run_stages(cfg: DemoConfig, out: Path, start: float) -> dict:
    from reftune.trainers.reft import run_reft
    from reftune.trainers.sft import run_sft
    from reftune.tasks import load_task
    from reftune.tiny import build_tiny_model, tokenizer_corpus
    from reftune.runs import write_json
    from reftune.runtime import numerics

    r = dataclasses.replace
    task = load_task(cfg.data)
    print(f"[demo] task {task.name} ({task.style} CoT): {len(task.train)} train, {len(task.validation)} validation, "
          f"{len(task.test)} test questions", flush=True)

    # 1. Tiny model, saved like a Hub model.
    model_dir = build_tiny_model(out / "tiny", tokenizer_corpus(task), cfg.tiny)

    # 2. One SFT run: warm-up = an early epoch, SFT baseline = best epoch on validation.
    sft_cfg = r(cfg.sft, model=str(model_dir), data=cfg.data, out_dir=str(out / "sft"),
                save_epochs=sorted({cfg.warmup_epoch, *range(1, cfg.sft.epochs + 1)}))
    sft = run_sft(sft_cfg, task=task)
    warmup_ckpt, sft_ckpt = sft["checkpoints"][cfg.warmup_epoch], sft["best_checkpoint"]

    # 3. ReFT from the warm-up checkpoint: here, or in a second process beside steps 4-5 (independent
    # of them: every stage is seeded on its own, so the results do not depend on the order).
    reft_cfg = reft_stage_config(cfg, warmup_ckpt, out)
    parallel = cfg.parallel_stages and cfg.baselines
    t0 = time.time()
    if parallel:
        threads = cfg.threads or torch.get_num_threads()
        reft_stage = BackgroundStage(run_reft_stage, reft_cfg, max(1, threads // 2))
        torch.set_num_threads(max(1, threads - threads // 2))
        print(f"[demo] ReFT trains in process {reft_stage.pid} while the baselines run here", flush=True)
    else:
        reft = run_reft(reft_cfg, task=task)

    stage_seconds = {"tiny_sft_reft" if not parallel else "tiny_sft": round(time.time() - start, 1)}
    methods = {"warmup": warmup_ckpt, "sft": sft_ckpt}
    train_samples, offline_data = None, None
    try:
        train_samples, offline_data = _baselines(cfg, out, task, model_dir, warmup_ckpt, methods, stage_seconds,
                                                 quiet=parallel)
        if parallel:
            reft = reft_stage.result()
            torch.set_num_threads(threads)
            stage_seconds["reft_beside_baselines"] = round(time.time() - t0, 1)
    finally:
        if parallel:
            reft_stage.stop()
    methods["reft"] = reft["best_checkpoint"]
    methods = {m: methods[m] for m in ("warmup", "sft", "reft", "offline_st", "online_st") if m in methods}
    comparison, results = _compare(cfg, out, task, methods, sft_ckpt, train_samples, stage_seconds)

    summary = {
        "task": task.name, "style": task.style, "seed": cfg.seed, "quick": cfg.quick,
        "warmup_epoch": cfg.warmup_epoch, "sft_best_epoch": sft["best_epoch"],
        **results,
        **({"offline_st_data": offline_data} if offline_data else {}),
        "compare": {"k": cfg.compare_k, "html": "compare/compare.html", "markdown": "compare/compare.md",
                    "json": "compare/compare.json"},
        "stage_seconds": stage_seconds,
        "wall_seconds": round(time.time() - start, 1),
        "numerics": numerics(),
    }
    write_json(out / "summary.json", summary)
    write_demo_report(out, summary, sft["history"], reft["history"])
    print(f"[demo] done in {summary['wall_seconds']:.0f}s; report: {out / 'report.md'}", flush=True)
    return summary


def _baselines(cfg: DemoConfig, out: Path, task, model_dir, warmup_ckpt: str, methods: dict, stage_seconds: dict,
               quiet: bool):
    """Steps 4-5 (Offline-ST, Online-ST) into `methods` and `stage_seconds`; returns (the warm-up's
    training samples, Offline-ST's data counts), both None without baselines. `quiet`: no progress
    bars (ReFT's, in the other process, keeps the terminal)."""
    from reftune.inference.sample import read_samples
    from reftune.trainers.offline_st import OfflineSTConfig, run_offline_st
    from reftune.trainers.online_st import online_st_config_from_reft, run_online_st

    r = dataclasses.replace
    train_samples, offline_data = None, None
    if cfg.baselines:
        # 4. Offline-ST: warm-up samples on the training set, SFT from the BASE model on gold + kept.
        t0 = time.time()
        # By default the SFT baseline's budget in optimizer steps: with much less the tiny model barely
        # learns from scratch (measured: 6 of 12 epochs gave 3% validation accuracy): a straw man.
        offline_sft = r(cfg.sft, epochs=cfg.offline_st_epochs or cfg.sft.epochs, save_epochs=[])
        offline_cfg = OfflineSTConfig(
            base_model=str(model_dir), warmup_model=warmup_ckpt, data=cfg.data, out_dir=str(out / "offline_st"),
            k=cfg.train_samples_k, max_per_question=cfg.offline_st_max_per_question,
            step_budget_epochs=0 if cfg.offline_st_epochs else cfg.sft.epochs,
            temperature=cfg.reft.temperature, top_p=cfg.reft.top_p, max_new_tokens=cfg.reft.max_new_tokens,
            gen_batch_size=cfg.reft.gen_batch_size, engine=cfg.reft.engine, seed=cfg.seed, device=cfg.sft.device,
            progress=cfg.sft.progress and not quiet, sft=r(offline_sft, progress=offline_sft.progress and not quiet))
        offline = run_offline_st(offline_cfg, task=task)
        train_samples = read_samples(out / "offline_st" / "train_samples.jsonl")
        methods["offline_st"] = offline["best_checkpoint"]
        offline_data = {k: offline[k] for k in ("n_gold", "n_kept", "questions_with_kept")}
        offline_data["epochs"] = len(offline["history"])
        stage_seconds["offline_st"] = round(time.time() - t0, 1)
        print(f"[demo] offline-st: {offline['n_kept']} correct samples kept beside {offline['n_gold']} gold CoTs "
              f"({time.time() - t0:.0f}s)", flush=True)

        # 5. Online-ST from the warm-up checkpoint with ReFT's budget.
        t0 = time.time()
        online_cfg = online_st_config_from_reft(cfg.reft, model=warmup_ckpt, data=cfg.data,
                                                out_dir=str(out / "online_st"))
        online_cfg = r(online_cfg, progress=online_cfg.progress and not quiet)
        methods["online_st"] = run_online_st(online_cfg, task=task)["best_checkpoint"]
        stage_seconds["online_st"] = round(time.time() - t0, 1)
        print(f"[demo] online-st done ({time.time() - t0:.0f}s)", flush=True)
    return train_samples, offline_data


def _compare(cfg: DemoConfig, out: Path, task, methods: dict, sft_ckpt: str, train_samples, stage_seconds: dict):
    """Step 6; returns (the comparison, each method's test results for the summary)."""
    from reftune.compare.compare import METHODS, CompareConfig, run_compare

    r = dataclasses.replace
    # 6. Compare every method on the test split: greedy top-1, voting@k, reranking@k (reward model
    # from the SFT checkpoint, trained on the warm-up samples step 4 drew), compare.html.
    t0 = time.time()
    compare_cfg = CompareConfig(
        data=cfg.data, out_dir=str(out / "compare"), **{m: methods.get(m, "") for m in METHODS},
        reft_run=str(out / "reft"), split="test", k=cfg.compare_k, temperature=cfg.reft.temperature,
        top_p=cfg.reft.top_p, max_new_tokens=cfg.reft.eval_max_new_tokens, gen_batch_size=cfg.reft.gen_batch_size,
        engine=cfg.reft.engine, rerank=cfg.baselines and train_samples is not None, rm=r(cfg.reward_model, model=sft_ckpt),
        eval_dir=str(out / "eval"), seed=cfg.seed, device=cfg.sft.device, progress=cfg.sft.progress)
    comparison = run_compare(compare_cfg, task=task, rm_records=train_samples)
    stage_seconds["compare"] = round(time.time() - t0, 1)
    keep = ("checkpoint", "accuracy", "n", "k", "vote_accuracy", "rerank_accuracy")
    results = {name: {key: entry[key] for key in keep} for name, entry in comparison["methods"].items()}
    for name, entry in results.items():
        print(f"[demo] {name:10s} test accuracy: top-1 {entry['accuracy']:.3f}, vote@{entry['k']} "
              f"{entry['vote_accuracy']:.3f}, rerank@{entry['k']} "
              f"{'-' if entry['rerank_accuracy'] is None else format(entry['rerank_accuracy'], '.3f')} "
              f"(n={entry['n']})", flush=True)
    return comparison, results


def run_reft_stage(reft_cfg, threads: int) -> dict:
    """ReFT in the second process: torch pinned to `threads`, the task loaded again (deterministic)."""
    from reftune.tasks import load_task
    from reftune.trainers.reft import run_reft

    torch.set_num_threads(threads)
    return run_reft(reft_cfg, task=load_task(reft_cfg.data))


class BackgroundStage:
    """`fn(*args)` in a spawned process (a fresh interpreter: no forked torch or sandbox state);
    `result()` waits for its return value or re-raises its error here, `stop()` ends it."""

    def __init__(self, fn, *args):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        # Not a daemon: the stage may start processes of its own (ReFT's rollout process with
        # max_staleness > 0). `stop()`, always called, ends it; `_exit_with_parent` if this one is killed.
        self._proc = ctx.Process(target=_stage_main, args=(child_conn, fn, args, os.getpid()), daemon=False)
        self._proc.start()
        child_conn.close()
        self.pid = self._proc.pid
        self._answered = False

    def result(self):
        try:
            ok, payload = self._conn.recv()
            self._answered = True
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"the demo's ReFT process ended without a result (exit code {self._proc.exitcode})") \
                from None
        if not ok:
            raise payload
        return payload

    def stop(self) -> None:
        if self._answered:
            # It is exiting: let it run its own clean-up (a process terminated here leaves its
            # semaphores, e.g. tqdm's lock, to the resource tracker, which warns at exit).
            self._proc.join(timeout=60)
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()
        self._conn.close()


def _stage_main(conn, fn, args, parent: int) -> None:
    # A demo killed by a signal must not leave it training for the rest of the hour.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        conn.send((True, fn(*args)))
    except BaseException as e:  # noqa: BLE001  (sent to the parent, which raises it)
        try:
            conn.send((False, e))
        except Exception:  # an exception that does not pickle: its type and message
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


def _exit_with_parent(parent: int) -> None:
    """End this process once `parent` is gone (it is then re-parented): its run folder keeps the
    last checkpoint, so the stage resumes where it stopped."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def write_demo_report(out: Path, summary: dict, sft_history: list[dict], reft_history: list[dict]) -> Path:
    out = Path(out)
    plot_learning_curves(out / "learning_curves.png", sft_history, reft_history)
    methods = [m for m in ("warmup", "sft", "reft", "offline_st", "online_st") if m in summary]
    lines = [
        "# reftune demo",
        "",
        f"Task `{summary['task']}` ({summary['style']} CoT), seed {summary['seed']}, "
        f"wall time {summary['wall_seconds']:.0f} s{' (quick mode: numbers are meaningless)' if summary.get('quick') else ''}.",
        f"Warm-up = SFT epoch {summary['warmup_epoch']}; SFT baseline = best epoch on validation "
        f"({summary['sft_best_epoch']}); ReFT = best PPO step on validation. Accuracy: greedy top-1 on the test split.",
        *([f"Offline-ST = SFT from the base model on the gold CoTs + {summary['offline_st_data']['n_kept']} distinct "
           f"correct warm-up samples ({summary['offline_st_data']['epochs']} epochs, best on validation); Online-ST = "
           "ReFT's loop and budget with a cross-entropy update on own correct samples + gold (best step on validation)."]
          if "offline_st_data" in summary else []),
        "",
        "| method | accuracy | n | voting@k | reranking@k |",
        "|---|---|---|---|---|",
        *[f"| {m} | {summary[m]['accuracy']:.3f} | {summary[m]['n']} | {_pct_or_dash(summary[m].get('vote_accuracy'))} "
          f"| {_pct_or_dash(summary[m].get('rerank_accuracy'))} |" for m in methods],
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    if summary.get("compare"):
        lines += [f"Voting and reranking use k={summary['compare']['k']} samples per test question (T=1). "
                  f"The full comparison with plots: [compare.html]({summary['compare']['html']}) "
                  f"([compare.md]({summary['compare']['markdown']})).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _pct_or_dash(value) -> str:
    return "-" if value is None else f"{value:.3f}"
