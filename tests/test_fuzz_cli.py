"""Fuzzing the CLI: seeded random mutations of valid configs (overrides and YAML files)
and of dataset files, fed to every subcommand in-process through `reftune.cli.main`. Whatever the
input: exit 0, or exit 2 with exactly one line `reftune <cmd>: error: ...`; never an exception
escaping `main`; and nothing outside the case's own folder changes (a pre-existing sibling run and
the model folders are hashed before and after every case).

Mutated values are small (integers up to 3), so an input that happens to be valid still runs in
seconds; `demo` gets only invalid mutations (a valid demo takes half a minute)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import typing
from pathlib import Path

import pytest
import yaml
from conftest import small_overrides

from reftune.cli import main

SEED, CASES = int(os.environ.get("REFTUNE_FUZZ_SEED", "2024")), 48  # another seed: REFTUNE_FUZZ_SEED=7
VALUES = [0, -1, 1, 2, 3, 0.5, -0.5, 1.5, "x", "", "null", "true", "[1]", "{a: 1}", ".nan", "1e-3"]
DEMO_BAD = ["threads=-1", "warmup_epoch=0", "compare_k=0", "sft.epochs=0", "reft.steps=-1", "tiny.num_heads=3",
            "reft.temperature=0", "data.max_steps=0", "reward_model.lr=-1", "sft.model=x"]
NOT_MUTATED = {"out_dir", "eval_dir", "reft_run", "progress", "tensorboard", "device", "hf_id", "data_dir"}


def config_class(command: str):
    from reftune.compare.compare import CompareConfig
    from reftune.inference.evaluate import EvalConfig
    from reftune.inference.sample import SampleConfig
    from reftune.tiny import BuildTinyConfig
    from reftune.trainers.offline_st import OfflineSTConfig
    from reftune.trainers.online_st import OnlineSTConfig
    from reftune.trainers.reft import ReFTConfig
    from reftune.trainers.sft import SFTConfig

    return {"sft": SFTConfig, "train": ReFTConfig, "online-st": OnlineSTConfig, "eval": EvalConfig,
            "sample": SampleConfig, "offline-st": OfflineSTConfig, "compare": CompareConfig,
            "build-tiny": BuildTinyConfig}[command]


def leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every scalar field of a config, nested sections as dotted keys."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name in NOT_MUTATED:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def base_argv(command: str, tiny: str, warm: str) -> list[str]:
    online = [f"model={warm}", "steps=1", "questions_per_step=4", "mini_batch_size=2", "max_new_tokens=4",
              "eval_max_new_tokens=4", "eval_every=0", "tensorboard=false"]
    return {
        "sft": [f"model={warm}", "epochs=1", "batch_size=16", "eval_split=none", "tensorboard=false"],
        "train": online, "online-st": online,
        "eval": [f"model={warm}", "max_new_tokens=4"],
        "sample": [f"model={warm}", "k=2", "max_new_tokens=4", "chunk_size=8"],
        "offline-st": [f"base_model={tiny}", f"warmup_model={warm}", "k=1", "max_new_tokens=4", "sft.epochs=1",
                       "sft.batch_size=16", "sft.eval_split=none", "sft.progress=false", "sft.tensorboard=false"],
        "compare": [f"sft={warm}", "k=2", "max_new_tokens=4", "rerank=false", "chunk_size=8"],
        "build-tiny": ["model.hidden_size=16", "model.intermediate_size=16", "model.num_layers=1", "model.num_heads=2",
                       "model.vocab_size=300"],
    }[command] + (["progress=false"] if command not in ("eval", "build-tiny") else []) + \
        (["device=cpu"] if command != "build-tiny" else []) + small_overrides()


def as_yaml(argv: list[str]) -> str:
    values: dict = {}
    for o in argv:
        key, raw = o.split("=", 1)
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return yaml.safe_dump(values, sort_keys=False)


def mutate_yaml(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines(keepends=True)
    kind = rng.choice(["duplicate", "byte", "truncate", "indent"])
    if kind == "duplicate":
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif kind == "indent":
        i = rng.randrange(len(lines))
        lines[i] = "   " + lines[i]
    data = "".join(lines).encode()
    if kind == "byte":
        i = rng.randrange(len(data))
        data = data[:i] + bytes([rng.choice([0xff, 0xe9, 0x00, ord(":"), ord("["), ord("\n")])]) + data[i + 1:]
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    return data


def dataset_rows(n: int, who: str) -> list[dict]:
    return [{"item_id": f"{who}-{i}", "question": f"{who} has {i} apples and buys 2 more. How many apples?",
             "answer_cot": f"def solution():\n    return {i} + 2", "answer_value": str(i + 2)} for i in range(n)]


def mutate_dataset(rng: random.Random, rows: list[dict]) -> bytes:
    rows = [dict(r) for r in rows]
    kind = rng.choice(["byte", "truncate", "duplicate", "answer", "long", "field"])
    i = rng.randrange(len(rows))
    if kind == "answer":
        rows[i]["answer_value"] = rng.choice([[1, 2], {"x": 1}, True, None, "", "abc", 1e400])
    elif kind == "long":
        rows[i]["question"] = "many apples " * rng.choice([50, 400, 4000])
    elif kind == "field":
        del rows[i][rng.choice(["question", "answer_value", "answer_cot"])]
    elif kind == "duplicate":
        rows.insert(i, rows[i])
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind == "byte":
        j = rng.randrange(len(data))
        data = data[:j] + bytes([rng.randrange(256)]) + data[j + 1:]
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    return data


def fingerprint(*roots: Path) -> dict[str, tuple]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def sibling(tmp_path_factory, warmup_model):
    """A finished eval run beside the fuzzed ones: no case may touch it."""
    run = tmp_path_factory.mktemp("sibling") / "eval"
    assert main(["eval", f"model={warmup_model}", f"out_dir={run}", "max_new_tokens=4", "device=cpu",
                 *small_overrides()]) == 0
    return run


def make_cases(tiny: str, warm: str) -> list[dict]:
    rng = random.Random(SEED)
    commands = ["sft", "train", "online-st", "eval", "sample", "offline-st", "compare", "build-tiny", "demo"]
    cases = []
    for n in range(CASES):
        command = commands[n % len(commands)]
        if command == "demo":
            cases.append({"command": command, "argv": ["--quick", rng.choice(DEMO_BAD), "threads=1"]})
            continue
        argv = base_argv(command, tiny, warm)
        kind = rng.choice(["override", "override", "yaml", "dataset"] if command in ("eval", "sample", "sft")
                          else ["override", "override", "yaml"])
        case = {"command": command, "kind": kind}
        if kind == "override":
            keys = leaf_keys(config_class(command))
            argv += [f"{k}={rng.choice(VALUES)}" for k in rng.sample(keys, rng.choice([1, 2]))]
        elif kind == "yaml":
            case["yaml"] = mutate_yaml(rng, as_yaml([a for a in argv if "=" in a]))
            argv = ["-c", "{case}/cfg.yaml"]
        else:
            case["train"] = mutate_dataset(rng, dataset_rows(24, "Tom"))
            case["test"] = mutate_dataset(rng, dataset_rows(8, "Mia"))
            argv += ["data.name=json", "data.train_path={case}/train.jsonl", "data.test_path={case}/test.jsonl",
                     "data.validation_size=4"]
        case["argv"] = argv
        cases.append(case)
    return cases


@pytest.mark.slow  # 48 mutated inputs, each a full command run
def test_fuzzed_inputs_exit_cleanly_and_touch_nothing_else(sibling, tiny_model, warmup_model, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.chdir(tmp_path)  # relative paths a mutation produces stay in here
    protected = (sibling, Path(tiny_model), Path(warmup_model))
    before = fingerprint(*protected)
    outcomes = {0: 0, 2: 0}
    for i, case in enumerate(make_cases(tiny_model, warmup_model)):
        case_dir = tmp_path / "cases" / f"{i:02d}"
        case_dir.mkdir(parents=True)
        for name in ("yaml", "train", "test"):
            if name in case:
                (case_dir / ("cfg.yaml" if name == "yaml" else f"{name}.jsonl")).write_bytes(case[name])
        argv = [a.replace("{case}", str(case_dir)) for a in case["argv"]]
        out = ["--out", str(case_dir / "run")] if case["command"] in ("demo", "build-tiny") else \
            [f"out_dir={case_dir / 'run'}"]
        full = [case["command"], *argv, *out]
        try:
            code = main(full)
        except SystemExit as e:  # argparse: a usage mistake
            code = e.code
        except BaseException as e:  # noqa: BLE001 -- what a user would see as a traceback
            pytest.fail(f"case {i} {full}: {type(e).__name__}: {e}")
        err = capsys.readouterr().err
        assert code in (0, 2), f"case {i} {full}: exit {code}: {err[-500:]}"
        assert "Traceback" not in err, f"case {i} {full}: {err[-500:]}"
        if code == 2:
            errors = [ln for ln in err.splitlines() if ": error:" in ln]
            assert len(errors) == 1 and errors[0].startswith(f"reftune {case['command']}"), f"case {i}: {err[-500:]}"
        outcomes[code] += 1
        assert fingerprint(*protected) == before, f"case {i} {full} changed a file outside its folder"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cases"], f"case {i} wrote outside its folder"
    print(f"fuzz seed {SEED}: {outcomes[0]} ran, {outcomes[2]} refused")
    assert outcomes[0] > 0 and outcomes[2] > 0  # the mutations reach both valid and invalid inputs
