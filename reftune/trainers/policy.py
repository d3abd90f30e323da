"""The policy's forward passes: log-probs of sampled tokens and the value head on the shared backbone.

The policy for PPO is a plain `AutoModelForCausalLM` plus a separate `ValueHead` on its last
hidden state (composition: the LM stays an ordinary HF model, so a checkpoint's `policy/` folder
loads with `AutoModelForCausalLM.from_pretrained` and the value head is one extra file).

With `logprob_chunk_size` the LM head runs over a few response positions at a time (and again in
backward), so the (batch, response, vocab) logits, 3.4 GB in fp32 for 8 x 700 tokens of a 152k
vocabulary, are never held at once.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from reftune.engines.base import cache_kwarg, position_ids_from_mask
from reftune.models import has_learned_positions, is_peft, model_context
from reftune.trainers import algorithms as A
from reftune.trainers.distributed import unwrap


class ValueHead(nn.Module):
    """V(s_t) from the last hidden state: dropout then a linear layer (as in the ReFT release)."""

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)  # start at V=0: the first advantages equal the rewards
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def for_model(cls, model, dropout: float = 0.1) -> "ValueHead":
        """A value head as wide as the hidden states `model`'s LM head reads (`head_input_width`)."""
        return cls(head_input_width(model), dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(hidden)).squeeze(-1).float()


def head_input_width(model) -> int:
    """Width of the hidden states the LM head reads, which the value head reads too: the output
    embeddings' input features. Not `config.hidden_size`: OPT models with `word_embed_proj_dim`
    (opt-350m) project the last hidden state down before the head, and Gemma-3's multimodal layout
    (4B and up) keeps hidden_size in its `text_config` only."""
    _, head = backbone_and_head(model)
    width = getattr(head, "in_features", None)
    if not isinstance(width, int) and isinstance(getattr(head, "weight", None), torch.Tensor):
        width = head.weight.shape[-1]
    if not isinstance(width, int):
        lm = unwrap(model)
        width = getattr(lm.config.get_text_config(), "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"{type(unwrap(model)).__name__}: cannot tell the width of the hidden states its LM head "
                         f"reads (no Linear output embeddings, no hidden_size in its config)")
    return width


def forward_logits_values(model, value_head: ValueHead | None, input_ids, attention_mask, response_start: int):
    """One forward pass over prompt+response; returns logits and values for the response part.

    Shapes: input_ids (B, P+R); returns logits (B, R, V) where logits[:, t] predicts response
    token t, and values (B, R) = V(state before response token t), or None without a value head.
    """
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=value_head is not None, use_cache=False,
    )
    logits = out.logits[:, response_start - 1:-1]
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, response_start - 1:-1])
    return logits, values


def policy_forward(model, value_head, input_ids, attention_mask, response_ids, response_start, temperature=1.0,
                   chunk_size: int = 0, with_entropy: bool = False, group_size: int = 1):
    """Log-probs (B, R) of the response tokens, values (B, R) or None, and the per-token entropy
    (B, R, detached: a metric) when `with_entropy`, else None.

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the rollouts were drawn from (the PPO ratio is then on-policy at any temperature).
    `chunk_size` > 0: the (B, R, V) logits never exist at once (`chunked_policy_forward`).
    `group_size` > 1: rows come in groups of that many samples of one prompt, and each prompt runs
    once (`shared_prompt_forward`; not combined with chunking).
    """
    if chunk_size > 0:
        return chunked_policy_forward(model, value_head, input_ids, attention_mask, response_ids, response_start,
                                      temperature, chunk_size, with_entropy)
    if group_size > 1:
        logits, values = shared_prompt_forward(model, value_head, input_ids, attention_mask, response_ids,
                                               response_start, group_size)
    else:
        logits, values = forward_logits_values(model, value_head, input_ids, attention_mask, response_start)
    logits = tempered(logits, temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():  # one sequence at a time: the temporaries stay (R, V)
            entropy = torch.cat([A.entropy_from_logits(rows) for rows in logits.detach().split(1)])
    return A.logprobs_from_logits(logits, response_ids), values, entropy


@torch.no_grad()
def sampled_logprobs(model, rollout, temperature: float, chunk_size: int = 0, samples_per_prompt: int = 1):
    """(B, R) log-probs of a rollout's sampled tokens under `model` (the policy that sampled them:
    the behaviour log-probs an engine did not report), 0 at padding; `model` in eval mode."""
    group = samples_per_prompt if samples_per_prompt > 1 and not chunk_size else 1
    training = model.training
    model.eval()
    try:
        logprobs, _, _ = policy_forward(model, None, rollout.input_ids, rollout.attention_mask, rollout.response_ids,
                                        rollout.prompt_ids.shape[1], temperature, chunk_size, group_size=group)
    finally:
        model.train(training)
    return logprobs.masked_fill(rollout.response_mask == 0, 0.0)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits (..., V) in the precision log-probs are taken in, divided by the sampling temperature."""
    if torch.is_autocast_enabled(logits.device.type):
        # bf16 autocast over fp32 weights: take the logits back to fp32, as without autocast. (With
        # bf16 weights, logprobs_from_logits upcasts row by row instead, to spare GPU memory.)
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def chunked_policy_forward(model, value_head, input_ids, attention_mask, response_ids, response_start: int,
                           temperature: float, chunk_size: int, with_entropy: bool):
    """`policy_forward` with the LM head applied `chunk_size` response positions at a time.

    The wrapper's own forward runs (DDP prepares its gradient reduction there, FSDP gathers the
    weights), asked for the last position's logits only; a hook on the backbone records its last
    hidden state, which the value head and the chunked head then read.
    """
    backbone, head = backbone_and_head(model)
    recorded = {}
    hook = backbone.register_forward_hook(lambda _m, _args, out: recorded.update(hidden=out.last_hidden_state))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    check_plain_head(head, recorded["hidden"][:, -1:], out.logits)
    hidden = recorded["hidden"][:, response_start - 1:-1]
    values = value_head(hidden) if value_head is not None else None
    logprobs, entropy = chunked_logprobs(head, hidden, response_ids, temperature, chunk_size, with_entropy)
    return logprobs, values, entropy


def shared_prompt_forward(model, value_head, input_ids, attention_mask, response_ids, response_start: int,
                          group_size: int = 1, prompt_index: torch.Tensor | None = None):
    """`forward_logits_values` over rows that come in groups of `group_size` samples of one prompt (the
    rollout layout), running each prompt once: the prompt pass fills a KV cache, which is repeated
    for the group's rows, and the responses run on it. Same log-probs, values and gradients (to
    float rounding) as the full pass; at 4 samples per question of the demo's task 1.56x faster,
    with and without gradients (bench/bench_prompt_sharing.py, docs/performance.md).
    `prompt_index` (B,) instead of `group_size`: row i continues prompt number prompt_index[i],
    groups of any sizes (Online-ST's gold and distinct own CoTs of a question); each prompt's rows
    hold the same prompt tokens.

    Shapes: input_ids, attention_mask (B, P+R) with B = G * group_size; response_ids (B, R);
    returns logits (B, R, V) and values (B, R) or None, as `forward_logits_values`. Two forward
    calls per backward: not for DDP/FSDP wrappers (their gradient hooks expect one), and not with
    gradient checkpointing (transformers turns the cache off there).
    """
    P, R = response_start, response_ids.shape[1]
    prompt_ids, prompt_mask = input_ids[:, :P], attention_mask[:, :P]
    if prompt_index is None:
        first = torch.arange(0, prompt_ids.shape[0], group_size, device=prompt_ids.device)
        spread = lambda t: t.repeat_interleave(group_size, 0)  # noqa: E731
    else:
        order = prompt_index.tolist()
        first = torch.tensor([order.index(g) for g in range(max(order) + 1)], device=prompt_ids.device)
        spread = lambda t: t[prompt_index]  # noqa: E731
    shared_ids, shared_mask = prompt_ids[first], prompt_mask[first]
    if not torch.equal(spread(shared_ids), prompt_ids):
        what = f"groups of {group_size} samples" if prompt_index is None else "rows of the prompts prompt_index names"
        raise ValueError(f"shared-prompt forward: rows are not {what} of one prompt")
    hidden_states = value_head is not None
    prompt_out = model(input_ids=shared_ids, attention_mask=shared_mask, position_ids=position_ids_from_mask(shared_mask),
                       use_cache=True, output_hidden_states=hidden_states)
    # Response token t is predicted at position P-1+t: the prompt's last position, then tokens 0..R-2.
    logits = [spread(prompt_out.logits[:, -1:])]
    hidden = [spread(prompt_out.hidden_states[-1][:, -1:])] if hidden_states else []
    if R > 1:
        # `cache` in current transformers, `past_key_values` (deprecated there) in older ones
        cache = prompt_out.cache if "cache" in prompt_out.keys() else prompt_out.past_key_values
        if prompt_index is None:
            cache.batch_repeat_interleave(group_size)
        else:
            cache.batch_select_indices(prompt_index)
        response_out = model(input_ids=response_ids[:, :R - 1], attention_mask=attention_mask[:, :P + R - 1],
                             position_ids=position_ids_from_mask(attention_mask)[:, P:P + R - 1], use_cache=True,
                             output_hidden_states=hidden_states, **{cache_kwarg(unwrap(model)): cache})
        logits.append(response_out.logits)
        hidden += [response_out.hidden_states[-1]] if hidden_states else []
    values = value_head(torch.cat(hidden, 1)) if value_head is not None else None
    return torch.cat(logits, 1), values


def backbone_and_head(model) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns the normed last hidden state) and the LM head of `model`, through
    a DDP wrapper (`.module`) and a peft wrapper (its base model; a LoRA-wrapped head stays wrapped).
    fsdp2 shards modules in place, so they are the model's own."""
    lm = unwrap(model)
    if is_peft(lm):
        lm = lm.get_base_model()
    return lm.get_decoder(), lm.get_output_embeddings()


_PLAIN_HEADS: weakref.WeakSet = weakref.WeakSet()


def check_plain_head(head: nn.Module, last_hidden: torch.Tensor, last_logits: torch.Tensor) -> None:
    """Refuse models whose logits are not just head(last hidden state) (e.g. Gemma-2's soft-capping,
    Cohere's logit scale): chunking would silently compute other log-probs. Compares the one
    position the forward did project, once per head."""
    if head in _PLAIN_HEADS:
        return
    with torch.no_grad():
        mine, theirs = head(last_hidden).float(), last_logits.float()
        tol = 1e-4 if last_logits.dtype in (torch.float32, torch.float64) else 2e-2
        if not torch.allclose(mine, theirs, rtol=tol, atol=tol):
            raise ValueError("logprob_chunk_size > 0 needs logits = output embeddings(last hidden state), but this "
                             "model transforms them further; set logprob_chunk_size=0")
    _PLAIN_HEADS.add(head)


def chunked_logprobs(head, hidden, labels, temperature: float, chunk_size: int, with_entropy: bool = False):
    """Log-probs (B, R) of `labels` (B, R) under softmax(head(hidden) / temperature), hidden (B, R, H),
    `chunk_size` positions at a time; and the per-token entropy (B, R, detached), or None.

    With gradients each chunk runs under a non-reentrant checkpoint: backward recomputes that chunk's
    logits instead of keeping them, so at most about one chunk's (B, chunk, V) logits are alive in
    forward and in backward. Non-reentrant, so the recomputation belongs to the one backward graph
    and the head's gradient is accumulated once (DDP's and FSDP's gradient hooks fire once).
    """
    entropies: list[torch.Tensor] = []
    first_pass = [True]

    def chunk(h, y):
        # A chunk is a strided slice of the (B, T, H) states; contiguous, the head is one matrix
        # product (on CPU a strided input takes a batched product, several times slower).
        logits = tempered(head(h.contiguous()), temperature)
        if with_entropy and first_pass[0]:
            with torch.no_grad():
                entropies.append(A.entropy_from_logits(logits))
        return A.logprobs_from_logits(logits, y)

    recompute = torch.is_grad_enabled()
    parts = [checkpoint(chunk, h, y, use_reentrant=False) if recompute else chunk(h, y)
             for h, y in zip(hidden.split(chunk_size, dim=1), labels.split(chunk_size, dim=1))]
    first_pass[0] = False  # backward's recomputations need the log-probs only, not the entropy again
    return torch.cat(parts, dim=1), (torch.cat(entropies, dim=1) if with_entropy else None)


def frozen_forward(separate_model: bool):
    """The context of the reference's forward: inference mode for a separate frozen model (nothing it
    computes ever meets autograd). With LoRA the reference is the policy itself, adapter disabled:
    a tensor its modules cache in inference mode (e.g. rotary tables) would break a later training
    forward that saves it for backward, so there it stays the caller's no_grad."""
    return torch.inference_mode() if separate_model else contextlib.nullcontext()


# Config fields of logit transforms after the LM head, with the value that means "none" (Gemma-2's
# soft-capping, Cohere's logit scale, Granite's logit scaling). A tiny random model's logits are
# too small for a soft cap to show numerically, so the config is read as well as the numbers.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def check_model_options(cfg, model) -> None:
    """Options that depend on the model, checked once it is loaded and before any rollout or update:
    `logprob_chunk_size` needs a plain LM head (`LOGIT_TRANSFORMS`, then `check_plain_head` on one
    token), and with learned position embeddings (`has_learned_positions`) a `max_length` longer
    than the context would index past the position table."""
    if getattr(cfg, "logprob_chunk_size", 0):
        name = type(unwrap(model)).__name__
        config = unwrap(model).config.get_text_config()
        for key, plain in LOGIT_TRANSFORMS.items():
            if getattr(config, key, plain) not in (plain, None, 0):
                raise ValueError(f"logprob_chunk_size={cfg.logprob_chunk_size}: {name} transforms its logits after "
                                 f"the LM head ({key}={getattr(config, key)}), which chunking would skip; set "
                                 f"logprob_chunk_size=0")
        try:
            _check_head_on_one_token(model)
        except ValueError:
            raise ValueError(f"logprob_chunk_size={cfg.logprob_chunk_size}: {name} computes its logits as more than "
                             f"output embeddings(last hidden state), which chunking would skip; set "
                             f"logprob_chunk_size=0") from None
    length, model = getattr(cfg, "max_length", 0), unwrap(model)
    context = model_context(model)
    if length and context and length > context and has_learned_positions(model):
        raise ValueError(f"max_length={length} is longer than the model's context ({context} positions, learned "
                         f"position embeddings: a longer sequence has no position to look up); set max_length={context}")


def _check_head_on_one_token(model) -> None:
    """`check_plain_head` on a two-token forward (as `chunked_policy_forward` runs it)."""
    backbone, head = backbone_and_head(model)
    recorded = {}
    hook = backbone.register_forward_hook(lambda _m, _args, out: recorded.update(hidden=out.last_hidden_state))
    ids = torch.tensor([[0, 0]], device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    check_plain_head(head, recorded["hidden"][:, -1:], out.logits)
