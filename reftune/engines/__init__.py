"""Generation engines: one `Generator` interface (`base.py`), one file per engine, one registry.

Owns: sampling CoTs from a policy and returning them as a `Rollout` (token ids + masks).
May import: `reftune.batching`, `reftune.models` (token conventions, context), `reftune.runs` (notes) and
third-party libraries; never tasks, rewards or trainers.

Adding an engine: write `engines/<name>.py` with a class taking
`(model, tokenizer, batch_size=..., seed=..., model_path=...)`, subclassing `Generator` and
implementing `generate` and `sync_weights` (and `supports_value_head` / `set_value_head` when it
can apply a trainer's value head), then add one line to `ENGINES`. Validation (`check_engine`), construction
(`make_generator`) and the error message all read that dict. An engine that lives outside
reftune needs no registration: name it `engine=package.module:Class`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from reftune.engines.base import Generator, Rollout  # noqa: F401  (the interface, re-exported)


@dataclass(frozen=True)
class EngineSpec:
    target: str
    """`module:Class` of the engine, imported only when the engine is built."""
    summary: str
    """One line for `--help` and error messages."""


ENGINES: dict[str, EngineSpec] = {
    "auto": EngineSpec("", "the default: static on a CPU, cached on a GPU (vllm stays opt-in until measured there)"),
    "cached": EngineSpec("reftune.engines.cached:CachedSampler", "built-in KV-cache sampler on the live policy"),
    "graphed": EngineSpec("reftune.engines.graphed:GraphedSampler",
                          "static's sampler with fixed shapes, decode steps as CUDA graphs (GPU)"),
    "hf": EngineSpec("reftune.engines.hf:HFGenerator", "transformers model.generate on the live policy"),
    "static": EngineSpec("reftune.engines.static:StaticSampler", "preallocated-KV sampler, live policy (CPU)"),
    "vllm": EngineSpec("reftune.engines.vllm:VLLMGenerator", "vLLM in this process, weights synced in memory (reftune[vllm])"),
}


def _spec(name: str) -> EngineSpec | None:
    """The registered engine `name`, or an engine of your own named `package.module:Class`."""
    if name in ENGINES:
        return ENGINES[name]
    if ":" in name and all(part.replace(".", "").replace("_", "").isalnum() for part in name.split(":", 1)):
        return EngineSpec(name, "an engine outside reftune")
    return None


def check_engine(name: str, key: str = "engine") -> None:
    """Refuse an unknown engine name, listing the registered ones."""
    if _spec(name) is None:
        known = ", ".join(f"{n} ({s.summary})" for n, s in ENGINES.items())
        raise ValueError(f"{key} must be one of {', '.join(ENGINES)} or package.module:Class, got {name!r}; "
                         f"engines: {known}")


def resolve_engine(name: str, model) -> str:
    """The engine `auto` stands for, by where `model` lives: `static` on a CPU (1.8x `generate`'s
    tokens/s there: docs/performance.md, bench/bench_rollout.py), `cached` elsewhere (static's gains
    come from per-call overhead that a GPU hides behind its kernels; not measured on one yet).
    Other names are returned as given."""
    if name != "auto":
        return name
    return "static" if next(model.parameters()).device.type == "cpu" else "cached"


def make_generator(name: str, model, tokenizer, batch_size: int = 64, seed: int | None = None,
                   model_path: str | None = None) -> Generator:
    """Build engine `name` over `model` (whose weights live in folder `model_path`, for engines that
    load their own copy)."""
    check_engine(name)
    name = resolve_engine(name, model)
    module, cls = _spec(name).target.split(":")
    try:
        engine = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"engine {name!r}: cannot import {module}:{cls} ({e})") from None
    built = engine(model, tokenizer, batch_size=batch_size, seed=seed, model_path=model_path)
    if not hasattr(built, "supports_value_head"):  # an outside engine written before the interface said so
        built.supports_value_head = False
    return built
