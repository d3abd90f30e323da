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
    "SFTConfig": "reftune.trainers.sft", "run_sft": "reftune.trainers.sft",
    "ReFTConfig": "reftune.trainers.reft", "run_reft": "reftune.trainers.reft",
    "EvalConfig": "reftune.inference.evaluate", "run_eval": "reftune.inference.evaluate", "evaluate": "reftune.inference.evaluate",
    "DemoConfig": "reftune.demo", "run_demo": "reftune.demo",
    "TinyModelConfig": "reftune.tiny", "build_tiny_model": "reftune.tiny",
    "BuildTinyConfig": "reftune.tiny", "run_build_tiny": "reftune.tiny",
    "load_config": "reftune.config",
    "SampleConfig": "reftune.inference.sample", "run_sample": "reftune.inference.sample", "sample_split": "reftune.inference.sample",
    "vote": "reftune.inference.voting", "voting_accuracy": "reftune.inference.voting", "voting_curve": "reftune.inference.voting",
    "OfflineSTConfig": "reftune.trainers.offline_st", "run_offline_st": "reftune.trainers.offline_st",
    "build_offline_st_examples": "reftune.trainers.offline_st",
    "OnlineSTConfig": "reftune.trainers.online_st", "run_online_st": "reftune.trainers.online_st",
    "RewardModelConfig": "reftune.trainers.reward_model", "train_reward_model": "reftune.trainers.reward_model",
    "RewardModelRunConfig": "reftune.trainers.reward_model", "run_reward_model": "reftune.trainers.reward_model",
    "score_candidates": "reftune.inference.rerank", "rerank_accuracy": "reftune.inference.rerank",
    "RewardSpec": "reftune.rewards", "grade_batch": "reftune.rewards", "ENGINES": "reftune.engines",
    "make_generator": "reftune.engines",
    "CompareConfig": "reftune.compare.compare", "run_compare": "reftune.compare.compare",
}


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'reftune' has no attribute {name!r}")


__all__ = sorted(_API)
