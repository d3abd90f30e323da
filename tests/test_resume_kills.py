"""Every kill leaves a run that resumes: each command runs in a subprocess that is
SIGKILLed at a seeded random instant (a few each), also while `--resume` runs and while a
checkpoint is being written; afterwards `--resume` (or a rerun) succeeds, the result is the
uninterrupted run's bit for bit, and no temporary copy or lock file is left.

The uninterrupted reference runs in-process through the same CLI; both use one thread, so their
numbers are identical."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_overrides
from safetensors.torch import load_file

from reftune.cli import main
from reftune.runs import LOCK_NAME, read_jsonl

pytestmark = pytest.mark.slow  # each test kills and resumes a few subprocess runs

QUIET = ["progress=false", "device=cpu", "tensorboard=false"]
TIMING = ("seconds", "time", "elapsed")
RUNNER = "import sys\nfrom reftune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
# Injected into a killed process only: makes one kind of write pause, after announcing it in a
# marker file, so the test can kill it exactly there.
SLOW_WRITE = """
import os, pathlib, time
import reftune.runs as R
_what, _marker = os.environ["SLOW_WHAT"], pathlib.Path(os.environ["SLOW_MARKER"])
def _pause(name):
    if _what in name and not _marker.exists():
        _marker.write_text(name)
        time.sleep(60)
_replace_dir, _atomic_write_text = R.replace_dir, R.atomic_write_text
def replace_dir(new, final):
    _pause(str(final))
    return _replace_dir(new, final)
def atomic_write_text(path, text, fsync=True):
    if _what in str(path):
        tmp = pathlib.Path(path).with_name(".tmp-" + pathlib.Path(path).name + "-" + str(os.getpid()))
        tmp.write_text(text[: len(text) // 2])  # half written when the kill comes
        _pause(str(path))
    return _atomic_write_text(path, text, fsync)
R.replace_dir, R.atomic_write_text = replace_dir, atomic_write_text
"""


def start(argv: list, slow: tuple[str, Path] | None = None) -> subprocess.Popen:
    code = (SLOW_WRITE if slow else "") + RUNNER
    env = None
    if slow:
        import os

        env = {**os.environ, "SLOW_WHAT": slow[0], "SLOW_MARKER": str(slow[1])}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)


def kill_when(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 120) -> bool:
    """SIGKILL `proc` `delay` seconds after `ready()` holds (True), or leave it if it ends first."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if delay:
        time.sleep(delay)
    killed = proc.poll() is None
    proc.kill()
    proc.wait()
    return killed


def claimed_by(run: Path, proc: subprocess.Popen):
    def ready() -> bool:
        try:
            return json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid
        except (OSError, ValueError, KeyError):
            return False
    return ready


def started(run: Path):
    return lambda: (run / "config.yaml").exists()


def assert_clean(run: Path) -> None:
    leftovers = [p for p in run.rglob("*") if p.name.startswith((".tmp-", ".old-")) or p.name == LOCK_NAME]
    assert not leftovers, leftovers


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} and {b} differ"


def delays(seed: int, n: int, span: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, span) for _ in range(n)]


def finish(argv: list, run: Path, resume_cmd: str | None) -> None:
    """What a user does after a kill: --resume when the run got as far as its config, else rerun."""
    if resume_cmd and (run / "config.yaml").exists():
        assert main([resume_cmd, "--resume", str(run)]) == 0
    else:
        assert main([str(a) for a in argv]) == 0


# ---------------------------------------------------------------------------------- online trainers

def online_argv(cmd: str, model: str, run: Path) -> list:
    return [cmd, f"model={model}", f"out_dir={run}", "steps=3", "questions_per_step=4", "mini_batch_size=2",
            "max_new_tokens=12", "eval_max_new_tokens=12", "eval_every=1", "save_every=1", "seed=3",
            *QUIET, *small_overrides()]


@pytest.fixture(scope="module", params=["train", "online-st"])
def online_reference(request, warmup_model, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / request.param
    t0 = time.time()
    assert main([str(a) for a in online_argv(request.param, warmup_model, run)]) == 0
    return request.param, run, time.time() - t0


def assert_same_online_run(ref: Path, run: Path) -> None:
    assert_clean(run)
    last = "checkpoints/step-000003/policy"
    assert_same_weights(ref / last, run / last)
    assert_same_weights(ref / "checkpoints/best/policy", run / "checkpoints/best/policy")
    assert untimed(read_jsonl(run / "metrics.jsonl")) == untimed(read_jsonl(ref / "metrics.jsonl"))
    assert json.loads((run / "result.json").read_text())["history"] == json.loads((ref / "result.json").read_text())["history"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-000003"]


def test_online_kill_at_random_instants(online_reference, warmup_model, tmp_path):
    cmd, ref, span = online_reference
    for i, delay in enumerate(delays(13, 2, span)):
        run = tmp_path / f"kill{i}"
        argv = online_argv(cmd, warmup_model, run)
        kill_when(start(argv), started(run), delay)
        finish(argv, run, cmd)
        assert_same_online_run(ref, run)


def test_online_kill_during_resume(online_reference, warmup_model, tmp_path):
    cmd, ref, span = online_reference
    run = tmp_path / "run"
    argv = online_argv(cmd, warmup_model, run)
    kill_when(start(argv), lambda: (run / "latest.json").exists())  # right after the first step checkpoint
    for delay in delays(29, 2, span / 2):  # the resume itself is killed, twice, once it holds the folder
        proc = start([cmd, "--resume", run])
        kill_when(proc, claimed_by(run, proc), delay)
    finish(argv, run, cmd)
    assert_same_online_run(ref, run)


@pytest.mark.parametrize("what", ["step-000002", "best", "metrics.jsonl"])
def test_online_kill_during_a_checkpoint_write(what, online_reference, warmup_model, tmp_path):
    """Killed while step-2's or best's new copy waits to be swapped in, or while --resume rewrites
    metrics.jsonl: the next start removes the stale copy; best/ and metrics.jsonl stay whole."""
    cmd, ref, _ = online_reference
    if cmd == "online-st" and what != "step-000002":
        pytest.skip("the same loop and checkpoint code as train: one write kill is enough here")
    run, marker = tmp_path / "run", tmp_path / "marker"
    argv = online_argv(cmd, warmup_model, run)
    if what == "metrics.jsonl":
        kill_when(start(argv), lambda: (run / "latest.json").exists())
        assert kill_when(start([cmd, "--resume", run], slow=(what, marker)), marker.exists)
    else:
        assert kill_when(start(argv, slow=(what, marker)), marker.exists)
        assert list((run / "checkpoints").glob(f".tmp-{what}-*"))  # the kill left a temporary copy
    finish(argv, run, cmd)
    assert_same_online_run(ref, run)


# ---------------------------------------------------------------------------------- sft

def sft_argv(model: str, run: Path) -> list:
    return ["sft", f"model={model}", f"out_dir={run}", "epochs=3", "batch_size=16", "lr=3e-3",
            "eval_split=validation", "eval_max_new_tokens=8", "log_every=1", "save_epochs=[3]", *QUIET,
            *small_overrides()]


@pytest.fixture(scope="module")
def sft_reference(tiny_model, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "sft"
    t0 = time.time()
    assert main([str(a) for a in sft_argv(tiny_model, run)]) == 0
    return run, time.time() - t0


def assert_same_sft_run(ref: Path, run: Path) -> None:
    assert_clean(run)
    assert_same_weights(ref / "checkpoints" / "epoch-3", run / "checkpoints" / "epoch-3")
    a, b = (json.loads((r / "result.json").read_text()) for r in (ref, run))
    assert untimed(a["history"]) == untimed(b["history"]) and a["best_epoch"] == b["best_epoch"]
    assert untimed(read_jsonl(run / "metrics.jsonl")) == untimed(read_jsonl(ref / "metrics.jsonl"))


def test_sft_resume_after_epoch_1_of_3_is_exact(sft_reference, tiny_model, tmp_path):
    """Killed right after epoch 1's state is saved (epoch 1 is not a kept checkpoint: the resume
    state has its own weights), resumed: same weights, history and metrics as the straight run."""
    ref, _ = sft_reference
    run = tmp_path / "run"

    def after_epoch_1():
        try:
            return json.loads((run / "latest.json").read_text())["epoch"] >= 1
        except (OSError, ValueError):
            return False

    assert kill_when(start(sft_argv(tiny_model, run)), after_epoch_1)
    assert not (run / "result.json").exists()
    assert main(["sft", "--resume", str(run)]) == 0
    assert_same_sft_run(ref, run)


def test_sft_kill_at_random_instants(sft_reference, tiny_model, tmp_path):
    ref, span = sft_reference
    for i, delay in enumerate(delays(7, 2, span)):
        run = tmp_path / f"kill{i}"
        argv = sft_argv(tiny_model, run)
        kill_when(start(argv), started(run), delay)
        finish(argv, run, "sft")
        assert_same_sft_run(ref, run)


# ---------------------------------------------------------------------------------- sample and eval

def sample_argv(model: str, run: Path) -> list:
    return ["sample", f"model={model}", f"out_dir={run}", "k=3", "chunk_size=2", "max_new_tokens=12", *QUIET[:2],
            *small_overrides()]


def eval_argv(model: str, run: Path) -> list:
    return ["eval", f"model={model}", f"out_dir={run}", "max_new_tokens=12", "device=cpu", *small_overrides()]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_kill_at_random_instants(command, warmup_model, tmp_path):
    make = sample_argv if command == "sample" else eval_argv
    ref = tmp_path / "reference"
    t0 = time.time()
    assert main([str(a) for a in make(warmup_model, ref)]) == 0
    span = time.time() - t0
    name = "test_samples.jsonl" if command == "sample" else "test_predictions.jsonl"
    for i, delay in enumerate(delays(5, 3, span)):
        run = tmp_path / f"kill{i}"
        argv = make(warmup_model, run)
        kill_when(start(argv), started(run), delay)
        # sample resumes by rerunning; eval is rerun with --overwrite when it had finished its writes
        rerun = argv + (["--overwrite"] if command == "eval" and (run / "test_summary.json").exists() else [])
        assert main([str(a) for a in rerun]) == 0
        lines = (run / name).read_text().splitlines()
        assert sorted(lines) == sorted((ref / name).read_text().splitlines())
        assert len({json.loads(x)["id"] for x in lines}) == len(lines)
        assert_clean(run)
