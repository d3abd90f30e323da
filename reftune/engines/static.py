"""`engine=static`: a KV-cache sampler with preallocated buffers, built for small models on CPUs.

It runs the trainers' live HF model (any causal LM whose layers all use full attention; see
`fallback_reason`) and differs from `cached` only in how the loop around the model is driven.
On the demo's 0.9 M-parameter model the time per token is not arithmetic but memory traffic and
per-call overhead (profile in bench/bench_rollout.py's docstring), so each change removes traffic
or calls:

- KV cache: one (B, H, capacity, D) buffer per layer, written in place; attention gets a view of
  its filled part. transformers' DynamicCache instead `torch.cat`s the whole cache every step
  (a quarter of `cached`'s time at batch 128), and its StaticCache attends over the full capacity.
- Attention mask: one additive (B, 1, 1, capacity) float mask built once; each step passes a view
  in the 4-D form the model uses as-is, so no per-step mask construction or `cat` (sdpa and eager
  attention; other implementations get a 2-D view and build their own).
- Prefill: each distinct prompt once, then the cache is repeated for its `num_samples` rows.
- Sampling: inverse CDF (one uniform per row from the seeded `rng`, a cumsum and a binary
  search) instead of `torch.multinomial`, whose exponential noise for every vocabulary entry cost
  2 ms per step at batch 128. Greedy with num_samples > 1 decodes each prompt once.
- Attention while sampling: for one query per row, sdpa's CPU flash kernel runs a gemv per
  (row, head); transformers' eager attention (matmul, softmax, matmul) was 13-18% faster per
  rollout, so sampled decode steps of an sdpa model switch the model's `_attn_implementation` to
  "eager" (restored after; the additive mask suits both). Greedy keeps sdpa: eager's rounding
  differs from `generate`'s in the last bits, which can flip a near-tie argmax.
- Finished rows: the loop ends when every row has emitted a stop token, and when half the batch has
  finished the survivors are compacted (rows and cache) so finished answers stop costing compute.

Greedy output is the same as `model.generate` token for token: the same sdpa kernel sees the
same keys and an equivalent mask (the bool mask sdpa gets from generate is turned into this
additive 0/-inf one inside sdpa). Sampled rows return `sampling_logprobs`: log-probs of the
distribution sampled (temperature applied, before top-p), as the vLLM engine reports them.

Measured alternatives not taken (bench/bench_rollout.py docstring has the numbers):
`torch.compile` of the decode step (recompiles at every new cache length unless the cache is
padded to a fixed capacity; then 30 s per shape and only 1.2x per step, because sdpa and the
matmuls stay library calls), and attention that shares the prompt's keys across the samples of
one prompt (1.1x on attention).
"""

from __future__ import annotations

import contextlib

import torch

from reftune.engines.base import (Generator, GenerationLimits, Rollout, cache_kwarg, concat_rollouts, encode_prompts,
                                  expand_prompts, finish_rollout, position_ids_from_mask, prompt_lengths)
from reftune.engines.cached import CachedSampler

# Attention implementations that take a prepared 4-D additive mask as-is (others get a 2-D mask).
_MASK4D_IMPLEMENTATIONS = ("sdpa", "eager")


def fallback_reason(model) -> str | None:
    """Why this engine cannot drive `model` (it then uses the `cached` loop), or None.

    The buffer cache stands in for transformers' full-attention cache layer only; sliding-window,
    chunked, linear-attention (recurrent state) or KV-sharing layers keep their own cache logic."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
    except Exception as e:  # a model outside transformers' cache API
        return f"no transformers cache for this model ({type(e).__name__}: {e})"
    if not layers:
        return "the model's config does not describe its cache layers"
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if kinds:
        return f"cache layers other than full attention: {', '.join(kinds)}"
    return None


def _buffer_cache(capacity: int):
    """A transformers `Cache` whose layers write into preallocated buffers (see module docstring)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            B, H, _, D = key_states.shape
            self.device = key_states.device
            self.k_buf = key_states.new_empty(B, H, capacity, D)
            self.v_buf = value_states.new_empty(B, value_states.shape[1], capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self.k_buf[:, :, self.length:end] = key_states
            self.v_buf[:, :, self.length:end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _views(self):
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int):
            return self.length + query_length, 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
            self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
            self._views()

        def batch_select_indices(self, indices) -> None:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self._views()

    return Cache(layer_class_to_replicate=BufferLayer)


def sample_rows(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float,
                rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (B,) tokens and their log-probs under the sampled distribution (temperature
    applied; greedy: temperature 1). Sampling is by inverse CDF: one uniform per row."""
    if greedy:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = (logits.float() / temperature).log_softmax(-1)
    probs = logp.exp()
    if top_p < 1.0:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p (as `cached`).
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill_(drop, 0.0))
    else:
        kept = probs
    cdf = kept.cumsum(-1)
    # u * total, not u: fp32 cumsums end a little off 1. right=True never lands on a zero-probability
    # token (its cdf equals its predecessor's); the clamp covers u * total rounding up to the end.
    # Drawn on the CPU: `rng` is a CPU generator (trainers checkpoint its state) whatever the device.
    u = torch.rand(cdf.shape[0], 1, generator=rng, dtype=cdf.dtype).to(cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze_(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class StaticSampler(Generator):
    """`generate` as `CachedSampler`, faster on small models (module docstring); `rng` is the
    torch.Generator every sampled token comes from (seeded with `seed`; without one, from torch's
    global seed), so trainers can checkpoint and restore it."""

    def __init__(self, model, tokenizer, batch_size: int = 64, seed: int | None = None, model_path: str | None = None,
                 compact_below: float = 0.5, eager_sampling_attention: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.compact_below = compact_below
        """Compact the batch when at most this fraction of its rows still runs (0: never)."""
        self.eager_sampling_attention = eager_sampling_attention
        """Sampled (not greedy) decode steps of an sdpa model use transformers' eager attention."""
        self.rng = torch.Generator(device="cpu")
        self.rng.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
        self.fallback = fallback_reason(model)
        self._cached = CachedSampler(model, tokenizer, batch_size=batch_size) if self.fallback else None
        self.limits = GenerationLimits(model, tokenizer)
        self.value_head: torch.nn.Module | None = None
        """A trainer's value head (`set_value_head`): sampled rollouts then also carry
        `sampling_values`, the head (in eval mode) on the last hidden state of the step that sampled
        each token."""

    @property
    def supports_value_head(self) -> bool:
        """Its own decoding loop reports log-probs and values; the `cached` fallback does not."""
        return self._cached is None

    def set_value_head(self, head: torch.nn.Module | None) -> None:
        if head is not None and not self.supports_value_head:
            raise ValueError(f"engine=static runs the cached loop for this model ({self.fallback}): no values")
        self.value_head = head

    def sync_weights(self) -> None:
        pass  # shares the live model, and nothing is derived from its weights

    @torch.no_grad()
    def generate(self, prompts, *, num_samples=1, greedy=False, temperature=1.0, top_p=1.0, max_new_tokens=256):
        if self._cached is not None:
            self._cached.rng = self.rng
            return self._cached.generate(prompts, num_samples=num_samples, greedy=greedy, temperature=temperature,
                                         top_p=top_p, max_new_tokens=max_new_tokens)
        max_new_tokens = self.limits.budget(prompt_lengths(self.tokenizer, prompts), max_new_tokens, "engine=static")
        if greedy and num_samples > 1:  # every sample of a prompt is the same: decode it once
            once = self.generate(prompts, greedy=True, max_new_tokens=max_new_tokens)
            return _repeat_rows(once, num_samples)
        per_chunk = max(1, self.batch_size // num_samples)  # whole prompts, at most batch_size rows
        parts = []
        modules = [m for m in (self.model, None if greedy else self.value_head) if m is not None]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start:start + per_chunk]
                _, index = expand_prompts(chunk, num_samples)
                parts.append(self._generate_chunk(chunk, [start + i for i in index], num_samples, greedy,
                                                  temperature, top_p, max_new_tokens))
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)
        return concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _generate_chunk(self, prompts, index, n, greedy, temperature, top_p, max_new_tokens):
        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        ids, mask = encode_prompts(tok, prompts, device)
        P = ids.shape[1]
        cache = _buffer_cache(P + max_new_tokens)
        cache_arg = {cache_kwarg(model): cache}
        head = None if greedy else self.value_head
        # With a value head, each step's last hidden state gives V(state before the token it samples).
        step_values = (lambda out: head(out.hidden_states[-1][:, -1])) if head is not None else (lambda out: None)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                    logits_to_keep=1, output_hidden_states=head is not None, **cache_arg)
        logits, value = out.logits[:, -1], step_values(out)
        if n > 1:
            logits, ids, mask = (t.repeat_interleave(n, 0) for t in (logits, ids, mask))
            value = value.repeat_interleave(n, 0) if value is not None else None
            cache.batch_repeat_interleave(n)
        B = ids.shape[0]
        mask4d = getattr(model.config, "_attn_implementation", None) in _MASK4D_IMPLEMENTATIONS
        # Every key the rows will attend to: prompt (0 / -inf on left padding), then the generated
        # tokens, opened one column per step. sdpa turns generate's bool mask into exactly this.
        if mask4d:
            attend = torch.full((B, P + max_new_tokens), float("-inf"), dtype=model.dtype, device=device)
            attend[:, :P].masked_fill_(mask.bool(), 0.0)
        else:
            attend = torch.zeros((B, P + max_new_tokens), dtype=torch.long, device=device)
            attend[:, :P] = mask
        pos = mask.sum(-1, keepdim=True)
        sampled = torch.full((B, max_new_tokens), tok.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        values = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if head is not None else None
        rows = torch.arange(B, device=device)  # batch slot -> output row, changes when compacted
        done = torch.zeros(B, dtype=torch.bool, device=device)
        eager = not greedy and self.eager_sampling_attention and model.config._attn_implementation == "sdpa"
        with _attention_implementation(model, "eager" if eager else None):
            for t in range(max_new_tokens):
                tokens, lp = sample_rows(logits, greedy, temperature, top_p, self.rng)
                sampled[rows, t], logprobs[rows, t] = tokens, lp.float()
                if values is not None:
                    values[rows, t] = value
                done |= self.limits.stopped(tokens)
                if t == max_new_tokens - 1 or bool(done.all()):
                    break
                running = int((~done).sum())
                if self.compact_below and rows.shape[0] >= 8 and running <= self.compact_below * rows.shape[0]:
                    keep = (~done).nonzero().squeeze(-1)
                    rows, tokens, pos, done, attend = rows[keep], tokens[keep], pos[keep], done[keep], attend[keep]
                    cache.batch_select_indices(keep)
                attend[:, P + t] = 0 if mask4d else 1
                step_mask = attend[:, None, None, :P + t + 1] if mask4d else attend[:, :P + t + 1]
                out = model(input_ids=tokens[:, None], attention_mask=step_mask, position_ids=pos, use_cache=True,
                            output_hidden_states=head is not None, **cache_arg)
                logits, value = out.logits[:, -1], step_values(out)
                pos = pos + 1
        return finish_rollout(tok, ids, mask, sampled, index, sampling_logprobs=logprobs, sampling_values=values,
                              stop_ids=self.limits.stop_ids)


@contextlib.contextmanager
def _attention_implementation(model, name: str | None):
    """Run with the model's attention implementation set to `name` (None: as it is), restored after
    (the config's setter also reaches sub-configs)."""
    old = model.config._attn_implementation
    if name is None or name == old:
        yield
        return
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = old


def _repeat_rows(rollout, n: int):
    """Each row of `rollout` n times in a row (the grouping of `num_samples`)."""
    rep = lambda t: None if t is None else t.repeat_interleave(n, 0)  # noqa: E731
    return Rollout(rep(rollout.prompt_ids), rep(rollout.prompt_mask), rep(rollout.response_ids),
                   rep(rollout.response_mask), [s for s in rollout.texts for _ in range(n)],
                   [i for i in rollout.prompt_index for _ in range(n)], rep(rollout.ended_with_eos),
                   rep(rollout.sampling_logprobs), rep(rollout.sampling_values))
