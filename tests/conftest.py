"""Shared fixtures: the small built-in task and one tiny Llama built once per test session.

Speed: on a small, shared CPU, torch's intra-op thread pool spinning against other processes can
make these tiny models 10-20x slower (measured: a 3-epoch SFT took 60 s with 2 threads on a busy
2-core machine, 1.5 s with one). The tests pin torch (and any subprocess they start) to one thread
unless OMP_NUM_THREADS is already set.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The dataset presets' files (SVAMP, GSM8K, MathQA test sets) live in the shared data folder beside the
# repository: the library's default data folder is $REFTUNE_DATA_DIR, else ./data.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ["REFTUNE_DATA_DIR"] = str(SHARED_DATA)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from reftune.tasks import DataConfig, load_task  # noqa: E402
from reftune.tiny import TinyModelConfig, build_tiny_model, tokenizer_corpus  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab_size=300)
SMALL_DATA = dict(n_train=64, n_test=16, validation_size=8, max_steps=3)


def small_data(**overrides) -> DataConfig:
    """The small built-in task every model test uses (a fresh object: configs get mutated)."""
    return DataConfig(**{**SMALL_DATA, **overrides})


def small_overrides(prefix: str = "data.") -> list[str]:
    """The small task as CLI `key=value` overrides."""
    return [f"{prefix}{k}={v}" for k, v in SMALL_DATA.items()]


def tiny_overrides(prefix: str = "model.") -> list[str]:
    return [f"{prefix}{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="session")
def small_task():
    return load_task(small_data())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, small_task) -> str:
    """Folder of an untrained tiny Llama + tokenizer built on the small task (read-only for tests)."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_corpus(small_task),
                            TinyModelConfig(**TINY))
    return str(path)


def _warmed_up(model: str, out, task) -> str:
    from reftune.trainers.sft import SFTConfig, run_sft

    cfg = SFTConfig(model=model, data=small_data(), out_dir=str(out), epochs=2, batch_size=16, lr=3e-3,
                    eval_split="none", device="cpu", progress=False, tensorboard=False)
    return run_sft(cfg, task=task)["checkpoints"][2]


@pytest.fixture(scope="session")
def warmup_model(tmp_path_factory, tiny_model, small_task) -> str:
    """A briefly SFT-ed tiny model: the warm-up checkpoint ReFT tests start from (read-only)."""
    return _warmed_up(tiny_model, tmp_path_factory.mktemp("warmup") / "sft", small_task)


# QLoRA's 4-bit CPU kernels need layer widths that are whole 64-value blocks (reftune.models refuses others).
QLORA_TINY = {**TINY, "hidden_size": 64, "intermediate_size": 128}


@pytest.fixture(scope="session")
def qlora_tiny_model(tmp_path_factory, small_task) -> str:
    """An untrained tiny Llama 64 wide (read-only)."""
    path = build_tiny_model(tmp_path_factory.mktemp("qlora-tiny") / "model", tokenizer_corpus(small_task),
                            TinyModelConfig(**QLORA_TINY))
    return str(path)


@pytest.fixture(scope="session")
def qlora_warmup_model(tmp_path_factory, qlora_tiny_model, small_task) -> str:
    """`qlora_tiny_model` briefly SFT-ed: the QLoRA tests' starting point (read-only)."""
    return _warmed_up(qlora_tiny_model, tmp_path_factory.mktemp("qlora-warmup") / "sft", small_task)
