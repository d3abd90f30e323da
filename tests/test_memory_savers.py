"""Memory savers change memory, not training: gradient checkpointing trains like without it."""

from __future__ import annotations

import pytest

from conftest import small_data
from reftune.trainers.reft import ReFTConfig, run_reft


def test_gradient_checkpointing_trains_identically(warmup_model, small_task, tmp_path):
    def run(name, **kw):
        cfg = ReFTConfig(model=warmup_model, data=small_data(), out_dir=str(tmp_path / name), steps=2,
                         questions_per_step=4, samples_per_prompt=2, mini_batch_size=4, lr=1e-3, score_none=0.5,
                         max_new_tokens=16, eval_every=0, eval_max_new_tokens=16, save_every=0, device="cpu",
                         progress=False, tensorboard=False, **kw)
        return run_reft(cfg, task=small_task)["history"]

    plain, checkpointed = run("plain"), run("ckpt", gradient_checkpointing=True)
    for a, b in zip(plain, checkpointed):
        for key in ("reft/score", "reft/kl", "reft/pg_loss", "reft/vf_loss", "reft/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
