"""The `reftune` command line. Every command takes `--config FILE.yaml` plus `key=value` overrides
(dots reach nested sections: `data.style=nl`) and writes the resolved config into its run folder.

    reftune demo [--out DIR] [--quick] [key=value ...]
    reftune build-tiny --out DIR [key=value ...]
    reftune sft   --config sft.yaml   [key=value ...] [--resume RUN_DIR]
    reftune train --config reft.yaml  [key=value ...] [--resume RUN_DIR]
    reftune eval  --config eval.yaml  [key=value ...]
    reftune sample     model=CKPT split=test k=16 [key=value ...]     (rerun to resume)
    reftune offline-st base_model=BASE warmup_model=CKPT [key=value ...]   (rerun to resume)
    reftune online-st  model=CKPT [key=value ...] [--resume RUN_DIR]
    reftune reward-model samples=FILE model=CKPT [key=value ...]
    reftune compare    sft=CKPT reft=CKPT [warmup=... offline_st=... online_st=...] k=16 [key=value ...]

Every command also takes --overwrite: replace what an earlier run left in its folder (without it,
earlier outputs are never replaced). Mistakes exit with status 2 and one line on stderr,
`reftune <command>: error: ...`; REFTUNE_DEBUG=1 shows the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import sys


def _config(cls, args):
    from reftune.config import load_config

    return load_config(cls, args.config, args.overrides)


def _resumable_config(cls, args):
    """With --resume, the run folder's own config.yaml is the source of truth (overrides may extend
    it, e.g. steps); otherwise the usual -c file + overrides."""
    from pathlib import Path

    from reftune.config import load_config

    if not args.resume:
        return _config(cls, args)
    if args.config:
        raise ValueError("--resume continues a run with the config saved in its folder; drop -c/--config "
                         "(key=value overrides still apply)")
    if not (Path(args.resume) / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no run to resume there (no config.yaml; latest.json "
                                f"missing too)" if Path(args.resume).is_dir() else
                                f"--resume {args.resume}: no such run folder")
    cfg = load_config(cls, Path(args.resume) / "config.yaml", args.overrides)
    cfg.out_dir = str(args.resume)
    return cfg


def cmd_demo(args) -> dict:
    from reftune.demo import DemoConfig, run_demo

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.quick:
        overrides.append("quick=true")
    from reftune.config import explicit_keys, load_config

    # --quick shrinks what the user did not set: keys in the file or the overrides win.
    return run_demo(load_config(DemoConfig, args.config, overrides), overwrite=args.overwrite,
                    explicit=explicit_keys(args.config, args.overrides))


def cmd_build_tiny(args) -> dict:
    from reftune.tiny import BuildTinyConfig, run_build_tiny

    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    from reftune.config import load_config

    return run_build_tiny(load_config(BuildTinyConfig, args.config, overrides), overwrite=args.overwrite)


def cmd_sft(args) -> dict:
    from reftune.trainers.sft import SFTConfig, run_sft

    result = run_sft(_resumable_config(SFTConfig, args), resume=bool(args.resume), overwrite=args.overwrite)
    return {k: v for k, v in result.items() if k != "history"}


def cmd_train(args) -> dict:
    from reftune.trainers.reft import ReFTConfig, run_reft

    result = run_reft(_resumable_config(ReFTConfig, args), resume=bool(args.resume), overwrite=args.overwrite)
    return {k: v for k, v in result.items() if k != "history"}


def cmd_eval(args) -> dict:
    from reftune.inference.evaluate import EvalConfig, run_eval

    return run_eval(_config(EvalConfig, args), overwrite=args.overwrite)


def cmd_sample(args) -> dict:
    from reftune.inference.sample import SampleConfig, run_sample

    return run_sample(_config(SampleConfig, args), overwrite=args.overwrite)


def cmd_offline_st(args) -> dict:
    from reftune.trainers.offline_st import OfflineSTConfig, run_offline_st

    result = run_offline_st(_config(OfflineSTConfig, args), overwrite=args.overwrite)
    return {k: v for k, v in result.items() if k != "history"}


def cmd_online_st(args) -> dict:
    from reftune.trainers.online_st import OnlineSTConfig, run_online_st

    result = run_online_st(_resumable_config(OnlineSTConfig, args), resume=bool(args.resume),
                           overwrite=args.overwrite)
    return {k: v for k, v in result.items() if k != "history"}


def cmd_reward_model(args) -> dict:
    from reftune.trainers.reward_model import RewardModelRunConfig, run_reward_model

    result = run_reward_model(_config(RewardModelRunConfig, args), overwrite=args.overwrite)
    return {k: v for k, v in result.items() if k != "history"}


def cmd_compare(args) -> dict:
    from reftune.compare.compare import CompareConfig, run_compare

    comparison = run_compare(_config(CompareConfig, args), overwrite=args.overwrite)
    drop = ("vote_curve", "rerank_curve")
    return {**comparison, "methods": {m: {k: v for k, v in r.items() if k not in drop}
                                      for m, r in comparison["methods"].items()},
            "reward_model": {k: v for k, v in comparison["reward_model"].items() if k != "history"}}


COMMANDS = {
    "demo": (cmd_demo, "every method end to end on the built-in task with a tiny model: SFT, ReFT, Offline/Online-ST, compare"),
    "build-tiny": (cmd_build_tiny, "build a tiny Llama + tokenizer for a task (saved like a Hub model)"),
    "sft": (cmd_sft, "supervised fine-tuning on gold CoTs (warm-up and SFT baseline)"),
    "train": (cmd_train, "ReFT: PPO from a warm-up checkpoint"),
    "eval": (cmd_eval, "greedy top-1 accuracy of a checkpoint"),
    "sample": (cmd_sample, "k graded samples per question of a split, as resumable JSONL"),
    "offline-st": (cmd_offline_st, "Offline self-training: SFT from the base model on gold + own correct samples"),
    "online-st": (cmd_online_st, "Online self-training: ReFT's loop with a cross-entropy update"),
    "reward-model": (cmd_reward_model, "train the reranking reward model on a samples file (also multi-process)"),
    "compare": (cmd_compare, "top-1, voting@k and reranking@k of each method, as Markdown + HTML report"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error (then exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reftune", description="ReFT: reasoning with reinforced fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        _add_arguments(sub.add_parser(name, help=help_text, description=help_text), name)
    return parser


def _add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-5 data.style=nl")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier run left in the output folder (atomically); without it "
                        "earlier outputs are never replaced")
    if name in ("demo", "build-tiny"):
        p.add_argument("--out", default=None, help="output folder")
    if name == "demo":
        p.add_argument("--quick", action="store_true",
                       help="a tiny run for tests (seconds, not minutes); keys you set still win")
    if name in ("train", "online-st", "sft"):
        p.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue a run from its last checkpoint" + (" (the last complete epoch)"
                                                                        if name == "sft" else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options may come anywhere among the key=value overrides (`train model=x --resume DIR steps=4`):
    each command's own parser reads its arguments intermixed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        name, (_, help_text) = argv[0], COMMANDS[argv[0]]
        p = _Parser(prog=f"reftune {name}", description=help_text)
        _add_arguments(p, name)
        args = p.parse_intermixed_args(argv[1:])
        args.command = name
        return args
    return build_parser().parse_args(argv)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    import os

    args = parse_args(argv)
    from reftune.runtime import configure_threads

    configure_threads(0)  # before torch loads: OpenMP workers that sleep, not spin, when cores are shared
    from reftune.config import ConfigError
    from reftune.models import ModelLoadError

    # Ordinary mistakes (bad config, files, folders, models, data): one line, exit 2. Anything else
    # is a bug in reftune: one line too (exit 1), the traceback only with REFTUNE_DEBUG=1.
    handled = (ConfigError, ModelLoadError, OSError, ValueError, FloatingPointError, ImportError)
    try:
        result = COMMANDS[args.command][0](args)
    except KeyboardInterrupt:
        print(f"reftune {args.command}: interrupted", file=sys.stderr)
        return 130
    except handled as e:
        if os.environ.get("REFTUNE_DEBUG"):
            raise
        print(f"reftune {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("REFTUNE_DEBUG"):
            raise
        print(f"reftune {args.command}: internal error (a bug in reftune; REFTUNE_DEBUG=1 shows the traceback): "
              f"{type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
