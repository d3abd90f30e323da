"""The demo's background stage (ReFT in a second process) never outlives the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SCRIPT = """
import time
from reftune.demo import BackgroundStage
stage = BackgroundStage(time.sleep, 600)
print(stage.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_killed_demo_takes_its_background_stage_with_it():
    demo = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    stage_pid = None
    try:
        stage_pid = int(demo.stdout.readline())
        assert _alive(stage_pid)
        demo.send_signal(signal.SIGKILL)  # no clean-up in the demo at all
        demo.wait()
        deadline = time.monotonic() + 30
        while _alive(stage_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(stage_pid), "the ReFT stage kept running after the demo was killed"
    finally:
        demo.kill()
        if stage_pid is not None and _alive(stage_pid):  # a failed check must not leave it sleeping
            os.kill(stage_pid, signal.SIGKILL)


def test_the_demos_reft_samples_one_step_off_on_a_cpu_only(monkeypatch, tmp_path, capsys):
    """The demo's ReFT samples one step off (max_staleness=1) in a process on the CPU; where
    `device=auto` finds a GPU it runs synchronously instead of being refused there. Dynamic
    sampling stays on either way."""
    import torch

    from reftune.demo import DemoConfig, reft_stage_config

    cfg = DemoConfig()
    assert reft_stage_config(cfg, "warmup", tmp_path).max_staleness == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = reft_stage_config(cfg, "warmup", tmp_path)
    assert on_gpu.max_staleness == 0 and on_gpu.model == "warmup" and on_gpu.out_dir == str(tmp_path / "reft")
    assert cfg.reft.dynamic_sampling and on_gpu.dynamic_sampling
    assert "max_staleness=0" in capsys.readouterr().out
