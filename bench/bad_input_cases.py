"""The bad inputs `bench/bad_inputs.py` runs: each case's command line, what should happen (an
error naming `needles`, or a run that succeeds and passes `check`) and the files it must leave
alone. `fast(cmd, W)` gives each command's quickest valid arguments on the bench's fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DATA = ["data.n_train=24", "data.n_test=6", "data.validation_size=4", "data.max_steps=2"]
TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
              "model.vocab_size=300"]


@dataclass
class Case:
    id: str
    category: str
    argv: list[str]
    expect: str = "error"
    """error (exit 2 with a one-line message holding every needle) | ok (exit 0, then `check`)."""
    needles: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path], str | None] | None = None
    """After an ok run: None when fine, else what is wrong."""
    protect: tuple[str, ...] = ()
    """Paths (relative to the case folder) whose files must not change."""
    env: dict = field(default_factory=dict)


def fast(cmd: str, W: Path) -> list[str]:
    warm, tiny = W / "protected" / "warm", W / "protected" / "tiny"
    quiet = ["progress=false", "device=cpu"]
    online = [f"model={warm}", "steps=1", "questions_per_step=4", "mini_batch_size=2", "max_new_tokens=8",
              "eval_max_new_tokens=8", "eval_every=0", "tensorboard=false", *quiet, *DATA]
    return {
        "sft": [f"model={warm}", "epochs=1", "batch_size=8", "eval_split=none", "tensorboard=false", *quiet, *DATA],
        "train": online,
        "online-st": online,
        "eval": [f"model={warm}", "max_new_tokens=8", "device=cpu", *DATA],
        "sample": [f"model={warm}", "k=2", "max_new_tokens=8", "chunk_size=4", *quiet, *DATA],
        "offline-st": [f"base_model={tiny}", f"warmup_model={warm}", "k=1", "max_new_tokens=8", *quiet, "sft.epochs=1",
                       "sft.batch_size=8", "sft.eval_split=none", "sft.progress=false", "sft.tensorboard=false", *DATA],
        "compare": [f"sft={warm}", "k=2", "max_new_tokens=8", "rerank=false", "chunk_size=4", *quiet, *DATA],
        "demo": ["--quick", "threads=1", "baselines=false", "sft.progress=false", "reft.progress=false",
                 "sft.tensorboard=false", "reft.tensorboard=false"],
        "build-tiny": [*TINY_MODEL, *DATA],
    }[cmd]


def out_arg(cmd: str, out: Path) -> list[str]:
    return ["--out", str(out)] if cmd in ("demo", "build-tiny") else [f"out_dir={out}"]


# ------------------------------------------------------------------------------------------ sweep

SWEEP = {
    "sft": {"epochs": [0, -1], "batch_size": [0, -1], "grad_accum": [0, -1], "lr": [0, -1], "warmup_ratio": [-0.1, 1.5],
            "weight_decay": [-1], "max_grad_norm": [0, -1], "max_length": [0, -1], "eval_max_new_tokens": [0, -1],
            "gen_batch_size": [0, -1], "log_every": [0, -1], "eval_split": ["bogus"], "engine": ["bogus"],
            "device": ["bogus"], "dtype": ["bogus"], "mixed_precision": ["bogus"], "seed": [-1],
            "save_epochs": ["[0]", "[99]"]},
    "train": {"steps": [0, -1], "questions_per_step": [0, -1], "samples_per_prompt": [0, -1], "mini_batch_size": [0, -1],
              "lr": [0, -1], "temperature": [0, -1], "top_p": [0, 1.5], "max_new_tokens": [0, -1], "eval_every": [-1],
              "eval_max_new_tokens": [0, -1], "save_every": [-1], "gen_batch_size": [0, -1], "ppo_epochs": [0, -1],
              "gamma": [-0.5, 1.5], "lam": [-0.5, 1.5], "clip": [0, -1], "vf_clip": [0, -1], "vf_coef": [-1],
              "value_dropout": [-0.1, 1], "kl_coef": [-1], "kl_estimator": ["bogus"], "advantage": ["bogus"],
              "eval_split": ["bogus"], "weight_decay": [-1], "max_grad_norm": [0]},
    "online-st": {"steps": [0], "questions_per_step": [0], "mini_batch_size": [0], "temperature": [0, -1],
                  "own_weight": [-0.1, 1.5], "update_epochs": [0, -1], "max_length": [0], "max_new_tokens": [0, -1],
                  "gen_batch_size": [0], "samples_per_prompt": [0], "top_p": [1.5], "lr": [-1]},
    "eval": {"max_new_tokens": [0, -1], "gen_batch_size": [0, -1], "split": ["bogus"], "engine": ["bogus"],
             "dtype": ["bogus"], "device": ["cuda", "cuda:7"], "seed": [-1]},
    "sample": {"k": [0, -1], "temperature": [0, -1], "top_p": [0, 1.5], "max_new_tokens": [0, -1], "chunk_size": [0, -1],
               "batch_size": [0, -1], "split": ["bogus"], "engine": ["bogus"]},
    "offline-st": {"k": [0, -1], "max_per_question": [-1], "step_budget_epochs": [-1], "temperature": [0, -1],
                   "top_p": [1.5], "max_new_tokens": [0, -1], "chunk_size": [0], "gen_batch_size": [0],
                   "sft.epochs": [0], "sft.batch_size": [0], "sft.lr": [-1]},
    "compare": {"k": [0, -1], "temperature": [0, -1], "top_p": [0, 1.5], "max_new_tokens": [0, -1], "chunk_size": [0],
                "gen_batch_size": [0], "rm_k": [0, -1], "split": ["bogus", "train"], "rm.epochs": [0],
                "rm.batch_size": [0], "rm.lr": [-1]},
    "demo": {"threads": [-1], "warmup_epoch": [0, 99], "compare_k": [0], "sft.epochs": [0], "reft.steps": [0],
             "tiny.num_heads": [3]},
    "build-tiny": {"model.num_heads": [3, 0], "model.hidden_size": [0, -1], "model.num_layers": [0],
                   "model.vocab_size": [0, 10], "model.intermediate_size": [0], "model.max_position_embeddings": [0]},
}
DATA_SWEEP = {"data.n_train": [0, -1], "data.n_test": [0], "data.validation_size": [-1], "data.max_steps": [0],
              "data.min_steps": [0], "data.max_number": [0], "data.gold_order": ["bogus"], "data.style": ["bogus"],
              "data.name": ["bogus"], "data.answer_type": ["bogus"], "data.max_train": [-1], "data.max_test": [-1]}


TYPE_SWEEP = {  # wrong types and non-finite numbers
    "sft": {"epochs": "three", "lr": ".nan", "tensorboard": "maybe", "save_epochs": "2"},
    "train": {"steps": "1.5", "lr": ".inf", "kl_coef": "high", "progress": "2"},
    "online-st": {"own_weight": ".nan", "steps": "ten"},
    "eval": {"max_new_tokens": "8.5", "data": "nl"},
    "sample": {"k": "[2]", "temperature": ".nan"},
    "offline-st": {"k": "many", "sft": "x"},
    "compare": {"k": "two", "rerank": "sometimes"},
    "demo": {"threads": "one"},
    "build-tiny": {"model.hidden_size": "big"},
}


def sweep_cases(W: Path) -> list[Case]:
    cases = []
    for cmd, fields in SWEEP.items():
        for key, values in fields.items():
            for v in values:
                cases.append(Case(f"{cmd}:{key}={v}", "sweep", [cmd, *fast(cmd, W), f"{key}={v}"],
                                  needles=(key.rsplit(".", 1)[-1], str(v).lstrip("."))))
    for cmd, fields in TYPE_SWEEP.items():
        for key, v in fields.items():
            cases.append(Case(f"{cmd}:{key}={v} (type)", "sweep", [cmd, *fast(cmd, W), f"{key}={v}"],
                              needles=(key.rsplit(".", 1)[-1], str(v).lstrip("."))))
    for cmd in ("eval", "sft", "sample", "train", "compare"):
        for key, values in DATA_SWEEP.items():
            for v in values:
                cases.append(Case(f"{cmd}:{key}={v}", "sweep", [cmd, *fast(cmd, W), f"{key}={v}"],
                                  needles=(key.rsplit(".", 1)[-1], str(v).lstrip("."))))
    return cases


# ------------------------------------------------------------------------------------------ helpers

def copy_protected(name: str, W: Path):
    def setup(case_dir: Path) -> None:
        shutil.copytree(W / "protected" / name, case_dir / "run", symlinks=True)
    return setup


def truncated_model(W: Path):
    def setup(case_dir: Path) -> None:
        shutil.copytree(W / "protected" / "warm", case_dir / "model")
        f = case_dir / "model" / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return setup


def model_without(W: Path, *names: str):
    def setup(case_dir: Path) -> None:
        shutil.copytree(W / "protected" / "warm", case_dir / "model")
        for n in names:
            (case_dir / "model" / n).unlink()
    return setup


def json_data(test: list[dict], train: list[dict] | None = None, raw: bytes | None = None):
    """test.jsonl (`raw` bytes, or `test` rows) and train.jsonl (`train`, or rows of other questions)."""
    def setup(case_dir: Path) -> None:
        lines = lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode()  # noqa: E731
        (case_dir / "test.jsonl").write_bytes(raw if raw is not None else lines(test))
        (case_dir / "train.jsonl").write_bytes(lines(train if train is not None else rows(8, who="Mia")))
    return setup


def rows(n: int, who: str = "Tom", **extra) -> list[dict]:
    return [{"question": f"{who} has {i} apples. How many apples does {who} have?", "answer_cot": f"{i}",
             "answer_value": str(i), **extra} for i in range(n)]


def json_argv(case_dir: str) -> list[str]:
    return ["data.name=json", f"data.test_path={case_dir}/test.jsonl", f"data.train_path={case_dir}/train.jsonl",
            "data.validation_size=2"]


def no_stale(run: str):
    def check(case_dir: Path) -> str | None:
        stale = [str(p) for p in (case_dir / run).rglob(".tmp-*")] + [str(p) for p in (case_dir / run).rglob(".old-*")]
        return f"stale temporary copies left: {stale[:2]}" if stale else None
    return check


def metrics_ok(run: str):
    def check(case_dir: Path) -> str | None:
        lines = (case_dir / run / "metrics.jsonl").read_text().splitlines()
        try:
            [json.loads(x) for x in lines]
        except ValueError:
            return "metrics.jsonl still holds a broken line"
        return no_stale(run)(case_dir)
    return check


def special_cases(W: Path) -> list[Case]:
    P = W / "protected"
    c = "{case}"  # replaced by the case folder
    cases = [
        # ---- output lost or corrupted
        Case("build-tiny over a trained model", "lost", ["build-tiny", *fast("build-tiny", W), "--out", f"{c}/run"],
             needles=("already holds",), setup=copy_protected("warm", W), protect=("run",)),
        Case("eval over earlier predictions", "lost", ["eval", *fast("eval", W), f"out_dir={c}/run"],
             needles=("already holds",), setup=copy_protected("eval", W), protect=("run",)),
        Case("eval that fails keeps config.yaml", "lost",
             ["eval", *fast("eval", W), "model=/nonexistent/model", f"out_dir={c}/run"],
             needles=("/nonexistent/model",), setup=copy_protected("eval", W), protect=("run",)),
        Case("offline-st that fails keeps config.yaml", "lost",
             ["offline-st", *fast("offline-st", W), "base_model=/nonexistent/base", f"out_dir={c}/run"],
             needles=("/nonexistent/base",), setup=copy_protected("eval", W), protect=("run",)),
        Case("compare that fails keeps config.yaml", "lost",
             ["compare", *fast("compare", W), "sft=/nonexistent/sft", f"out_dir={c}/run"],
             needles=("/nonexistent/sft",), setup=copy_protected("eval", W), protect=("run",)),
        Case("offline-st reuses samples of another warm-up model", "lost",
             ["offline-st", *fast("offline-st", W), f"warmup_model={P / 'tiny'}", f"out_dir={c}/run"],
             needles=("warmup_model",), setup=copy_protected("offline", W), protect=("run/train_samples.jsonl",)),
        Case("sft over a finished run", "lost", ["sft", *fast("sft", W), f"out_dir={c}/run"],
             needles=("already holds",), setup=copy_protected("sft", W), protect=("run",)),
        Case("train over a finished run", "lost", ["train", *fast("train", W), f"out_dir={c}/run"],
             needles=("already holds",), setup=copy_protected("reft", W), protect=("run",)),
        Case("sample into another model's samples", "lost", ["sample", *fast("sample", W), f"model={P / 'tiny'}",
             f"out_dir={c}/run"], needles=("model",), setup=copy_protected("sample", W), protect=("run",)),
        Case("compare into another comparison", "lost", ["compare", *fast("compare", W), f"sft={P / 'tiny'}",
             f"out_dir={c}/run"], needles=("sft",), setup=copy_protected("compare", W),
             protect=("run/compare.json", "run/eval")),
        Case("demo into a demo folder", "lost", ["demo", *fast("demo", W), "--out", f"{c}/run"],
             needles=("already holds",), setup=lambda d: (d / "run" / "sft").mkdir(parents=True), protect=("run",)),
        # ---- runs that cannot be resumed
        Case("train --resume after a torn metrics line", "resume", ["train", "--resume", f"{c}/run", "steps=2"],
             expect="ok", setup=lambda d: (copy_protected("reft", W)(d), _tear(d / "run" / "metrics.jsonl")),
             check=metrics_ok("run")),
        Case("online-st --resume after a torn metrics line", "resume", ["online-st", "--resume", f"{c}/run", "steps=2"],
             expect="ok", setup=lambda d: (copy_protected("online", W)(d), _tear(d / "run" / "metrics.jsonl")),
             check=metrics_ok("run")),
        Case("train --resume with only best/ (killed before the first step checkpoint)", "resume",
             ["train", "--resume", f"{c}/run"], expect="ok", setup=lambda d: _best_only(copy_protected("reft", W), d),
             check=no_stale("run")),
        Case("train fresh into a best-only run says how to go on", "resume", ["train", *fast("train", W),
             f"out_dir={c}/run"], needles=("--resume",), setup=lambda d: _best_only(copy_protected("reft", W), d)),
        Case("train --resume removes stale .tmp-/.old- copies", "resume", ["train", "--resume", f"{c}/run", "steps=2"],
             expect="ok", setup=lambda d: _stale(copy_protected("reft", W), d), check=no_stale("run")),
        Case("train --resume with a damaged latest.json", "resume", ["train", "--resume", f"{c}/run", "steps=2"],
             expect="ok", setup=lambda d: (copy_protected("reft", W)(d), (d / "run" / "latest.json").write_text("{"))),
        Case("sft --resume", "resume", ["sft", "--resume", f"{c}/run"], expect="ok", setup=copy_protected("sft", W)),
        Case("sft --resume after a kill before the first epoch", "resume", ["sft", "--resume", f"{c}/run"],
             expect="ok", setup=lambda d: _no_checkpoints(copy_protected("sft", W), d), check=no_stale("run")),
        Case("sample rerun after a torn samples line", "resume", ["sample", *fast("sample", W), f"out_dir={c}/run"],
             expect="ok", setup=lambda d: (copy_protected("sample", W)(d), _tear(d / "run" / "test_samples.jsonl"))),
        Case("eval --overwrite replaces earlier predictions", "resume", ["eval", *fast("eval", W), "--overwrite",
             f"out_dir={c}/run"], expect="ok", setup=copy_protected("eval", W), check=no_stale("run")),
        # ---- tracebacks for ordinary mistakes
        *[Case(f"{cmd}: truncated model.safetensors", "traceback",
               [cmd, *fast(cmd, W), f"{key}={c}/model", f"out_dir={c}/run"], needles=("model.safetensors",),
               setup=truncated_model(W)) for cmd, key in (("eval", "model"), ("sample", "model"), ("sft", "model"),
                                                          ("train", "model"), ("compare", "sft"))],
        *[Case(f"{cmd}: read-only output folder", "traceback", [cmd, *fast(cmd, W), *out_arg(cmd, W / "ro" / "x")],
               needles=("ro",)) for cmd in SWEEP],
        *[Case(f"{cmd}: device=cuda without a GPU", "traceback", [cmd, *fast(cmd, W), "device=cuda", f"out_dir={c}/run"],
               needles=("cuda",)) for cmd in ("sft", "train", "eval", "sample", "offline-st", "online-st", "compare")],
        Case("data.name=hf without datasets", "traceback", ["eval", *fast("eval", W), "data.name=hf", "data.hf_id=gsm8k",
             f"out_dir={c}/run"], needles=("pip install", "datasets"), env={"hide_datasets": True}),
        # ---- silently accepted
        Case("demo --quick keeps sft.epochs, warmup_epoch and data.* overrides", "silent",
             ["demo", *fast("demo", W), "sft.epochs=3", "warmup_epoch=2", "data.n_train=40", "--out", f"{c}/run"],
             expect="ok", check=_demo_kept),
        Case("gold answer [1, 2]", "silent", ["eval", *fast("eval", W), *json_argv(c), f"out_dir={c}/run"],
             needles=("test.jsonl", "line 1", "answer_value"), setup=json_data(rows(4, answer_value=[1, 2]))),
        Case("gold answer {\"x\": 1}", "silent", ["eval", *fast("eval", W), *json_argv(c), f"out_dir={c}/run"],
             needles=("test.jsonl", "line 1", "answer_value"), setup=json_data(rows(4, answer_value={"x": 1}))),
        Case("gold answer '[1, 2]' as text", "silent", ["eval", *fast("eval", W), *json_argv(c), f"out_dir={c}/run"],
             needles=("test.jsonl", "line 1", "answer_value"), setup=json_data(rows(4, answer_value="[1, 2]"))),
        Case("duplicate YAML keys", "silent", ["sft", "-c", f"{c}/cfg.yaml", f"out_dir={c}/run"],
             needles=("cfg.yaml", "line 3", "epochs"),
             setup=lambda d: (d / "cfg.yaml").write_text(f"model: {P / 'warm'}\nepochs: 1\nepochs: 2\n")),
        Case("duplicate nested YAML keys", "silent", ["eval", "-c", f"{c}/cfg.yaml", f"out_dir={c}/run"],
             needles=("cfg.yaml", "line 4", "style"),
             setup=lambda d: (d / "cfg.yaml").write_text(f"model: {P / 'warm'}\ndata:\n  style: nl\n  style: program\n")),
        Case("save_epochs beyond epochs", "silent", ["sft", *fast("sft", W), "save_epochs=[5]", f"out_dir={c}/run"],
             needles=("save_epochs",)),
        Case("offline-st sft.model is ignored", "silent", ["offline-st", *fast("offline-st", W), f"sft.model={P / 'warm'}",
             f"out_dir={c}/run"], needles=("sft.model",)),
        # ---- unclear messages
        Case("non-UTF-8 byte in a config file", "unclear", ["sft", "-c", f"{c}/cfg.yaml", f"out_dir={c}/run"],
             needles=("cfg.yaml", "line 2", "UTF-8"),
             setup=lambda d: (d / "cfg.yaml").write_bytes(b"epochs: 1\nmodel: caf\xe9\n")),
        Case("non-UTF-8 byte in a data file", "unclear", ["eval", *fast("eval", W), *json_argv(c), f"out_dir={c}/run"],
             needles=("test.jsonl", "line 3", "UTF-8"),
             setup=json_data([], raw=b"".join(json.dumps(r).encode() + b"\n" for r in rows(2))
                             + b'{"question": "caf\xe9", "answer_value": "1", "answer_cot": "1"}\n')),
        Case("a folder without tokenizer.json", "unclear", ["eval", *fast("eval", W), f"model={c}/model",
             f"out_dir={c}/run"], needles=("tokenizer",), setup=model_without(W, "tokenizer.json")),
        Case("a folder without tokenizer_config.json", "unclear", ["eval", *fast("eval", W), f"model={c}/model",
             f"out_dir={c}/run"], needles=("tokenizer_config.json",), setup=model_without(W, "tokenizer_config.json")),
        Case("a folder without config.json", "unclear", ["eval", *fast("eval", W), f"model={c}/model",
             f"out_dir={c}/run"], needles=("config.json",), setup=model_without(W, "config.json")),
        Case("a run folder given as model", "unclear", ["eval", *fast("eval", W), f"model={P / 'sft'}",
             f"out_dir={c}/run"], needles=("checkpoints",)),
        Case("mistyped relative path model=runs/nope", "unclear", ["eval", *fast("eval", W), "model=runs/nope",
             f"out_dir={c}/run"], needles=("runs/nope", "not found")),
        Case("epochs=0 names the key", "unclear", ["sft", *fast("sft", W), "epochs=0", f"out_dir={c}/run"],
             needles=("epochs",)),
        Case("gen_batch_size=0 names the key", "unclear", ["eval", *fast("eval", W), "gen_batch_size=0", f"out_dir={c}/run"],
             needles=("gen_batch_size",)),
        Case("--resume of a folder without a run", "unclear", ["train", "--resume", f"{c}/nothing"],
             needles=("nothing",)),
        # ---- prompt length
        *[Case(f"{cmd}: a 4 KB question over the model's context", "prompt",
               [cmd, *fast(cmd, W), *json_argv(c), f"out_dir={c}/run"], needles=("longer than", "tokens"),
               setup=json_data(rows(4) + ([] if cmd in ("sft", "train") else [LONG]),
                               rows(8, who="Mia") + ([LONG] if cmd in ("sft", "train") else [])))
          for cmd in ("eval", "sample", "sft", "train", "compare")],
        # ---- more ordinary mistakes: files, folders, arguments
        Case("data file not found", "unclear", ["eval", *fast("eval", W), "data.name=json", "data.test_only=true",
             f"data.test_path={c}/missing.jsonl"], needles=("missing.jsonl",)),
        Case("empty data file", "unclear", ["eval", *fast("eval", W), *json_argv(c), "data.test_only=true"],
             needles=("test.jsonl", "empty"), setup=json_data([], raw=b"")),
        Case("a row that is not an object", "unclear", ["eval", *fast("eval", W), *json_argv(c), "data.test_only=true"],
             needles=("test.jsonl", "row 0"), setup=json_data([], raw=b"[1, 2]\n")),
        Case("a row without the answer field", "unclear", ["eval", *fast("eval", W), *json_argv(c),
             "data.test_only=true"], needles=("test.jsonl", "answer_value"),
             setup=json_data([{"question": "q?"}])),
        Case("config file is a folder", "unclear", ["sft", "-c", f"{c}"], needles=("folder",)),
        Case("override without =", "unclear", ["sft", *fast("sft", W), "epochs"], needles=("key=value",)),
        Case("unknown key", "unclear", ["train", *fast("train", W), "stepz=3"], needles=("stepz",)),
        Case("unknown nested key", "unclear", ["eval", *fast("eval", W), "data.stlye=nl"], needles=("stlye",)),
        Case("unknown command", "unclear", ["trian"], needles=("trian",)),
        Case("--resume with -c", "unclear", ["train", "--resume", f"{c}/run", "-c", f"{c}/x.yaml"],
             needles=("--resume",), setup=copy_protected("reft", W)),
        Case("--resume and --overwrite", "unclear", ["train", "--resume", f"{c}/run", "--overwrite"],
             needles=("--overwrite",), setup=copy_protected("reft", W), protect=("run",)),
        Case("model is a file", "unclear", ["eval", *fast("eval", W), f"model={P / 'warm' / 'config.json'}"],
             needles=("config.json",)),
        Case("out_dir is a file", "unclear", ["eval", *fast("eval", W), f"out_dir={c}/file"],
             needles=("file",), setup=lambda d: (d / "file").write_text("keep me"), protect=("file",)),
        Case("offline-st without warmup_model or samples", "unclear", ["offline-st", *fast("offline-st", W),
             "warmup_model="], needles=("warmup_model",)),
        Case("offline-st samples file not found", "unclear", ["offline-st", *fast("offline-st", W),
             f"samples={c}/none.jsonl"], needles=("none.jsonl",)),
        Case("compare without checkpoints", "unclear", ["compare", *fast("compare", W), "sft="], needles=("sft",)),
        Case("compare rm_samples not found", "unclear", ["compare", *fast("compare", W), "rerank=true",
             f"rm_samples={c}/none.jsonl"], needles=("none.jsonl",)),
        Case("eval of a test_only task on train", "unclear", ["eval", *fast("eval", W), *json_argv(c),
             "data.test_only=true", "split=train"], needles=("train",), setup=json_data(rows(4))),
        Case("validation_size larger than the data", "unclear", ["sft", *fast("sft", W), *json_argv(c),
             "data.validation_size=50"], needles=("validation_size",), setup=json_data(rows(4))),
        Case("built-in task: validation_size past n_train", "unclear", ["sft", *fast("sft", W),
             "data.validation_size=999999"], needles=("data.validation_size=999999", "data.n_train")),
        Case("a damaged samples file", "unclear", ["sample", *fast("sample", W), f"out_dir={c}/run"],
             needles=("test_samples.jsonl", "line 1"),
             setup=lambda d: (copy_protected("sample", W)(d), _damage_first_line(d / "run" / "test_samples.jsonl"))),
        Case("two sample runs into one folder at once", "lost", ["sample", *fast("sample", W), *BACKGROUND,
                                                                 f"out_dir={c}/run"],
             needles=("in use",), setup=_sampling_in_background(W), check=None),
    ]
    for case in cases:  # every case writes into its own folder
        case.argv = [a.replace(c, "{case}") for a in case.argv]
    return cases


BACKGROUND = ["k=256", "max_new_tokens=64", "chunk_size=1"]
LONG = {"question": "x " * 2000 + "How many?", "answer_cot": "1", "answer_value": "1"}


def _tear(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b'{"step": 99, "torn')


def _damage_first_line(path: Path) -> None:
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([b"{broken"] + lines[1:]))


def _sampling_in_background(W: Path):
    """Start `reftune sample` into the case's run folder in another process and wait until it has
    started writing there; the case then samples into the same folder at the same time."""
    def setup(d: Path) -> None:
        code = ("import sys; from reftune.cli import main; sys.exit(main(sys.argv[1:]))")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        argv = ["sample", *fast("sample", W), *BACKGROUND, f"out_dir={d / 'run'}"]
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not (d / "run" / "test_samples.jsonl").exists():
            time.sleep(0.2)
        (d / "background.pid").write_text(str(proc.pid))
    return setup


def _best_only(setup, d: Path) -> None:
    setup(d)
    for p in (d / "run" / "checkpoints").glob("step-*"):
        shutil.rmtree(p)
    (d / "run" / "latest.json").unlink()
    (d / "run" / "result.json").unlink()


def _stale(setup, d: Path) -> None:
    setup(d)
    ck = d / "run" / "checkpoints"
    shutil.copytree(ck / "best", ck / ".tmp-step-000002-4242")
    shutil.copytree(ck / "best", ck / ".old-best-4242")


def _no_checkpoints(setup, d: Path) -> None:
    setup(d)
    for name in ("checkpoints", "resume", "latest.json", "result.json"):
        p = d / "run" / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _demo_kept(case_dir: Path) -> str | None:
    import yaml

    cfg = yaml.safe_load((case_dir / "run" / "config.yaml").read_text())
    got = (cfg["sft"]["epochs"], cfg["warmup_epoch"], cfg["data"]["n_train"])
    return None if got == (3, 2, 40) else f"sft.epochs, warmup_epoch, data.n_train ran as {got}, not (3, 2, 40)"


# ------------------------------------------------------------------------------------------ running
