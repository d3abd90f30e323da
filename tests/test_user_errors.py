"""Every mistake a user can make gets a clear error and loses nothing: one test per kind of mistake
(a bad key or value, a broken model folder, a long prompt, a busy or finished run folder, a kill),
through `reftune.cli.main` in-process. Errors exit 2 with one line
`reftune <cmd>: error: ...` naming what is wrong; nothing is written into a folder before the
command knows it will run; earlier outputs are never replaced without --overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_overrides, tiny_overrides

from reftune import model_files, models
from reftune.cli import main
from reftune.config import ConfigError, load_config
from reftune.demo import DemoConfig, apply_quick
from reftune.runs import LOCK_NAME, RunLogger, read_jsonl, replace_dir

QUIET = ["progress=false", "device=cpu"]


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"reftune {command}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def eval_args(model, out, *extra) -> list[str]:
    return ["eval", f"model={model}", f"out_dir={out}", "max_new_tokens=4", "device=cpu", *small_overrides(), *extra]


def sample_args(model, out, *extra) -> list[str]:
    return ["sample", f"model={model}", f"out_dir={out}", "k=2", "max_new_tokens=4", "chunk_size=4", *QUIET,
            *small_overrides(), *extra]


def online_args(cmd, model, out, *extra) -> list[str]:
    return [cmd, f"model={model}", f"out_dir={out}", "steps=1", "questions_per_step=4", "mini_batch_size=2",
            "max_new_tokens=4", "eval_max_new_tokens=4", "tensorboard=false", *QUIET, *small_overrides(), *extra]


def sft_args(model, out, *extra) -> list[str]:
    return ["sft", f"model={model}", f"out_dir={out}", "epochs=1", "batch_size=16", "eval_split=none",
            "tensorboard=false", *QUIET, *small_overrides(), *extra]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, warmup_model):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(eval_args(warmup_model, out)) == 0
    return out


# =========================================================================== output lost or corrupted

def test_build_tiny_refuses_an_existing_model_folder(capsys, tmp_path, warmup_model):
    model = tmp_path / "model"
    shutil.copytree(warmup_model, model)
    before = tree_hash(model)
    code, err = run(capsys, "build-tiny", "--out", model, *small_overrides(), *tiny_overrides())
    assert code == 2 and "already holds a model" in one_error_line(err, "build-tiny")
    assert tree_hash(model) == before
    code, err = run(capsys, "build-tiny", "--out", model, "--overwrite", *small_overrides(), *tiny_overrides())
    assert code == 0, err
    assert tree_hash(model) != before and (model / "config.json").exists()
    assert not (model / LOCK_NAME).exists() and not list(tmp_path.glob(".tmp-*"))


def test_eval_refuses_to_overwrite_predictions(capsys, evaluated, warmup_model, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(evaluated, out)
    before = tree_hash(out)
    code, err = run(capsys, *eval_args(warmup_model, out))
    assert code == 2 and "--overwrite" in one_error_line(err, "eval")
    assert tree_hash(out) == before
    code, err = run(capsys, *eval_args(warmup_model, out, "--overwrite"))
    assert code == 0, err


@pytest.mark.parametrize("command", ["eval", "offline-st", "compare"])
def test_a_failing_command_leaves_config_yaml_alone(command, capsys, evaluated, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(evaluated, out)
    before = tree_hash(out)
    argv = {"eval": eval_args("/nonexistent/model", out),
            "offline-st": ["offline-st", "base_model=/nonexistent/model", "warmup_model=/nonexistent/model",
                           f"out_dir={out}", *QUIET, *small_overrides()],
            "compare": ["compare", "sft=/nonexistent/model", f"out_dir={out}", *QUIET, *small_overrides()]}[command]
    code, err = run(capsys, *argv)
    assert code == 2 and "/nonexistent/model" in one_error_line(err, command)
    assert tree_hash(out) == before


def test_offline_st_refuses_samples_of_another_warmup_model(capsys, tmp_path, tiny_model, warmup_model):
    common = [f"base_model={tiny_model}", f"out_dir={tmp_path / 'run'}", "k=1", "max_new_tokens=4", *QUIET,
              "sft.epochs=1", "sft.batch_size=16", "sft.eval_split=none", "sft.progress=false",
              "sft.tensorboard=false", *small_overrides()]
    assert main(["offline-st", f"warmup_model={warmup_model}", *common]) == 0
    samples = tmp_path / "run" / "train_samples.jsonl"
    before = samples.read_bytes()
    capsys.readouterr()
    code, err = run(capsys, "offline-st", f"warmup_model={tiny_model}", *common)
    assert code == 2 and "warmup_model" in one_error_line(err, "offline-st")
    assert samples.read_bytes() == before
    code, err = run(capsys, "offline-st", f"warmup_model={warmup_model}", *common)  # same settings: resumes
    assert code == 0, err


def test_a_second_command_on_a_folder_in_use_is_refused(capsys, tmp_path, warmup_model):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from reftune.runs import RunFolder; "
                               "f = RunFolder.claim(sys.argv[1], 'reftune sample'); print('held', flush=True); "
                               "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run(capsys, *sample_args(warmup_model, out))
        line = one_error_line(err, "sample")
        assert code == 2 and "in use" in line and str(holder.pid) in line
        assert not (out / "test_samples.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and taken over
    code, err = run(capsys, *sample_args(warmup_model, out))
    assert code == 0, err
    assert "no longer running" in err and not (out / LOCK_NAME).exists()
    ids = [json.loads(x)["id"] for x in (out / "test_samples.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 16


# =========================================================================== runs that cannot be resumed

def test_a_torn_metrics_line_is_dropped_and_reported(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "to')
    logger = RunLogger(tmp_path, tensorboard=False)
    assert "metrics.jsonl: dropped a torn last line" in capsys.readouterr().err
    logger.log(3, {"x": 1.0})
    logger.truncate_after(2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert path.read_text().endswith("\n")


def test_resume_after_a_torn_metrics_line(capsys, tmp_path, warmup_model):
    out = tmp_path / "run"
    assert main(online_args("train", warmup_model, out, "save_every=1")) == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "reft/sco')
    code, err = run(capsys, "train", "--resume", out, "steps=2")
    assert code == 0, err
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_a_run_with_only_best_restarts_from_step_0(capsys, tmp_path, warmup_model):
    """The stated rule: no step checkpoint yet -> --resume restarts from step 0 (same seed, same run);
    a fresh start is refused and says so."""
    out = tmp_path / "run"
    assert main(online_args("train", warmup_model, out, "eval_every=1")) == 0
    reference = [r for r in read_jsonl(out / "metrics.jsonl")]
    for p in (out / "checkpoints").glob("step-*"):
        shutil.rmtree(p)
    (out / "latest.json").unlink()
    (out / "result.json").unlink()
    code, err = run(capsys, *online_args("train", warmup_model, out))
    assert code == 2 and "--resume" in one_error_line(err, "train")
    code, err = run(capsys, "train", "--resume", out)
    assert code == 0, err
    assert "restarts from step 0" in err
    untimed = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k and k != "time"} for r in rows]  # noqa
    assert untimed(read_jsonl(out / "metrics.jsonl")) == untimed(reference)


def test_stale_temporary_copies_are_removed_or_put_back(capsys, tmp_path, warmup_model):
    out = tmp_path / "run"
    assert main(online_args("train", warmup_model, out, "eval_every=1")) == 0
    ck = out / "checkpoints"
    shutil.copytree(ck / "step-000001", ck / ".tmp-step-000002-999999")
    (ck / "best").rename(ck / ".old-best-999999")  # a kill between the two renames of a replacement
    code, err = run(capsys, "train", "--resume", out, "steps=2")
    assert code == 0, err
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob(".old-*"))
    assert (ck / "best" / "policy" / "model.safetensors").exists()


def test_best_is_never_missing_while_it_is_replaced(tmp_path):
    final, new = tmp_path / "best", tmp_path / ".tmp-best-1"
    final.mkdir()
    (final / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    inode = final.stat().st_ino
    replace_dir(new, final)
    assert (final / "v").read_text() == "new" and not new.exists()
    if sys.platform.startswith("linux"):
        assert final.stat().st_ino != inode  # swapped in one step (renameat2 exchange), not deleted first


def test_sft_resume_exists_and_its_refusal_is_true(capsys, tmp_path, tiny_model):
    out = tmp_path / "run"
    assert main(sft_args(tiny_model, out)) == 0
    code, err = run(capsys, *sft_args(tiny_model, out))
    assert code == 2 and f"reftune sft --resume {out}" in one_error_line(err, "sft")
    code, err = run(capsys, "sft", "--resume", out)  # a finished run: nothing left to do
    assert code == 0, err


# =========================================================================== tracebacks for ordinary mistakes

@pytest.mark.parametrize("command", ["eval", "sample", "sft", "train"])
def test_truncated_safetensors(command, capsys, tmp_path, warmup_model):
    model = tmp_path / "model"
    shutil.copytree(warmup_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = {"eval": eval_args(model, tmp_path / "run"), "sample": sample_args(model, tmp_path / "run"),
            "sft": sft_args(model, tmp_path / "run"), "train": online_args("train", model, tmp_path / "run")}[command]
    code, err = run(capsys, *argv)
    line = one_error_line(err, command)
    assert code == 2 and "model.safetensors is truncated" in line
    assert not (tmp_path / "run").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root ignores permissions: a read-only tmpfs instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without a way to make a read-only folder")
    else:
        path.chmod(0o555)
    yield path
    if mounted:
        subprocess.run(["umount", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


@pytest.mark.parametrize("command", ["demo", "build-tiny", "sft", "train", "eval", "sample", "offline-st",
                                     "online-st", "compare"])
def test_read_only_output_folder(command, capsys, read_only_dir, tiny_model, warmup_model):
    out = read_only_dir / "x"
    argv = {"demo": ["demo", "--quick", "--out", out], "build-tiny": ["build-tiny", "--out", out, *tiny_overrides()],
            "sft": sft_args(tiny_model, out), "train": online_args("train", warmup_model, out),
            "online-st": online_args("online-st", warmup_model, out), "eval": eval_args(warmup_model, out),
            "sample": sample_args(warmup_model, out),
            "offline-st": ["offline-st", f"base_model={tiny_model}", f"warmup_model={warmup_model}", f"out_dir={out}",
                           *QUIET],
            "compare": ["compare", f"sft={warmup_model}", f"out_dir={out}", *QUIET]}[command]
    code, err = run(capsys, *argv, *([] if command in ("demo", "build-tiny") else small_overrides()))
    line = one_error_line(err, command)
    assert code == 2 and "cannot write in" in line and "read-only" in line.lower()


def test_device_cuda_without_a_gpu(capsys, tmp_path, warmup_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run(capsys, *eval_args(warmup_model, tmp_path / "run", "device=cuda"))
    assert code == 2 and "CUDA is not available" in one_error_line(err, "eval")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["sample", "offline-st", "online-st", "compare"])
@pytest.mark.parametrize("temperature", [0, -1])
def test_temperature_must_be_positive(command, temperature, capsys, tmp_path, warmup_model):
    argv = {"sample": sample_args(warmup_model, tmp_path / "run"),
            "offline-st": ["offline-st", f"base_model={warmup_model}", f"warmup_model={warmup_model}",
                           f"out_dir={tmp_path / 'run'}"],
            "online-st": online_args("online-st", warmup_model, tmp_path / "run"),
            "compare": ["compare", f"sft={warmup_model}", f"out_dir={tmp_path / 'run'}"]}[command]
    code, err = run(capsys, *argv, f"temperature={temperature}")
    line = one_error_line(err, command)
    assert code == 2 and f"temperature={float(temperature)!r}" in line and "> 0" in line and "reftune eval" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv_key", [
    ("sft", "batch_size=0"), ("sft", "grad_accum=0"), ("sft", "log_every=0"), ("sft", "epochs=0"),
    ("sft", "eval_split=bogus"), ("train", "mini_batch_size=0"), ("train", "steps=0"), ("online-st", "steps=0"),
    ("eval", "max_new_tokens=0"), ("eval", "max_new_tokens=-3"), ("sample", "max_new_tokens=0"),
    ("eval", "gen_batch_size=0"), ("sample", "chunk_size=0"), ("train", "max_new_tokens=-1"),
])
def test_zero_and_negative_sizes_name_key_value_and_range(argv_key, capsys, tmp_path, warmup_model):
    command, override = argv_key
    base = {"sft": sft_args(warmup_model, tmp_path / "run"), "train": online_args("train", warmup_model, tmp_path / "run"),
            "online-st": online_args("online-st", warmup_model, tmp_path / "run"),
            "eval": eval_args(warmup_model, tmp_path / "run"), "sample": sample_args(warmup_model, tmp_path / "run")}
    code, err = run(capsys, *base[command], override)
    line = one_error_line(err, command)
    key, value = override.split("=")
    assert code == 2 and f"{key}=" in line and value in line and ("must be" in line)
    assert not (tmp_path / "run").exists()


def test_num_heads_must_divide_hidden_size(capsys, tmp_path):
    code, err = run(capsys, "build-tiny", "--out", tmp_path / "m", "model.hidden_size=32", "model.num_heads=3")
    assert code == 2 and "model.num_heads=3" in one_error_line(err, "build-tiny")
    assert not (tmp_path / "m").exists()


def test_threads_must_not_be_negative(capsys, tmp_path):
    code, err = run(capsys, "demo", "--quick", "--out", tmp_path / "d", "threads=-1")
    assert code == 2 and "threads=-1" in one_error_line(err, "demo")
    assert not (tmp_path / "d").exists()


def test_hf_dataset_without_the_datasets_package(capsys, tmp_path, warmup_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails as if not installed
    code, err = run(capsys, *eval_args(warmup_model, tmp_path / "run", "data.name=hf", "data.hf_id=gsm8k"))
    line = one_error_line(err, "eval")
    assert code == 2 and "pip install datasets" in line and "reftune[hf]" in line


# =========================================================================== silently accepted

@pytest.mark.parametrize("command", ["sample", "train"])
def test_negative_temperature_is_refused(command, capsys, tmp_path, warmup_model):
    argv = sample_args(warmup_model, tmp_path / "r") if command == "sample" else online_args("train", warmup_model,
                                                                                           tmp_path / "r")
    code, err = run(capsys, *argv, "temperature=-1")
    assert code == 2 and "temperature=-1.0" in one_error_line(err, command)


def test_demo_quick_keeps_what_the_user_set(tmp_path):
    overrides = ["sft.epochs=3", "warmup_epoch=2", "data.n_train=40", "quick=true"]
    cfg = apply_quick(load_config(DemoConfig, None, overrides),
                      explicit={"sft.epochs", "warmup_epoch", "data.n_train"})
    assert (cfg.sft.epochs, cfg.warmup_epoch, cfg.data.n_train) == (3, 2, 40)
    assert (cfg.data.n_test, cfg.reft.steps, cfg.tiny.hidden_size) == (32, 2, 32)  # the rest shrinks
    # the Python API: a value that differs from the demo's default counts as the user's
    api = apply_quick(DemoConfig(quick=True, warmup_epoch=2))
    assert api.warmup_epoch == 2 and api.sft.epochs == 2
    # an explicit value equal to the default still wins on the CLI
    cfg = apply_quick(load_config(DemoConfig, None, ["sft.epochs=18"]), explicit={"sft.epochs"})
    assert cfg.sft.epochs == 18 and cfg.warmup_epoch == 1


@pytest.mark.parametrize("gold", [[1, 2], {"x": 1}, "[1, 2]", True])
def test_a_list_or_object_as_gold_answer_is_refused(gold, capsys, tmp_path, warmup_model):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "Tom has 3 apples. How many?", "answer_value": gold}) + "\n")
    code, err = run(capsys, *eval_args(warmup_model, tmp_path / "run", "data.name=json", f"data.test_path={data}",
                                       "data.test_only=true"))
    line = one_error_line(err, "eval")
    assert code == 2 and str(data) in line and "line 1" in line and "answer_value" in line


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: 1\ndata:\n  style: nl\n  style: program\n")
    from reftune.trainers.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"cfg.yaml: line 4: duplicate key 'style' \(first given on line 3\)"):
        load_config(SFTConfig, path)


# =========================================================================== unclear messages

def test_non_utf8_config_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"epochs: 1\nmodel: caf\xe9\n")
    code, err = run(capsys, "sft", "-c", path)
    line = one_error_line(err, "sft")
    assert code == 2 and f"{path}: line 2, column 11: byte 0xe9 is not valid UTF-8" in line


def test_non_utf8_data_file_names_file_and_line(capsys, tmp_path, warmup_model):
    data = tmp_path / "test.jsonl"
    data.write_bytes(b'{"question": "q", "answer_value": "1"}\n{"question": "caf\xe9", "answer_value": "2"}\n')
    code, err = run(capsys, *eval_args(warmup_model, tmp_path / "run", "data.name=json", f"data.test_path={data}",
                                       "data.test_only=true"))
    assert code == 2 and f"{data}: line 2" in one_error_line(err, "eval")


@pytest.mark.parametrize("missing, message", [
    ("tokenizer.json", "no tokenizer vocabulary"), ("tokenizer_config.json", "tokenizer_config.json is missing"),
    ("config.json", "config.json is missing"), ("model.safetensors", "no weights file"),
])
def test_a_model_folder_missing_a_file_names_it(missing, message, capsys, tmp_path, warmup_model):
    model = tmp_path / "model"
    shutil.copytree(warmup_model, model)
    (model / missing).unlink()
    code, err = run(capsys, *eval_args(model, tmp_path / "run"))
    assert code == 2 and message in one_error_line(err, "eval")


def test_a_mistyped_relative_path_does_not_wait_for_the_hub(capsys, tmp_path, monkeypatch, warmup_model):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    asked = []  # every attempt to reach the Hub or any other host
    monkeypatch.setattr(model_files, "_hub_reachable", lambda *a, **k: asked.append("hub") or True)
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: asked.append(address))
    code, err = run(capsys, *eval_args("runs/nope", tmp_path / "run"))
    assert code == 2 and "model path not found: runs/nope" in one_error_line(err, "eval")
    assert asked == []


def test_a_run_folder_as_model_points_at_its_checkpoints(capsys, tmp_path, warmup_model):
    run_dir = Path(warmup_model).parents[1]  # .../sft/checkpoints/epoch-2 -> .../sft
    code, err = run(capsys, *eval_args(run_dir, tmp_path / "run"))
    assert code == 2 and "checkpoints/best/policy or checkpoints/epoch-N" in one_error_line(err, "eval")


def test_epochs_zero_and_zero_steps_say_what_is_allowed(capsys, tmp_path, tiny_model):
    code, err = run(capsys, *sft_args(tiny_model, tmp_path / "run", "epochs=0"))
    assert "epochs=0: must be an integer >= 1" in one_error_line(err, "sft")
    code, err = run(capsys, *sft_args(tiny_model, tmp_path / "run", "batch_size=0"))
    assert "batch_size=0: must be an integer >= 1" in one_error_line(err, "sft")


def test_an_oversized_validation_split_of_the_built_in_task_is_refused(capsys, tmp_path, tiny_model):
    """The built-in task draws its validation split like its training set: a size past data.n_train
    is refused before any problem is drawn, instead of generating for minutes."""
    code, err = run(capsys, *sft_args(tiny_model, tmp_path / "run", "data.validation_size=999999"))
    line = one_error_line(err, "sft")
    assert code == 2 and "data.validation_size=999999: must be at most data.n_train (64)" in line
    assert not (tmp_path / "run").exists()


# =========================================================================== prompt length

def long_question_data(tmp_path: Path) -> Path:
    data = tmp_path / "test.jsonl"
    rows = [{"question": f"Tom has {i} apples. How many apples does Tom have?", "answer_value": str(i)}
            for i in range(3)]
    rows.append({"item_id": "long-one", "question": "Tom has apples. " * 3500 + "How many?", "answer_value": "1"})  # 54 KB
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_a_prompt_longer_than_the_context_is_refused_with_a_count(capsys, tmp_path, warmup_model, monkeypatch):
    data = long_question_data(tmp_path)
    loaded = []  # the refusal comes from the tokenizer alone, before any weights load
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loaded.append(a))
    code, err = run(capsys, *eval_args(warmup_model, tmp_path / "run", "data.name=json", f"data.test_path={data}",
                                       "data.test_only=true"))
    line = one_error_line(err, "eval")
    assert code == 2 and "1 of 4 test prompt(s) are longer than 512 tokens" in line and "'long-one'" in line
    assert "max_position_embeddings=512" in line and "data.long_prompts=skip" in line
    assert not (tmp_path / "run").exists() and loaded == []


def test_long_prompts_skip_rule_counts_them(capsys, tmp_path, warmup_model):
    data = long_question_data(tmp_path)
    code, err = run(capsys, *eval_args(warmup_model, tmp_path / "run", "data.name=json", f"data.test_path={data}",
                                       "data.test_only=true", "data.long_prompts=skip"))
    assert code == 0, err
    assert "left out 1 of 4 test question(s)" in err
    summary = json.loads((tmp_path / "run" / "test_summary.json").read_text())
    assert summary["n"] == 3 and summary["skipped_long_prompts"] == 1


def test_a_configured_prompt_cap(capsys, tmp_path, warmup_model):
    code, err = run(capsys, *eval_args(warmup_model, tmp_path / "run", "data.max_prompt_tokens=8"))
    assert code == 2 and "data.max_prompt_tokens=8" in one_error_line(err, "eval")


def test_model_loaders_accept_pathlib_paths(tiny_model):
    """Python callers pass `Path` objects as often as strings: both load the same model."""
    from pathlib import Path

    import torch

    from reftune.models import load_causal_lm, load_tokenizer

    assert load_tokenizer(Path(tiny_model)).eos_token_id == load_tokenizer(tiny_model).eos_token_id
    model = load_causal_lm(Path(tiny_model), torch.device("cpu"), torch.float32)
    assert model.config.vocab_size == load_causal_lm(tiny_model, torch.device("cpu"), torch.float32).config.vocab_size
