"""Padding token-id lists into tensors: written once, used by the engines (left-padded prompts),
SFT-style collation (right-padded ids + labels) and the reward model (right-padded inputs)."""

from __future__ import annotations

import torch


def pad(rows: list[list[int]], value: int, side: str = "right", width: int | None = None) -> torch.Tensor:
    """(B, W) long tensor of `rows`, filled with `value` on the `side` ("left" | "right")."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if side == "left":
                out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            else:
                out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pad_with_mask(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids (B, W) and the attention mask (B, W): 1 on real tokens, 0 on padding."""
    ids = pad(rows, pad_id, side)
    mask = pad([[1] * len(r) for r in rows], 0, side, width=ids.shape[1])
    return ids, mask
