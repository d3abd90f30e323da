"""`engine=hf`: transformers' `model.generate`, the reference engine; works with any model."""

from __future__ import annotations

import torch

from reftune.engines.base import (Generator, GenerationLimits, concat_rollouts, encode_prompts, expand_prompts,
                                  finish_rollout, prompt_lengths)


class HFGenerator(Generator):
    def __init__(self, model, tokenizer, batch_size: int = 64, seed: int | None = None, model_path: str | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.limits = GenerationLimits(model, tokenizer)

    def sync_weights(self) -> None:
        pass  # shares the live model

    @torch.no_grad()
    def generate(self, prompts, *, num_samples=1, greedy=False, temperature=1.0, top_p=1.0, max_new_tokens=256):
        parts = []
        tok, stops = self.tokenizer, self.limits.stop_ids
        max_new_tokens = self.limits.budget(prompt_lengths(tok, prompts), max_new_tokens, "engine=hf")
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        rows, index = expand_prompts(prompts, num_samples)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, mask = encode_prompts(tok, chunk, device)
            kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=tok.pad_token_id, eos_token_id=stops, **kwargs)
            parts.append(finish_rollout(tok, ids, mask, out[:, ids.shape[1]:], index[start:start + self.batch_size],
                                        stop_ids=stops))
        self.model.train(was_training)
        return concat_rollouts(parts, tok.pad_token_id)
