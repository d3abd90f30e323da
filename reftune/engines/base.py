"""The interface every generation engine implements, and the `Rollout` it returns.

Every engine returns token ids, not just text, because PPO must score exactly the tokens that were
sampled (re-tokenising decoded text can give other tokens).

Layout of a rollout (the one every trainer relies on):
- `prompt_ids` (B, P): prompts LEFT-padded with the pad id; `prompt_mask` 1 on real prompt tokens.
- `response_ids` (B, R): sampled tokens, RIGHT-padded after the stop token; `response_mask` 1 on
  every generated token up to and including the first stop token (EOS, or another EOS id of the
  model's generation_config), 0 on padding.
- rows come in groups: the `num_samples` samples of prompt i are rows i*n .. i*n+n-1.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch

from reftune.batching import pad_with_mask


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    """Decoded responses without special tokens."""
    prompt_index: list[int]
    """Row -> index of its prompt in the list passed to `generate`."""
    ended_with_eos: torch.Tensor
    """(B,) bool: the response ended with a stop token (False: cut at max_new_tokens or the context)."""
    sampling_logprobs: torch.Tensor | None = None
    """(B, R) log-probs of the sampled tokens as the engine computed them, where it reports them
    (static, vLLM); trainers log the gap to their own forward pass, or use them (engine_old_logprobs)."""
    sampling_values: torch.Tensor | None = None
    """(B, R) V(state before each response token) from the engine's own hidden states, where an engine
    was given the trainer's value head (static)."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


class Generator(Protocol):
    """What trainers and evaluation need from a generation engine.

    Engines are built by `reftune.engines.make_generator(name, model, tokenizer, ...)`. A response
    ends at the first stop token (`reftune.models.stop_token_ids`: the tokenizer's EOS and the
    model's `generation_config` EOS ids) and never runs past the model's context
    (`GenerationLimits`). Subclassing this class gives an engine the defaults below.
    """

    supports_value_head: bool = False
    """True when the engine can apply a trainer's value head to its own decoding steps
    (`set_value_head`) and reports `sampling_logprobs`: ReFT then takes PPO's old log-probs and
    values from the rollout (`engine_old_logprobs`) instead of one more forward pass."""

    def generate(
        self, prompts: list[str], *, num_samples: int = 1, greedy: bool = False, temperature: float = 1.0,
        top_p: float = 1.0, max_new_tokens: int = 256,
    ) -> Rollout: ...

    def sync_weights(self) -> None:
        """Make the engine sample from the current policy weights (no-op when it shares them).
        Every trainer calls it after each optimizer phase."""
        ...

    def set_value_head(self, head: torch.nn.Module | None) -> None:
        """Give the engine the trainer's value head (None: none): sampled rollouts then carry
        `sampling_values`. Only where `supports_value_head`."""
        raise NotImplementedError(f"{type(self).__name__} does not apply a value head (supports_value_head is False)")


class GenerationLimits:
    """What bounds a response for one engine's model and tokenizer: its stop tokens and the
    model's context. A call whose longest prompt plus `max_new_tokens` would pass the context gets
    fewer new tokens (`budget`), said once per engine in a note: with learned position embeddings
    (GPT-2, OPT) a position past the context does not exist, and rotary models were not trained
    there. The budget is the call's (its longest prompt's), so every engine cuts at the same step."""

    def __init__(self, model, tokenizer, context: int | None = None):
        from reftune.models import model_context, stop_token_ids

        self.stop_ids = stop_token_ids(model, tokenizer)
        self.context = context if context is not None else model_context(model)
        self._noted = False
        self._stops: dict[torch.device, torch.Tensor] = {}  # stop_ids as a tensor, per device

    def budget(self, prompt_lengths: list[int], max_new_tokens: int, engine: str = "engine") -> int:
        """New tokens every row of a call may sample (see the class doc)."""
        longest = max(prompt_lengths, default=0)
        budget = new_token_budget(self.context, longest, max_new_tokens)
        if budget < max_new_tokens and not self._noted:
            from reftune.runs import note

            self._noted = True
            note(f"{engine}: answers bounded to {budget} new tokens, not max_new_tokens={max_new_tokens}: the longest "
                 f"prompt has {longest} tokens and the model's context is {self.context} (later calls are bounded "
                 f"the same way without a note; lower max_new_tokens or data.max_prompt_tokens to avoid it)")
        return budget

    def stopped(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask of `tokens` (any shape) that are stop tokens."""
        stops = self._stops.get(tokens.device)
        if stops is None:
            stops = self._stops[tokens.device] = torch.tensor(self.stop_ids, device=tokens.device)
        return torch.isin(tokens, stops)


def new_token_budget(context: int | None, longest_prompt: int, max_new_tokens: int) -> int:
    """min(max_new_tokens, context - longest_prompt): the last sampled token sits at position
    context - 1 at most. A prompt that fills the context leaves no room: a ValueError, not an
    index error inside the model. Worked: context 64, a 50-token prompt, 40 asked -> 14."""
    if not context:
        return max_new_tokens
    room = context - longest_prompt
    if room < 1:
        raise ValueError(f"a prompt of {longest_prompt} tokens fills the model's context of {context} tokens: no room "
                         f"for an answer; shorten it, or set data.max_prompt_tokens below {context}")
    return min(max_new_tokens, room)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model) -> str:
    """The name of the KV-cache argument of `model.forward`: `cache` in current transformers
    (`past_key_values` is deprecated there, removed in 5.40), `past_key_values` in older ones."""
    if hasattr(model, "get_base_model"):  # a peft wrapper forwards **kwargs: ask the model inside
        model = model.get_base_model()
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (B, P), each prompt as `reftune.models.encode_prompt` makes it
    (the tokenizer's BOS where it adds one)."""
    from reftune.models import encode_prompt

    ids, mask = pad_with_mask([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, side="left")
    return ids.to(device), mask.to(device)


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Each prompt's length in tokens, as `encode_prompts` feeds it."""
    from reftune.models import encode_prompt

    return [len(encode_prompt(tokenizer, p)) for p in prompts]


def finish_rollout(tokenizer, prompt_ids, prompt_mask, sampled: torch.Tensor, prompt_index,
                   sampling_logprobs: torch.Tensor | None = None, sampling_values: torch.Tensor | None = None,
                   stop_ids: list[int] | None = None) -> Rollout:
    """Turn raw sampled ids (B, R) into a Rollout: mask after the first stop token (`stop_ids`,
    default the tokenizer's EOS), pad it, decode."""
    pad_id = tokenizer.pad_token_id
    stops = torch.tensor(stop_ids or [tokenizer.eos_token_id], device=sampled.device)
    is_eos = torch.isin(sampled, stops)
    # A token is part of the response if no stop token came strictly before it.
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = (~eos_before).long()
    response_ids = sampled.masked_fill(eos_before, pad_id)
    ended = is_eos.any(-1)
    # Trim columns that are padding in every row.
    width = int(response_mask.sum(-1).max().item()) if sampled.shape[1] else 0
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
    if sampling_logprobs is not None:
        sampling_logprobs = sampling_logprobs[:, :width].masked_fill(response_mask == 0, 0.0)
    if sampling_values is not None:
        sampling_values = sampling_values[:, :width].masked_fill(response_mask == 0, 0.0)
    keep = (response_mask.bool() & ~torch.isin(response_ids, stops)).cpu()
    texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(response_ids.cpu(), keep)],
                                   skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, texts, list(prompt_index), ended,
                   sampling_logprobs, sampling_values)


def rollout_from_token_lists(tokenizer, prompt_rows: list[list[int]], responses: list[list[int]],
                             prompt_index: list[int], device, logprobs: list[list[float]] | None = None,
                             stop_ids: list[int] | None = None) -> Rollout:
    """A Rollout from per-row token lists, for engines that return lists (vLLM). `prompt_rows` has
    one list per ROW; each response is cut after its first stop token (kept, as in `finish_rollout`)."""
    pad_id = tokenizer.pad_token_id
    stops = set(stop_ids or [tokenizer.eos_token_id])
    ends = [next((i for i, t in enumerate(r) if t in stops), None) for r in responses]
    cut = [list(r) if end is None else r[:end + 1] for r, end in zip(responses, ends)]
    ended = torch.tensor([end is not None for end in ends], dtype=torch.bool)
    prompt_ids, prompt_mask = pad_with_mask(prompt_rows, pad_id, side="left")
    response_ids, response_mask = pad_with_mask(cut, pad_id, side="right")
    sampling_logprobs = None
    if logprobs is not None:
        rows = [[float(x) for x in lp[:len(r)]] for lp, r in zip(logprobs, cut)]
        sampling_logprobs = torch.zeros(response_ids.shape, dtype=torch.float32)
        for i, row in enumerate(rows):
            sampling_logprobs[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    texts = tokenizer.batch_decode([r[:-1] if e else r for r, e in zip(cut, ended.tolist())],
                                   skip_special_tokens=True)
    return Rollout(prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device), response_mask.to(device),
                   texts, list(prompt_index), ended, sampling_logprobs)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different widths: prompts re-left-padded, responses re-right-padded."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_ids.shape[1] for r in parts)
    R = max(r.response_ids.shape[1] for r in parts)

    def widen(t, width, value, left):
        extra = width - t.shape[1]
        if extra == 0:
            return t
        filler = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([filler, t] if left else [t, filler], dim=1)

    def per_token(name):
        if any(getattr(r, name) is None for r in parts):
            return None
        return torch.cat([widen(getattr(r, name), R, 0.0, False) for r in parts])
    return Rollout(
        torch.cat([widen(r.prompt_ids, P, pad_id, True) for r in parts]),
        torch.cat([widen(r.prompt_mask, P, 0, True) for r in parts]),
        torch.cat([widen(r.response_ids, R, pad_id, False) for r in parts]),
        torch.cat([widen(r.response_mask, R, 0, False) for r in parts]),
        [t for r in parts for t in r.texts],
        [i for r in parts for i in r.prompt_index],
        torch.cat([r.ended_with_eos for r in parts]),
        per_token("sampling_logprobs"),
        per_token("sampling_values"),
    )


def expand_prompts(prompts: list[str], num_samples: int) -> tuple[list[str], list[int]]:
    """Rows in groups: each prompt repeated `num_samples` times, and each row's prompt index."""
    rows = [p for p in prompts for _ in range(num_samples)]
    index = [i for i in range(len(prompts)) for _ in range(num_samples)]
    return rows, index
