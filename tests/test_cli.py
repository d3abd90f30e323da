"""The `reftune` command line (reftune.cli.main): exit codes, error messages, and each command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_overrides, tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from reftune.cli import main

REPO = Path(__file__).resolve().parents[1]
# The demo's overrides that keep its stages off the terminal and out of TensorBoard in tests.
QUIET = [f"{stage}.{key}=false" for stage in ("sft", "reft") for key in ("progress", "tensorboard")]


def reftune_executable() -> str | None:
    candidate = Path(sys.executable).parent / "reftune"
    return str(candidate) if candidate.exists() else shutil.which("reftune")


def result_json(stdout: str) -> dict:
    """The command's JSON result: the last thing on stdout (sft and demo print progress lines first)."""
    return json.loads(stdout[stdout.index("{\n"):])


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------- errors: exit 2

def test_unknown_config_key(capsys, tmp_path):
    code, out, err = run_main(capsys, "sft", "epochz=3", f"out_dir={tmp_path / 'run'}")
    assert code == 2 and out == ""
    assert "'epochz'" in err and err.startswith("reftune sft: error:")
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not load


def test_unknown_key_in_config_file(capsys, tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model: x\nlearning_rate: 1e-5\n")
    code, _, err = run_main(capsys, "sft", "-c", cfg)
    assert code == 2 and "'learning_rate'" in err and str(cfg) in err


def test_wrong_type(capsys):
    code, _, err = run_main(capsys, "train", "steps=ten")
    assert code == 2 and "'steps'" in err and "'ten'" in err


def test_malformed_config_file(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: x\nepochs: [1, 2\n")
    code, _, err = run_main(capsys, "sft", "--config", cfg)
    assert code == 2 and str(cfg) in err and "malformed YAML" in err and "line" in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_main(capsys, "eval", "-c", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml" in err


@pytest.mark.parametrize("command", ["sft", "train", "eval"])
def test_missing_model_path(command, capsys, tmp_path):
    code, out, err = run_main(capsys, command, "model=/nonexistent/x", f"out_dir={tmp_path / 'run'}",
                              *small_overrides())
    assert code == 2 and out == ""
    assert "/nonexistent/x" in err and "not found" in err


def test_no_model_given(capsys, tmp_path):
    code, _, err = run_main(capsys, "sft", f"out_dir={tmp_path / 'run'}", *small_overrides())
    assert code == 2 and "no model given" in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["fly"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2


def test_subprocess_exit_code_and_stderr(tmp_path):
    exe = reftune_executable()
    if exe is None:
        pytest.skip("the reftune console script is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, "sft", "epochz=3", f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "'epochz'" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    proc = subprocess.run([exe, "sft", "model=/nonexistent/x", f"out_dir={tmp_path / 'run2'}", *small_overrides()],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "/nonexistent/x" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------- commands

@pytest.mark.slow
def test_demo_quick(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    start = time.time()
    code, out, err = run_main(capsys, "demo", "--quick", "--out", out_dir, "threads=1", *QUIET)
    wall = time.time() - start
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert result_json(out) == summary  # printed as the command's result
    for name in ("warmup", "sft", "reft"):
        entry = summary[name]
        assert isinstance(entry["accuracy"], float) and 0.0 <= entry["accuracy"] <= 1.0
        predictions = (out_dir / "eval" / name / "test_predictions.jsonl").read_text().splitlines()
        assert entry["n"] == len(predictions) > 0  # quick mode: the whole (small) test split
        assert AutoModelForCausalLM.from_pretrained(entry["checkpoint"]) is not None
    assert summary["seed"] == 0 and summary["quick"] is True
    assert isinstance(summary["wall_seconds"], float) and 0 < summary["wall_seconds"] <= wall + 1
    # what decided the run's float rounding (the study tells AVX2 from AVX512 runs by it)
    assert summary["numerics"] == {"torch": torch.__version__, "threads": 1,
                                   "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    report = (out_dir / "report.md").read_text()
    assert "| warmup |" in report and "| reft |" in report and "learning_curves.png" in report
    assert (out_dir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "config.yaml").exists()

    # a second demo into the same folder refuses to overwrite it
    code, _, err = run_main(capsys, "demo", "--quick", "--out", out_dir)
    assert code == 2 and "already holds a demo run" in err


@pytest.mark.slow
def test_demo_as_a_command_ends_cleanly(tmp_path):
    """The demo as a user runs it, in its own process with ReFT in a second one, which samples one
    step off in a third (max_staleness=1): exit 0 and nothing on stderr but its own lines (a ReFT
    process terminated while it exits would leave a semaphore to the resource tracker, which prints
    a 'leaked semaphore' warning)."""
    proc = subprocess.run([sys.executable, "-m", "reftune.cli", "demo", "--quick", "--out", str(tmp_path / "demo"),
                           "threads=1", "reft.max_staleness=1", *QUIET], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["reft"]["checkpoint"]


@pytest.mark.slow
def test_demo_runs_reft_beside_the_baselines_with_the_same_results(capsys, tmp_path):
    """parallel_stages (the default) trains ReFT in a second process while Offline-ST and Online-ST
    run: every method's results equal those of the stages one after the other."""
    summaries = {}
    for parallel in ("true", "false"):
        out_dir = tmp_path / parallel
        code, _, err = run_main(capsys, "demo", "--quick", "--out", out_dir, "threads=1", f"parallel_stages={parallel}",
                                *QUIET)
        assert code == 0, err
        summaries[parallel] = json.loads((out_dir / "summary.json").read_text())
    a, b = summaries["true"], summaries["false"]
    assert "reft_beside_baselines" in a["stage_seconds"] and "tiny_sft_reft" in b["stage_seconds"]
    for method in ("warmup", "sft", "reft", "offline_st", "online_st"):
        for key in ("accuracy", "vote_accuracy", "rerank_accuracy"):
            assert a[method][key] == b[method][key], (method, key)
    wa = load_file(str(Path(a["reft"]["checkpoint"]) / "model.safetensors"))
    wb = load_file(str(Path(b["reft"]["checkpoint"]) / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def built_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    code = main(["build-tiny", "--out", str(out), *small_overrides(), *tiny_overrides()])
    assert code == 0
    return out


def test_build_tiny(built_tiny, capsys):
    capsys.readouterr()
    meta = json.loads((built_tiny / "reftune_tiny.json").read_text())
    assert meta["hidden_size"] == 32 and meta["num_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(built_tiny)
    tok = AutoTokenizer.from_pretrained(built_tiny)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert len(tok) <= 300 and model.config.vocab_size == len(tok)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    # digits are single tokens; any text round-trips
    assert tok.tokenize("170") == ["1", "7", "0"]
    text = "Mia has 17 shells. ünïcode ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_eval_on_the_built_model(built_tiny, capsys, tmp_path):
    capsys.readouterr()
    out_dir = tmp_path / "eval"
    code, out, err = run_main(capsys, "eval", f"model={built_tiny}", f"out_dir={out_dir}", "split=validation",
                              "max_new_tokens=16", *small_overrides())
    assert code == 0, err
    printed = json.loads(out)
    assert printed["split"] == "validation" and printed["n"] == 8 and 0.0 <= printed["accuracy"] <= 1.0
    assert json.loads((out_dir / "validation_summary.json").read_text()) == printed
    predictions = [json.loads(line) for line in (out_dir / "validation_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and {"id", "question", "completion", "answer", "gold", "correct"} <= set(predictions[0])
    assert (out_dir / "config.yaml").exists()


def test_sft_then_train_then_resume(built_tiny, capsys, tmp_path):
    """sft -> train from its checkpoint -> train --resume with more steps, all through the CLI."""
    common = [*small_overrides(), "progress=false", "tensorboard=false"]
    code, out, err = run_main(capsys, "sft", f"model={built_tiny}", f"out_dir={tmp_path / 'sft'}", "epochs=1",
                              "batch_size=16", "lr=3e-3", "eval_split=none", *common)
    assert code == 0, err
    sft = result_json(out)
    assert "history" not in sft and sft["best_epoch"] == 1
    reft_dir = tmp_path / "reft"
    train = ["train", f"model={sft['best_checkpoint']}", f"out_dir={reft_dir}", "questions_per_step=8",
             "mini_batch_size=4", "max_new_tokens=16", "eval_max_new_tokens=16", *common]
    code, out, err = run_main(capsys, *train, "steps=1")
    assert code == 0, err
    assert result_json(out)["last_checkpoint"].endswith("step-000001/policy")
    code, out, err = run_main(capsys, "train", "--resume", reft_dir, "steps=2")
    assert code == 0, err
    assert result_json(out)["last_checkpoint"].endswith("step-000002/policy")
    assert [json.loads(line)["step"] for line in (reft_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a fresh `train` into the same folder refuses to overwrite it
    code, _, err = run_main(capsys, *train, "steps=1")
    assert code == 2 and "already holds checkpoints" in err
