"""`engine=cached`: a plain KV-cache sampling loop over any HF causal LM, sharing the live policy."""

from __future__ import annotations

import torch

from reftune.engines.base import (Generator, GenerationLimits, cache_kwarg, concat_rollouts, encode_prompts,
                                  expand_prompts, finish_rollout, position_ids_from_mask, prompt_lengths)


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


class CachedSampler(Generator):
    """Rows that hit a stop token are dropped from the batch as they finish, so short answers stop
    costing compute. On CPU with a small model this is on par with `model.generate` (0.9-1.2x its
    tokens/s on a 2-core AMD EPYC with AVX2: bench/bench_rollout.py, docs/performance.md)."""

    def __init__(self, model, tokenizer, batch_size: int = 64, seed: int | None = None, model_path: str | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.limits = GenerationLimits(model, tokenizer)
        self.rng = None
        if seed is not None:
            self.rng = torch.Generator(device="cpu").manual_seed(seed)

    def sync_weights(self) -> None:
        pass  # shares the live model

    @torch.no_grad()
    def generate(self, prompts, *, num_samples=1, greedy=False, temperature=1.0, top_p=1.0, max_new_tokens=256):
        max_new_tokens = self.limits.budget(prompt_lengths(self.tokenizer, prompts), max_new_tokens, "engine=cached")
        rows, index = expand_prompts(prompts, num_samples)
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
        cache_arg = {cache_kwarg(model): cache}
        out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=True, logits_to_keep=1, **cache_arg)
        next_pos = mask.sum(-1, keepdim=True)
        for t in range(max_new_tokens):
            logits = out.logits[:, -1, :]
            tokens = sample_next(logits, greedy, temperature, top_p, self._rng_for(device))
            sampled[active, t] = tokens
            alive = ~self.limits.stopped(tokens)
            if t == max_new_tokens - 1 or not alive.any():
                break
            if not alive.all():  # drop finished rows from the batch and the cache
                keep = alive.nonzero().squeeze(-1)
                active, tokens, mask, next_pos = active[keep], tokens[keep], mask[keep], next_pos[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                        **cache_arg)
            next_pos = next_pos + 1
        model.train(was_training)
        return finish_rollout(tok, prompt_ids, prompt_mask, sampled, index, stop_ids=self.limits.stop_ids)

    def _rng_for(self, device):
        return self.rng if (self.rng is not None and device.type == "cpu") else None
