"""The prompt-length guard: a prompt longer than the model's context (`max_position_embeddings` in
its config.json) or than `data.max_prompt_tokens` is refused before anything is written or any
model is loaded (a 54 KB question once made `eval` try to allocate 21 GB).

Rule (`data.long_prompts`): `error` (the default) refuses the run and says how many prompts of
which split are too long and which is the longest; `skip` leaves those questions out of the split,
counts them in `task.stats["skipped_long_prompts"]` and says so on stderr. Prompts are measured as
the model sees them when sampling (`task.prompt(ex, for_generation=True)`), without truncation:
cutting a math question changes it. A prompt counts the tokenizer's BOS where it adds one
(`reftune.models.encode_prompt`). How far an answer may run past a prompt is bounded by the
engines (`reftune.engines.base.new_token_budget`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from reftune.models import context_from_config, encode_prompt
from reftune.tasks import DataConfig, Task


class PromptTooLong(ValueError):
    """Prompts over the limit with `data.long_prompts=error`."""


def model_context(name_or_path: str) -> int | None:
    """The model's context length from its config.json (None when it does not say or is remote)."""
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        try:
            from transformers import AutoConfig

            values = AutoConfig.from_pretrained(name_or_path).to_dict()
        except Exception:
            return None
    return context_from_config(values)


def guard_prompts(task: Task, tokenizer, context: int | None, data: DataConfig, splits: tuple[str, ...]) -> Task:
    """`task` bound to `tokenizer` (`Task.with_tokenizer`: its chat template), without the too-long
    prompts of `splits` (see the module doc)."""
    task = task.with_tokenizer(tokenizer)
    cap = data.max_prompt_tokens or None
    limits = [x for x in (context, cap) if x]
    if not limits:
        return task
    limit = min(limits)
    why = (f"data.max_prompt_tokens={cap}" if cap == limit else f"the model's context, max_position_embeddings={context}")
    kept: dict[str, list] = {}
    skipped: dict[str, int] = {}
    for split in dict.fromkeys(splits):
        examples = getattr(task, split)
        if not examples:
            continue
        prompts = [task.prompt(ex, for_generation=True) for ex in examples]
        lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]  # as the engines feed them (BOS too)
        long = [i for i, n in enumerate(lengths) if n > limit]
        if not long:
            continue
        worst = max(long, key=lambda i: lengths[i])
        if data.long_prompts != "skip":
            raise PromptTooLong(
                f"{len(long)} of {len(examples)} {split} prompt(s) are longer than {limit} tokens ({why}); the "
                f"longest is {examples[worst].id!r} with {lengths[worst]} tokens. Shorten them, set "
                f"data.max_prompt_tokens, or set data.long_prompts=skip to leave them out (counted)")
        drop = set(long)
        kept[split] = [ex for i, ex in enumerate(examples) if i not in drop]
        skipped[split] = len(long)
    if not skipped:
        return task
    from reftune.runs import note

    for split, n in skipped.items():
        note(f"left out {n} of {n + len(kept[split])} {split} question(s) whose prompt is longer than {limit} "
             f"tokens ({why}; data.long_prompts=skip)")
        if not kept[split]:
            raise PromptTooLong(f"every {split} prompt is longer than {limit} tokens ({why}): nothing left to use")
    stats = {**task.stats, "skipped_long_prompts": skipped}
    return dataclasses.replace(task, **kept, stats=stats)
