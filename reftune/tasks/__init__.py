"""Tasks: the built-in arithmetic generator and real datasets, behind one `load_task`.

Owns: a `Task`'s splits, its prompt format, its gold targets and how its completions are graded
(`base.py`), the built-in generator (`arithmetic.py`), dataset loaders (`datasets.py`).
May import: `reftune.types`, `reftune.rewards`; never engines, trainers or inference.
"""

from reftune.tasks.base import DataConfig, Example, Graded, Task


def load_task(cfg: DataConfig) -> Task:
    """The task named by `cfg.name`: `arithmetic` is generated, the rest are read from files."""
    if cfg.name == "arithmetic":
        from reftune.tasks.arithmetic import load_arithmetic_task

        return load_arithmetic_task(cfg)
    from reftune.tasks.datasets import load_dataset_task

    return load_dataset_task(cfg)


__all__ = ["DataConfig", "Example", "Graded", "Task", "load_task"]
