"""Tasks: the built-in arithmetic generator and real datasets, behind one `load_task`.

Owns: a `Task`'s splits, its prompt format, its gold targets and how its completions are graded
(`base.py`), the one prompt builder, plain or chat template (`prompts.py`), the built-in generator
(`arithmetic.py`), dataset loaders (`datasets.py`) and TRL's conversational rows (`conversations.py`).
May import: `reftune.types`, `reftune.rewards`; never engines, trainers or inference.
"""

from reftune.tasks.base import DataConfig, Example, Graded, Task
from reftune.tasks.prompts import PromptFormatError


def load_task(cfg: DataConfig, tokenizer=None) -> Task:
    """The task named by `cfg.name`: `arithmetic` is generated, the rest are read from files. With
    `tokenizer`, its prompts are rendered for it (`Task.with_tokenizer`: the chat template)."""
    if cfg.name == "arithmetic":
        from reftune.tasks.arithmetic import load_arithmetic_task

        task = load_arithmetic_task(cfg)
    else:
        from reftune.tasks.datasets import load_dataset_task

        task = load_dataset_task(cfg)
    return task.with_tokenizer(tokenizer) if tokenizer is not None else task


__all__ = ["DataConfig", "Example", "Graded", "PromptFormatError", "Task", "load_task"]
