"""Data-parallel training under `torchrun --nproc_per_node 2` on CPU (gloo), through the documented
launch command: 1 process with batch B and 2 with B/2 each train the same (DDP and FSDP2), and a
2-process run SIGKILLed in the middle of a step resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_overrides

PLUGINS = str(Path(__file__).parent / "plugins")
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = [pytest.mark.slow,  # several torchrun processes per test
              pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the interpreter")]

REFT = ["questions_per_step=8", "samples_per_prompt=2", "mini_batch_size=16", "ppo_epochs=2", "lr=1e-3",
        "lam=1.0", "vf_coef=1.0", "value_dropout=0.0", "score_none=0.5", "max_new_tokens=24", "eval_max_new_tokens=24",
        "device=cpu", "tensorboard=false", "progress=false"]
SFT = ["epochs=2", "batch_size=8", "lr=3e-3", "eval_max_new_tokens=24", "log_every=1", "device=cpu",
       "tensorboard=false", "progress=false"]
# score_none=0.5: the barely warmed-up tiny model rarely answers; a reward for that too gives the
# value loss something to fit, so the shared backbone moves. (Constant scores whiten to 0 advantage.)
# Statistics that are means over rows (or sequences) of the whole batch: the same however it is split.
# (Token means over each process's share, e.g. entropy, are averaged per process and may differ.)
ROW_MEANS = ("reft/score", "reft/accuracy", "reft/kl", "reft/response_length", "reft/pg_loss", "reft/vf_loss",
             "reft/grad_norm", "eval/validation_accuracy")


def launch(args: list[str], nproc: int, env_extra: dict | None = None, check: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([PLUGINS, os.environ.get("PYTHONPATH", "")]),
           **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "reftune.cli", *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "reftune.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    if check:
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() and "elastic" not in line]
        assert proc.returncode == 0, "\n".join(errors[:10]) + "\n" + proc.stderr[-3000:]
    return proc


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_close_runs(a: Path, b: Path, keys, atol=1e-4):
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in keys:
            if k in x or k in y:
                assert x[k] == pytest.approx(y[k], abs=atol, rel=1e-3), (k, x["step"], x[k], y[k])


def assert_weights_close(wa: dict, wb: dict, lr: float = 1e-3, few: float = 1e-3) -> None:
    """Equal to float tolerance. AdamW divides each gradient by its own running scale, so for a
    weight whose gradient is ~0 the summation-order noise of a split batch can become a step of up
    to lr: a handful of such elements (a fraction below `few`) may differ by ~lr; everything else
    agrees to 1e-5."""
    assert wa.keys() == wb.keys()
    diffs = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    assert diffs.max() <= 4 * lr and (diffs > 1e-5).float().mean() < few, (diffs.max(), (diffs > 1e-5).sum())


@pytest.fixture(scope="module")
def reft_single(warmup_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single"
    launch(["train", f"model={warmup_model}", f"out_dir={out}", "steps=3", "eval_every=3", "save_every=3",
            "engine=row_seeded_engine:RowSeededSampler", *REFT, *small_overrides()], 1)
    return out


@pytest.mark.parametrize("parallel, extra", [("ddp", []), ("fsdp2", []), ("ddp", ["micro_batch_size=4"])],
                         ids=["ddp", "fsdp2", "ddp-accumulation"])
def test_reft_two_processes_train_like_one(parallel, extra, reft_single, warmup_model, tmp_path):
    """2 processes with half of each mini-batch (ddp-accumulation: that half as 2 micro-batches of
    4) train like 1 process with the whole mini-batch of 16 in one pass."""
    out = tmp_path / parallel
    launch(["train", f"model={warmup_model}", f"out_dir={out}", "steps=3", "eval_every=3", "save_every=3",
            f"parallel={parallel}", "engine=row_seeded_engine:RowSeededSampler", *REFT, *extra, *small_overrides()], 2)
    assert_close_runs(reft_single, out, ROW_MEANS)
    wa = weights(reft_single / "checkpoints" / "step-000003" / "policy")
    wb = weights(out / "checkpoints" / "step-000003" / "policy")
    start = weights(Path(warmup_model))
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], start[k]) for k in wa)  # it trained
    # (measured: 11 of 30,240 elements beyond 1e-5 for ddp and fsdp2, 34 with accumulation's second split)
    assert_weights_close(wa, wb, few=2e-3 if extra else 1e-3)
    assert torch.load(out / "checkpoints" / "step-000003" / "value_head.pt")["linear.weight"].abs().sum() > 0
    assert json.loads((out / "result.json").read_text())["history"][-1]["step"] == 3


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_sft_two_processes_train_like_one(parallel, tiny_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(["sft", f"model={tiny_model}", f"out_dir={one}", *SFT, *small_overrides()], 1)
    launch(["sft", f"model={tiny_model}", f"out_dir={two}", f"parallel={parallel}", *SFT, *small_overrides()], 2)
    assert_close_runs(one, two, ("train/loss", "train/grad_norm", "epoch/train_loss", "epoch/validation_accuracy"))
    assert_weights_close(weights(one / "checkpoints" / "epoch-2"), weights(two / "checkpoints" / "epoch-2"))


def test_two_process_reft_killed_mid_step_resumes_exactly(warmup_model, tmp_path):
    """Uninterrupted 2-process run A; run B is SIGKILLed (every process) during the rollout of step 3,
    after the step-2 checkpoint; `--resume` then reproduces A's metrics and weights."""
    common = ["steps=4", "eval_every=2", "save_every=2", "engine=row_seeded_engine:KillingSampler", *REFT,
              "value_dropout=0.1", *small_overrides()]
    a, b = tmp_path / "A", tmp_path / "B"
    launch(["train", f"model={warmup_model}", f"out_dir={a}", *common], 2)
    killed = launch(["train", f"model={warmup_model}", f"out_dir={b}", *common], 2,
                    env_extra={"REFTUNE_TEST_KILL_AT_CALL": "3"}, check=False)
    assert killed.returncode != 0
    assert json.loads((b / "latest.json").read_text())["step"] == 2
    launch(["train", "--resume", str(b)], 2)
    ra = [{k: v for k, v in r.items() if "seconds" not in k and k != "time"} for r in records(a)]
    rb = [{k: v for k, v in r.items() if "seconds" not in k and k != "time"} for r in records(b)]
    assert ra == rb
    wa, wb = weights(a / "checkpoints" / "step-000004" / "policy"), weights(b / "checkpoints" / "step-000004" / "policy")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(b.rglob(".tmp-*")) and not list(b.rglob(".old-*"))


@pytest.fixture(scope="module")
def rm_samples(small_task, tmp_path_factory) -> Path:
    """A samples file over the training split as `reftune sample` writes it: per question the gold CoT
    (correct) and the same CoT with a wrong last number (wrong), so the classifier has both kinds."""
    path = tmp_path_factory.mktemp("rm") / "train_samples.jsonl"
    lines = []
    for i, ex in enumerate(small_task.train[:21]):  # 41 rows (the last question: gold only)
        gold = small_task.target(ex)
        wrong = [] if i == 20 else [{"completion": gold + " + 1", "answer": None, "correct": False}]
        lines.append(json.dumps({"id": ex.id, "question": ex.question, "gold": ex.answer, "samples": [
            {"completion": gold, "answer": ex.answer, "correct": True}, *wrong]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_reward_model_two_processes_train_like_one(parallel, rm_samples, warmup_model, tmp_path):
    """`reftune reward-model` under torchrun: 2 processes with half of each batch train as 1 process
    does. 41 rows in batches of 8 end with a batch of 1: rank 1 then runs a zero-weight stand-in."""
    common = [f"samples={rm_samples}", f"model={warmup_model}", "epochs=2", "batch_size=8", "lr=1e-3",
              "balance_classes=true", "device=cpu", "progress=false", *small_overrides()]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(["reward-model", f"out_dir={one}", *common], 1)
    launch(["reward-model", f"out_dir={two}", f"parallel={parallel}", *common], 2)
    ha = json.loads((one / "result.json").read_text())["history"]
    hb = json.loads((two / "result.json").read_text())["history"]
    for x, y in zip(ha, hb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4) and x["train_accuracy"] == y["train_accuracy"]
    wa, wb = weights(one / "checkpoints" / "final"), weights(two / "checkpoints" / "final")
    start = weights(Path(warmup_model))
    assert "score.weight" in wa and not torch.equal(wa["model.norm.weight"], start["model.norm.weight"])  # it trained
    assert_weights_close(wa, wb)


def killed_after_epoch(args: list[str], nproc: int, run: Path, epoch: int) -> None:
    """Start `reftune sft` (under torchrun when nproc > 1) and SIGKILL all of its processes once
    the resume state of `epoch` is written."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]) + \
        ["-m", "reftune.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            if json.loads((run / "latest.json").read_text())["epoch"] >= epoch:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("parallel, extra", [("fsdp2", []), ("ddp", ["lora_r=4", "lora_quantize=nf4"])],
                         ids=["fsdp2", "ddp-qlora"])
def test_two_process_sft_killed_after_an_epoch_resumes_exactly(parallel, extra, request, tmp_path):
    """2-process SFT (fsdp2: sharded AdamW state; ddp + QLoRA: the adapter in the resume state)
    SIGKILLed after epoch 1 of 3: `--resume` reproduces the straight run's metrics and weights."""
    if extra:
        pytest.importorskip("bitsandbytes")
    tiny_model = request.getfixturevalue("qlora_tiny_model" if extra else "tiny_model")
    common = ["epochs=3", "save_epochs=[3]", f"parallel={parallel}", *extra, *SFT[1:], *small_overrides()]
    a, b = tmp_path / "A", tmp_path / "B"
    launch(["sft", f"model={tiny_model}", f"out_dir={a}", *common], 2)
    killed_after_epoch(["sft", f"model={tiny_model}", f"out_dir={b}", *common], 2, b, 1)
    assert not (b / "result.json").exists()
    saved_step = json.loads((b / "latest.json").read_text())["step"]
    kept = [r for r in records(b) if r["step"] <= saved_step]
    launch(["sft", "--resume", str(b)], 2)
    assert records(b)[:len(kept)] == kept  # (timestamps included): it continued, it did not start again
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("time", "epoch/elapsed")} for r in rs]  # noqa: E731
    assert untimed(records(a)) == untimed(records(b))
    wa, wb = weights(a / "checkpoints" / "epoch-3"), weights(b / "checkpoints" / "epoch-3")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
