"""The policy's forward passes: log-probs of sampled tokens and the value head on the shared backbone.

The policy for PPO is a plain `AutoModelForCausalLM` plus a separate `ValueHead` on its last
hidden state (composition: the LM stays an ordinary HF model, so a checkpoint's `policy/` folder
loads with `AutoModelForCausalLM.from_pretrained` and the value head is one extra file).
"""

from __future__ import annotations

import torch
from torch import nn

from reftune.engines.base import position_ids_from_mask
from reftune.trainers import algorithms as A


class ValueHead(nn.Module):
    """V(s_t) from the last hidden state: dropout then a linear layer (as in the ReFT release)."""

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)  # start at V=0: the first advantages equal the rewards
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(hidden)).squeeze(-1).float()


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


def policy_forward(model, value_head, input_ids, attention_mask, response_ids, response_start, temperature=1.0):
    """Log-probs (B, R) of the response tokens, values (B, R) or None, and the logits (B, R, V).

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the rollouts were drawn from (the PPO ratio is then on-policy at any temperature).
    """
    logits, values = forward_logits_values(model, value_head, input_ids, attention_mask, response_start)
    if torch.is_autocast_enabled(logits.device.type):
        # bf16 autocast over fp32 weights: take the logits back to fp32, as without autocast. (With
        # bf16 weights, logprobs_from_logits upcasts row by row instead, to spare GPU memory.)
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return A.logprobs_from_logits(logits, response_ids), values, logits
