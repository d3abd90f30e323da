"""reftune: ReFT (Reasoning with REinforced Fine-Tuning, Luong et al., ACL 2024) for any causal LM.

The Python API mirrors the CLI: each command is a config dataclass plus a `run_*` function.

    from reftune import SFTConfig, run_sft, ReFTConfig, run_reft
    sft = run_sft(SFTConfig(model="path/or/hub-id", epochs=3))
    reft = run_reft(ReFTConfig(model=sft["checkpoints"][2], steps=100))

Heavy imports (torch, transformers) happen on first use, so `import reftune` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "DataConfig": "reftune.tasks", "load_task": "reftune.tasks", "Task": "reftune.tasks", "Example": "reftune.tasks",
    "SFTConfig": "reftune.sft", "run_sft": "reftune.sft",
    "ReFTConfig": "reftune.ppo", "run_reft": "reftune.ppo",
    "EvalConfig": "reftune.evaluate", "run_eval": "reftune.evaluate", "evaluate": "reftune.evaluate",
    "DemoConfig": "reftune.demo", "run_demo": "reftune.demo",
    "TinyModelConfig": "reftune.tiny", "build_tiny_model": "reftune.tiny",
    "BuildTinyConfig": "reftune.tiny", "run_build_tiny": "reftune.tiny",
    "load_config": "reftune.config",
    "SampleConfig": "reftune.sample", "run_sample": "reftune.sample", "sample_split": "reftune.sample",
    "vote": "reftune.voting", "voting_accuracy": "reftune.voting", "voting_curve": "reftune.voting",
    "OfflineSTConfig": "reftune.offline_st", "run_offline_st": "reftune.offline_st",
    "build_offline_st_examples": "reftune.offline_st",
    "OnlineSTConfig": "reftune.online_st", "run_online_st": "reftune.online_st",
    "RewardModelConfig": "reftune.reward_model", "train_reward_model": "reftune.reward_model",
    "score_candidates": "reftune.reward_model", "rerank_accuracy": "reftune.reward_model",
    "CompareConfig": "reftune.compare", "run_compare": "reftune.compare",
}


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'reftune' has no attribute {name!r}")


__all__ = sorted(_API)
