"""How one step's rollout rows are cut for PPO, decided in one place.

A step's rollout holds, on each process, B rows in groups: the `samples_per_prompt` samples of a
question are consecutive rows. The update shuffles the rows into mini-batches (one optimizer step
each) of `mini_batch` rows per process, and runs each mini-batch as micro-batches of `micro_batch`
rows (one forward + backward each, gradients accumulated). Where a (micro-)batch holds whole
groups, a forward pass can run each question's prompt once for its samples
(policy.shared_prompt_forward): that needs the KV cache (off under gradient checkpointing and with
chunked log-probs), and, with gradients, one process (a DDP/FSDP wrapper expects one forward per
backward). `BatchLayout.plan` makes all of these choices from the config and the process count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    mini_batch: int
    """Rows per process in each mini-batch (one optimizer step)."""
    micro_batch: int
    """Rows per forward + backward within a mini-batch (= mini_batch: no accumulation)."""
    group: int
    """Consecutive rows that stay together when shuffled: samples_per_prompt when a mini-batch can
    hold whole groups, else 1 (rows shuffled one by one)."""
    share_scoring: int
    """Rows per prompt run once in the no-grad passes (old and reference log-probs, old values): `group`
    where the KV cache is available, else 1."""
    share_update: int
    """The same in the update's forwards through the trained (possibly data-parallel) model: 1 when
    micro-batches split groups or several processes train."""
    share_update_unwrapped: int
    """The same in update forwards through the unwrapped model (critic warm-up: no gradient reaches
    the LM, so no wrapper is involved)."""

    @classmethod
    def plan(cls, cfg, world_size: int) -> BatchLayout:
        """The layout of a ReFT config (mini_batch_size, micro_batch_size, samples_per_prompt,
        gradient_checkpointing, logprob_chunk_size) over `world_size` processes."""
        mini = cfg.mini_batch_size // world_size
        if mini * world_size != cfg.mini_batch_size:
            raise ValueError(f"mini_batch_size={cfg.mini_batch_size} does not split over {world_size} processes")
        micro = cfg.micro_batch_size or mini
        if mini % micro:
            raise ValueError(f"micro_batch_size={micro} does not divide the {mini} rows each of the "
                             f"{world_size} processes takes from a mini-batch of {cfg.mini_batch_size}")
        group = cfg.samples_per_prompt if mini % cfg.samples_per_prompt == 0 else 1
        cache = not cfg.gradient_checkpointing and not cfg.logprob_chunk_size
        scoring = group if group > 1 and cache else 1
        unwrapped = scoring if micro % scoring == 0 else 1  # micro-batches of whole groups
        return cls(mini, micro, group, scoring, unwrapped if world_size == 1 else 1, unwrapped)

    def mini_batches(self, rows: int) -> list[torch.Tensor]:
        """Row indices of each mini-batch of one pass over `rows` rows, in a fresh random order that
        keeps groups whole (the last mini-batch is smaller when `rows` does not divide)."""
        return list(shuffled_groups(rows, self.group).split(self.mini_batch))

    def micro_batches(self, mini_batch: torch.Tensor) -> list[torch.Tensor]:
        """Row indices of each micro-batch of a mini-batch."""
        return list(mini_batch.split(self.micro_batch))

    def update_share(self, unwrapped: bool) -> int:
        """Rows per prompt run once in an update forward (through the unwrapped model or not)."""
        return self.share_update_unwrapped if unwrapped else self.share_update


def shuffled_groups(rows: int, group: int) -> torch.Tensor:
    """A random order of `rows` row indices that keeps each group of `group` consecutive rows
    together and in order (group 1: a plain permutation)."""
    order = torch.randperm(rows // group)
    return (order[:, None] * group + torch.arange(group)).flatten()
