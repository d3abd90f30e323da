"""Tasks: the built-in arithmetic generator and real datasets, behind one `load_task`."""

from reftune.tasks.base import DataConfig, Example, Graded, Task


def load_task(cfg: DataConfig) -> Task:
    """The task named by `cfg.name`: `arithmetic` is generated, the rest are read from files."""
    if cfg.name == "arithmetic":
        from reftune.tasks.arithmetic import load_arithmetic_task

        return load_arithmetic_task(cfg)
    from reftune.tasks.datasets import load_dataset_task

    return load_dataset_task(cfg)


__all__ = ["DataConfig", "Example", "Graded", "Task", "load_task"]
