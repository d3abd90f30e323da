"""bench/gpu_check.py at toy size (`--toy`: a tiny Qwen2 in fp32 on the CPU), in a subprocess as it is
run on a GPU: every engine and mode gets a row with real numbers, the FLOPs follow the stated
formula, and the Markdown table shows the same rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reftune.engines import ENGINES

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = ("seconds_per_iteration", "seconds_update", "peak_memory_gib", "flops_per_iteration", "mfu", "seconds_run")
REFT_POSITIVE = ("seconds_generate", "seconds_passes", "generation_tokens_per_s", "response_tokens",
                 "mfu_generate", "mfu_passes", "mfu_update")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--toy", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_engine_and_mode_has_a_row(report):
    data, _ = report
    expected = {("sft", "-", m) for m in ("full", "lora")} | {("reft", e, m) for e in ENGINES for m in ("full", "lora")}
    assert len(data["rows"]) == len(expected)
    assert {(r["phase"], r["engine"], r["mode"]) for r in data["rows"]} == expected
    vllm_here = importlib.util.find_spec("vllm") is not None
    for row in data["rows"]:
        if row["engine"] == "vllm" and not vllm_here:
            assert row["status"].startswith("skipped: vllm is not importable"), row
        else:
            assert row["status"] == "ok", row
        assert "warnings" not in row, row  # graphed captures nothing on a CPU: no fallback to report
    auto = [r for r in data["rows"] if r["engine"] == "auto"]
    assert auto and all(r["resolved_engine"] == "static" for r in auto)  # the library's choice on a CPU


def test_rows_hold_positive_measurements(report):
    data, _ = report
    assert data["matmul_peak"]["tflops"] > 0 and data["matmul_peak"]["dtype"] == "float32"
    for row in (r for r in data["rows"] if r["status"] == "ok"):
        keys = POSITIVE + (REFT_POSITIVE if row["phase"] == "reft" else ("train_tokens_per_s", "tokens_per_iteration"))
        for key in keys:
            assert isinstance(row[key], (int, float)) and row[key] > 0, (row["phase"], row["engine"], row["mode"], key)
        assert row["iterations"] >= 2 and row["measured_iterations"] >= 1
        if row["phase"] == "reft":  # the split is the whole iteration
            parts = row["seconds_generate"] + row["seconds_passes"] + row["seconds_update"]
            assert parts == pytest.approx(row["seconds_per_iteration"], rel=1e-6)
            assert row["response_tokens"] <= data["workload"]["max_new_tokens"]


def test_model_is_the_stated_qwen2_shape(report):
    data, _ = report
    model = data["model"]
    # By hand for the toy (hidden 32, 4 heads of 8, 2 KV heads, MLP 64, 2 layers, 512 tied rows):
    # per layer q 32*32+32 = 1056, k and v 32*16+16 = 528 each, o 32*32 = 1024, MLP 3*32*64 = 6144,
    # two norms 64: 9344; 2 layers + the final norm 32 = 18720; the embedding 512*32 = 16384.
    assert model["non_embedding_params"] == 18720 and model["params"] == 18720 + 16384
    assert model["tokenizer_vocab"] < model["model_vocab"] == 512
    assert model["static_engine_fallback"] is None  # `static` really runs its own loop on this model


def test_flops_follow_the_stated_formula(report):
    data, _ = report
    params, work = data["model"]["params"], data["workload"]
    for row in (r for r in data["rows"] if r["status"] == "ok" and r["phase"] == "reft"):
        tokens = work["questions"] * (work["prompt_tokens_mean"] + row["response_tokens"])
        assert row["flops_generate"] == pytest.approx(2 * params * tokens)
        assert row["flops_passes"] == pytest.approx(2 * row["flops_generate"])  # old policy + reference
        backward = 2 if row["mode"] == "full" else 1  # LoRA: no weight gradients for the frozen base
        assert row["flops_update"] == pytest.approx(work["ppo_epochs"] * (1 + backward) * row["flops_generate"])
        assert row["mfu"] == pytest.approx(row["flops_per_iteration"] / row["seconds_per_iteration"]
                                           / (data["matmul_peak"]["tflops"] * 1e12))
    for row in (r for r in data["rows"] if r["status"] == "ok" and r["phase"] == "sft"):
        backward = 2 if row["mode"] == "full" else 1
        assert row["flops_per_iteration"] == pytest.approx(2 * params * row["tokens_per_iteration"] * (1 + backward))


def test_markdown_table_shows_every_row(report):
    data, md = report
    lines = md.splitlines()
    assert lines[0].startswith("# reftune GPU check: ")
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| phase |")]
    assert len(table) == len(data["rows"])
    for line, row in zip(table, data["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["phase"] and cells[1].split(" ")[0] == row["engine"] and cells[2] == row["mode"]
        assert cells[-1].startswith(row["status"])
        if row["status"] == "ok":
            assert float(cells[4]) == pytest.approx(row["seconds_per_iteration"], rel=1e-2)  # s/iter, 3 digits
            assert float(cells[10]) == pytest.approx(100 * row["mfu"], rel=1e-2)  # % of peak
