"""Generation behind one small interface, so HF `generate`, the built-in KV-cache sampler or vLLM
can be swapped without touching the trainers.

Every engine returns a `Rollout`: token ids, not just text, because PPO must score exactly the
tokens that were sampled (re-tokenising decoded text can give other tokens).

Layout of a rollout (the one every trainer relies on):
- `prompt_ids` (B, P): prompts LEFT-padded with the pad id; `prompt_mask` 1 on real prompt tokens.
- `response_ids` (B, R): sampled tokens, RIGHT-padded after EOS; `response_mask` 1 on every
  generated token up to and including EOS, 0 on padding.
- rows come in groups: the `num_samples` samples of prompt i are rows i*n .. i*n+n-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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
    """(B,) bool: the response ended with EOS (False: cut at max_new_tokens)."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def rows(self, idx) -> "Rollout":
        """The rollout restricted to rows `idx` (a list or tensor of row indices)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Rollout(
            self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.response_mask[idx],
            [self.texts[i] for i in idx.tolist()], [self.prompt_index[i] for i in idx.tolist()],
            self.ended_with_eos[idx],
        )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Generator(Protocol):
    """What trainers and evaluation need from a generation engine."""

    def generate(
        self, prompts: list[str], *, num_samples: int = 1, greedy: bool = False, temperature: float = 1.0,
        top_p: float = 1.0, max_new_tokens: int = 256,
    ) -> Rollout: ...

    def sync_weights(self) -> None:
        """Make the engine sample from the current policy weights (no-op when it shares them)."""
        ...


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (B, P)."""
    pad = tokenizer.pad_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    return ids.to(device), mask.to(device)


def finish_rollout(tokenizer, prompt_ids, prompt_mask, sampled: torch.Tensor, prompt_index) -> Rollout:
    """Turn raw sampled ids (B, R) into a Rollout: mask after the first EOS, pad it, decode."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    is_eos = sampled == eos
    # A token is part of the response if no EOS came strictly before it.
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = (~eos_before).long()
    response_ids = sampled.masked_fill(eos_before, pad)
    ended = is_eos.any(-1)
    # Trim columns that are padding in every row.
    width = int(response_mask.sum(-1).max().item()) if sampled.shape[1] else 0
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
    texts = tokenizer.batch_decode(
        [row[m.bool() & (row != eos)].tolist() for row, m in zip(response_ids.cpu(), response_mask.cpu())],
        skip_special_tokens=True,
    )
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, texts, list(prompt_index), ended)


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens. No top-k: the paper samples from the full distribution."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CachedSampler:
    """A plain KV-cache sampling loop over any HF causal LM; rows that hit EOS are dropped from
    the batch as they finish, so short answers stop costing compute. On CPU with a small model
    this is on par with `model.generate` (0.9-1.2x its tokens/s: bench/bench_generation.py)."""

    def __init__(self, model, tokenizer, batch_size: int = 64, seed: int | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.rng = None
        if seed is not None:
            self.rng = torch.Generator(device="cpu").manual_seed(seed)

    def sync_weights(self) -> None:
        pass  # shares the live model

    @torch.no_grad()
    def generate(self, prompts, *, num_samples=1, greedy=False, temperature=1.0, top_p=1.0, max_new_tokens=256):
        rows = [p for p in prompts for _ in range(num_samples)]
        index = [i for i in range(len(prompts)) for _ in range(num_samples)]
        parts = []
        for start in range(0, len(rows), self.batch_size):
            parts.append(self._generate_batch(rows[start:start + self.batch_size], index[start:start + self.batch_size],
                                              greedy, temperature, top_p, max_new_tokens))
        return concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _generate_batch(self, prompts, index, greedy, temperature, top_p, max_new_tokens):
        from transformers import DynamicCache

        model, tok = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(tok, prompts, device)
        B = prompt_ids.shape[0]
        sampled = torch.full((B, max_new_tokens), tok.pad_token_id, dtype=torch.long, device=device)
        active = torch.arange(B, device=device)  # rows still generating, in cache order
        mask = prompt_mask
        cache = DynamicCache()
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_pos = mask.sum(-1, keepdim=True)
        for t in range(max_new_tokens):
            logits = out.logits[:, -1, :]
            tokens = sample_next(logits, greedy, temperature, top_p, self._rng_for(device))
            sampled[active, t] = tokens
            alive = tokens != tok.eos_token_id
            if t == max_new_tokens - 1 or not alive.any():
                break
            if not alive.all():  # drop finished rows from the batch and the cache
                keep = alive.nonzero().squeeze(-1)
                active, tokens, mask, next_pos = active[keep], tokens[keep], mask[keep], next_pos[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            next_pos = next_pos + 1
        model.train(was_training)
        return finish_rollout(tok, prompt_ids, prompt_mask, sampled, index)

    def _rng_for(self, device):
        return self.rng if (self.rng is not None and device.type == "cpu") else None


class HFGenerator:
    """`model.generate` from transformers: the reference engine, works with any model."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def sync_weights(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts, *, num_samples=1, greedy=False, temperature=1.0, top_p=1.0, max_new_tokens=256):
        parts = []
        tok = self.tokenizer
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        rows = [p for p in prompts for _ in range(num_samples)]
        index = [i for i in range(len(prompts)) for _ in range(num_samples)]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, mask = encode_prompts(tok, chunk, device)
            kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
            parts.append(finish_rollout(tok, ids, mask, out[:, ids.shape[1]:], index[start:start + self.batch_size]))
        self.model.train(was_training)
        return concat_rollouts(parts, tok.pad_token_id)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different widths: prompts re-left-padded, responses re-right-padded."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_ids.shape[1] for r in parts)
    R = max(r.response_ids.shape[1] for r in parts)

    def pad(t, width, value, left):
        extra = width - t.shape[1]
        if extra == 0:
            return t
        filler = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([filler, t] if left else [t, filler], dim=1)

    out = Rollout(
        torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in parts]),
        torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
        torch.cat([pad(r.response_ids, R, pad_id, False) for r in parts]),
        torch.cat([pad(r.response_mask, R, 0, False) for r in parts]),
        [t for r in parts for t in r.texts],
        [i for r in parts for i in r.prompt_index],
        torch.cat([r.ended_with_eos for r in parts]),
    )
    return out


ENGINES = {"cached": CachedSampler, "hf": HFGenerator}


def make_generator(name: str, model, tokenizer, batch_size: int = 64, seed: int | None = None) -> Generator:
    """`cached` (built-in KV-cache sampler, default) or `hf` (`model.generate`)."""
    if name == "cached":
        return CachedSampler(model, tokenizer, batch_size=batch_size, seed=seed)
    if name == "hf":
        return HFGenerator(model, tokenizer, batch_size=batch_size)
    raise ValueError(f"unknown generation engine {name!r}; expected one of {sorted(ENGINES)}")
