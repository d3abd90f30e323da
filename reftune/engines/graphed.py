"""`engine=graphed`: the static engine's sampler with fixed shapes, each decode step replayed as a CUDA graph.

On a GPU a small model's decode step is bound by kernel launches, not arithmetic: a few dozen
small kernels per layer, each launched from Python. A CUDA graph records the whole step once
(every layer, the LM head and a value head) and replays it with one launch. A replay reads and
writes the same addresses with the same shapes every time, so unlike `static`:

- the KV cache is one fixed (B, H, capacity, D) buffer per layer that attention reads whole; the
  columns not yet written are masked with -inf, and each step writes its keys at a position held in
  a device tensor (`index_copy_`), not at a Python offset;
- the batch keeps all its rows to the end (no compaction: a finished row keeps decoding, unused);
- each prompt is prefilled once per sample (prefill is eager, a small part of a rollout on a GPU);
- the capacity is rounded up to a multiple of 64 and the last two shapes' buffers and graphs are
  kept, so the chunks of a run's rollouts replay graphs captured once.

Graphs are used on a CUDA device when every parameter is a plain tensor (not FSDP2's sharded
DTensors, whose all-gathers a graph cannot hold). Optimizers update parameters in place, which a
replay sees; a parameter that became another tensor (another address) makes the engine capture
again. Elsewhere, a CPU included, the same fixed-shape step runs eagerly: correct, and slower than
`static` on a CPU (attention over the whole capacity). `engine=auto` does not pick this engine;
`bench/gpu_check.py` compares it with the others on a GPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from reftune.engines.base import cache_kwarg, encode_prompts, finish_rollout, position_ids_from_mask
from reftune.engines.static import StaticSampler, sample_rows

CAPACITY_STEP = 64
"""Cache capacities are rounded up to a multiple of this, so nearby prompt lengths share a graph."""
KEPT_SHAPES = 2
"""Buffers and graphs kept for this many (batch, capacity, ...) shapes, the most recent ones."""


def _fixed_cache(capacity: int, where):
    """A transformers `Cache` whose layers hold (B, H, capacity, D) buffers, write each update's keys
    and values at the positions in the device tensor `where.at` (the caller sets it) and return the
    whole buffers."""
    from transformers.cache_utils import Cache, DynamicLayer

    class FixedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            B, H, _, D = key_states.shape
            self.device = key_states.device
            self.keys = key_states.new_zeros(B, H, capacity, D)
            self.values = value_states.new_zeros(B, value_states.shape[1], capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys.index_copy_(2, where.at, key_states)
            self.values.index_copy_(2, where.at, value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return capacity

        def get_mask_sizes(self, query_length: int):
            return capacity, 0

    return Cache(layer_class_to_replicate=FixedLayer)


def graphs_possible(model) -> bool:
    """CUDA graphs can hold this model's decode step: it is on a CUDA device and every parameter is
    a plain tensor (sharded or otherwise wrapped parameters gather inside the forward)."""
    params = list(model.parameters())
    return bool(params) and all(p.device.type == "cuda" and type(p.data) is torch.Tensor for p in params)


@dataclass(eq=False)
class _FixedStep:
    """Everything of one shape: the cache, the step's input and output buffers, and its graph."""

    model: torch.nn.Module = field(repr=False)
    head: torch.nn.Module | None = field(repr=False)
    batch: int
    capacity: int
    device: torch.device
    use_graph: bool
    graph: object = field(default=None, repr=False)
    outputs: tuple = field(default=(), repr=False)

    def __post_init__(self):
        d, dtype = self.device, self.model.dtype
        # Decode steps write at `write_at`, one fixed tensor (a graph holds its address); prefill
        # points the cache at its own positions for the time of its forward.
        self.write_at = torch.zeros(1, dtype=torch.long, device=d)
        self.where = SimpleNamespace(at=self.write_at)
        self.cache = _fixed_cache(self.capacity, self.where)
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=d)
        self.pos = torch.zeros(self.batch, 1, dtype=torch.long, device=d)
        self.mask = torch.full((self.batch, 1, 1, self.capacity), float("-inf"), dtype=dtype, device=d)

    def _forward(self, **inputs):
        out = self.model(use_cache=True, output_hidden_states=self.head is not None,
                         **{cache_kwarg(self.model): self.cache}, **inputs)
        value = self.head(out.hidden_states[-1][:, -1]) if self.head is not None else None
        return out.logits[:, -1], value

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        """Left-padded prompts (B, P) into the cache's first P columns; the next token's logits and value."""
        P = ids.shape[1]
        keep = mask.bool()
        # Causal over the real prompt tokens; a padding position attends to itself only, so that no
        # softmax row is all -inf (its NaN keys would poison every later step through 0 * NaN).
        q, k = torch.arange(P, device=self.device)[:, None], torch.arange(self.capacity, device=self.device)[None]
        real = torch.nn.functional.pad(keep, (0, self.capacity - P))[:, None, :]   # (B, 1, capacity)
        allowed = ((k <= q)[None] & real) | (k == q)[None]                            # (B, P, capacity)
        prefill_mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.device)
        prefill_mask.masked_fill_(~allowed, float("-inf"))
        self.where.at = torch.arange(P, device=self.device)
        try:
            logits, value = self._forward(input_ids=ids, attention_mask=prefill_mask[:, None],
                                          position_ids=position_ids_from_mask(mask))
        finally:
            self.where.at = self.write_at
        self.mask.fill_(float("-inf"))
        self.mask[:, 0, 0, :P].masked_fill_(keep, 0.0)
        self.pos.copy_(mask.sum(-1, keepdim=True))
        return logits, value

    def decode(self, tokens: torch.Tensor, column: int):
        """Feed `tokens` (B,) at cache column `column`; the next logits (B, V) and values (B,) or None.
        With a graph these are its output buffers: read them before the next call."""
        self.tokens.copy_(tokens[:, None])
        self.write_at.fill_(column)
        self.mask[:, 0, 0, column] = 0.0
        if self.use_graph:
            self._replay()
        else:
            self.outputs = self._forward(input_ids=self.tokens, attention_mask=self.mask, position_ids=self.pos)
        self.pos.add_(1)
        return self.outputs

    def _replay(self):
        if self.graph is None:
            try:
                self.graph, self.outputs = self._capture()
            except Exception as e:  # a model the graph cannot hold: the same step, eagerly
                warnings.warn(f"engine=graphed: CUDA graph capture failed ({type(e).__name__}: {e}); decoding "
                              f"without graphs", RuntimeWarning, stacklevel=4)
                self.use_graph, self.graph = False, None
                self.outputs = self._forward(input_ids=self.tokens, attention_mask=self.mask, position_ids=self.pos)
                return
        self.graph.replay()

    def _capture(self):
        # Warm-up runs on a side stream (allocations, lazy inits, cuBLAS handles) execute this very
        # step, writing the keys it will write again; the capture only records.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        step = lambda: self._forward(input_ids=self.tokens, attention_mask=self.mask, position_ids=self.pos)  # noqa: E731
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
        return graph, outputs


class GraphedSampler(StaticSampler):
    """`static`'s interface and sampling (the same inverse-CDF draws from `rng`, log-probs, values),
    with fixed shapes and CUDA graphs for the decode steps (module docstring). `use_graphs`: None
    decides by the model (`graphs_possible`), False never captures."""

    def __init__(self, model, tokenizer, batch_size: int = 64, seed: int | None = None, model_path: str | None = None,
                 use_graphs: bool | None = None):
        super().__init__(model, tokenizer, batch_size=batch_size, seed=seed, model_path=model_path,
                         compact_below=0.0, eager_sampling_attention=False)
        self.use_graphs = use_graphs
        self._steps: dict[tuple, _FixedStep] = {}

    def _step_for(self, batch: int, capacity: int, head, device) -> _FixedStep:
        capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        graphs = graphs_possible(self.model) if self.use_graphs is None else self.use_graphs
        modules = [self.model] + ([head] if head is not None else [])
        # Parameter addresses: a replaced tensor must not be read through an old graph.
        where = tuple(p.data_ptr() for m in modules for p in m.parameters())
        key = (batch, capacity, id(head), self.model.dtype, torch.is_autocast_enabled(device.type), graphs, where)
        step = self._steps.pop(key, None)
        if step is None:
            step = _FixedStep(self.model, head, batch, capacity, device, graphs)
        self._steps[key] = step  # most recent last
        while len(self._steps) > KEPT_SHAPES:
            self._steps.pop(next(iter(self._steps)))
        return step

    def _generate_chunk(self, prompts, index, n, greedy, temperature, top_p, max_new_tokens):
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        ids, mask = encode_prompts(tok, prompts, device)
        if n > 1:
            ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        B, P = ids.shape
        head = None if greedy else self.value_head
        step = self._step_for(B, P + max_new_tokens, head, device)
        logits, value = step.prefill(ids, mask)
        sampled = torch.full((B, max_new_tokens), tok.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        values = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if head is not None else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            tokens, lp = sample_rows(logits, greedy, temperature, top_p, self.rng)
            sampled[:, t], logprobs[:, t] = tokens, lp.float()
            if values is not None:
                values[:, t] = value
            done |= self.limits.stopped(tokens)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            logits, value = step.decode(tokens, P + t)
        return finish_rollout(tok, ids, mask, sampled, index, sampling_logprobs=logprobs, sampling_values=values,
                              stop_ids=self.limits.stop_ids)
