"""Reward functions: ReFT's correctness score and your own, in TRL's convention, summed with weights.

    def my_reward(prompts, completions, **columns) -> list[float | None]: ...

    reftune train reward_funcs=[correctness,my_pkg.rewards:my_reward] reward_weights=[1.0,0.5]

A function gets one entry per sampled row:
- `prompts`: the prompt each row was sampled from: text, or with a chat template its messages
  (a list of {role, content}), as TRL passes them;
- `completions`: the full CoT as text, or with a chat template `[{"role": "assistant", "content": ...}]`;
- keyword columns, each a list: `answer` (the gold answer), `question`, `id`, `cot` (the gold CoT or
  None), `options` (multiple choice), the dataset row's other fields, and reftune's own:
  `prompt_text` (the prompt as the model read it), `extracted` (the grader's answer or None),
  `correct` (the grader's verdict), `ended` (the CoT stopped at a stop token, not at
  max_new_tokens). Take `**kwargs` for the ones you do not use.

It returns a number per row, or None for "no score for this row" (that function then adds nothing
to the row's reward, as TRL's nansum). The reward is the weighted sum; each function's mean over
the rows it scored is logged (`reft/reward/<name>`). A function that raises, returns the wrong
number of values or something that is not a number is user code gone wrong, not model output: the
run stops with an error naming the function and the row (a batch that raised is re-run row by row
to find it).

Names: a built-in (`REWARD_FUNCTIONS`), `package.module:function`, or `path/to/file.py:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reftune.rewards.score import RewardSpec, correctness_score
from reftune.types import Graded

RewardFunction = Callable[..., list]


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, or that misbehaved on a row (named in the message)."""


def _correctness(spec: RewardSpec) -> RewardFunction:
    def correctness(prompts, completions, correct, extracted, **_) -> list[float]:
        """ReFT's score: spec.correct / spec.wrong / spec.none (the paper: 1 / 0.1 / 0)."""
        return [correctness_score(Graded(a, bool(c)), spec) for a, c in zip(extracted, correct)]
    return correctness


def _answered(spec: RewardSpec) -> RewardFunction:
    def answered(prompts, completions, extracted, **_) -> list[float]:
        """1 when the grader could read an answer (a format reward), else 0."""
        return [float(a is not None) for a in extracted]
    return answered


REWARD_FUNCTIONS: dict[str, Callable[[RewardSpec], RewardFunction]] = {
    "correctness": _correctness,
    "answered": _answered,
}
"""Built-in reward functions by name, each made from the run's score settings."""


@dataclass
class RewardSource:
    name: str
    """Short name in logs and errors (the function's name; the config's name where it is unique)."""
    spec: str
    """As configured: a built-in name or `module:function`."""
    fn: RewardFunction
    weight: float = 1.0


def load_function(spec: str) -> RewardFunction:
    """The user function named `package.module:function` or `path/to/file.py:function`."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise RewardFunctionError(f"reward function {spec!r}: expected a built-in ({', '.join(REWARD_FUNCTIONS)}), "
                                  f"package.module:function or path/to/file.py:function")
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except RewardFunctionError:
        raise
    except Exception as e:  # ImportError, or the module itself failing at import
        raise RewardFunctionError(f"reward function {spec!r}: cannot import {module_name} "
                                  f"({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"reward function {spec!r}: {module_name} has no function {attr!r}")
    return fn


def _import_file(path: str):
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardFunctionError(f"reward function file not found: {path} (resolved: {file.resolve()})")
    name = f"reftune_user_rewards_{abs(hash(str(file.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def build_sources(specs: list[str], weights: list[float], score: RewardSpec = RewardSpec()) -> list[RewardSource]:
    """One RewardSource per configured name (weights: one per name, or empty for 1 each)."""
    if weights and len(weights) != len(specs):
        raise RewardFunctionError(f"reward_weights has {len(weights)} weight(s) for {len(specs)} reward function(s)")
    sources = []
    for spec, weight in zip(specs, weights or [1.0] * len(specs)):
        fn = REWARD_FUNCTIONS[spec](score) if spec in REWARD_FUNCTIONS else load_function(spec)
        sources.append(RewardSource(spec if spec in REWARD_FUNCTIONS else getattr(fn, "__name__", spec), spec, fn,
                                    float(weight)))
    names = [s.name for s in sources]
    for s in sources:  # two functions of the same name from different modules: log them by their spec
        if names.count(s.name) > 1:
            s.name = s.spec
    if len({s.name for s in sources}) < len(sources):
        raise RewardFunctionError(f"reward_funcs names a function twice: {specs}")
    return sources


class RewardSet:
    """The rewards of a run: weighted reward functions scored on a batch of rows."""

    def __init__(self, sources: list[RewardSource]):
        if not sources:
            raise RewardFunctionError("no reward: list at least one reward function (reward_funcs=[correctness])")
        self.sources = sources

    @classmethod
    def correctness_only(cls, score: RewardSpec = RewardSpec()) -> "RewardSet":
        return cls(build_sources(["correctness"], [], score))

    def score(self, prompts: list, completions: list,
              columns: dict[str, list]) -> tuple[list[float], dict[str, float], dict[str, float]]:
        """(reward per row, each function's mean over the rows it scored (0 when none), the fraction
        of rows each scored). Every function appears in both dicts, so they log the same keys each step."""
        totals = [0.0] * len(completions)
        means: dict[str, float] = {}
        scored_fraction: dict[str, float] = {}
        for source in self.sources:
            values = call_checked(source, prompts, completions, columns)
            scored = [v for v in values if v is not None]
            means[source.name] = sum(scored) / len(scored) if scored else 0.0
            scored_fraction[source.name] = len(scored) / max(len(values), 1)
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] += source.weight * v
        return totals, means, scored_fraction


def call_checked(source: RewardSource, prompts: list, completions: list, columns: dict[str, list]) -> list:
    """`source.fn` on the batch, each value checked: a float, or None (see the module doc)."""
    n = len(completions)
    try:
        out = source.fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:  # user code: find the row that makes it fail
        raise _locate_failure(source, prompts, completions, columns, e) from e
    if out is None or isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise RewardFunctionError(f"reward function {source.spec}: returned {_show(out)}; expected a list of "
                                  f"{n} numbers (or None for no score), one per completion")
    if len(out) != n:
        raise RewardFunctionError(f"reward function {source.spec}: returned {len(out)} values for {n} completions; "
                                  f"expected one per completion (None for no score)")
    return [_number(source, v, i, columns) for i, v in enumerate(out)]


def _number(source: RewardSource, value, row: int, columns: dict[str, list]) -> float | None:
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, (str, bytes)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number):
        raise RewardFunctionError(f"reward function {source.spec}: row {row}{_row_id(columns, row)} got "
                                  f"{_show(value)}; expected a finite number, or None for no score")
    return number


def _locate_failure(source, prompts, completions, columns, error: Exception) -> RewardFunctionError:
    """The first row on which the function raises alone (the batch's error when none does)."""
    hint = " (reward functions take **kwargs: the dataset's columns arrive as keywords)" \
        if isinstance(error, TypeError) and "keyword" in str(error) else ""
    for i in range(len(completions)):
        try:
            source.fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                      **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as e:  # noqa: BLE001  (reported, with the row)
            return RewardFunctionError(f"reward function {source.spec}: raised {type(e).__name__}: {e} on row {i}"
                                       f"{_row_id(columns, i)}, completion {_show(completions[i])}{hint}")
    return RewardFunctionError(f"reward function {source.spec}: raised {type(error).__name__}: {error} on a batch "
                               f"of {len(completions)} rows (no single row raises alone){hint}")


def _row_id(columns: dict[str, list], row: int) -> str:
    ids = columns.get("id")
    return f" (id {ids[row]!r})" if ids and row < len(ids) else ""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
