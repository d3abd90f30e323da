"""Cross-entropy pieces shared by SFT, Online self-training and the reward model: encoding a
(prompt, target) pair, collating a micro-batch (written once), the token-summed loss, the linear
schedule and the shuffled batch order."""

from __future__ import annotations

import random

import torch

from reftune.batching import pad, pad_with_mask
from reftune.models import encode_prompt

IGNORE = -100  # label value that cross-entropy skips: prompt and padding positions


def encode_sft_example(tokenizer, prompt: str, target: str, max_length: int,
                       append_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target + EOS and labels with the prompt masked out (IGNORE).

    The loss falls on the CoT and the EOS only, as in the paper; the model must learn to stop.
    `append_eos=False` for a target that already ends its turn (a chat template's end-of-turn token).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)  # as the engines feed it (the tokenizer's BOS where it adds one)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if append_eos else [])
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels


def encode_task_example(tokenizer, task, ex, max_length: int, cot: str | None = None) -> tuple[list[int], list[int]]:
    """`encode_sft_example` of `cot` (default: the gold CoT) as the answer to `ex`, with the task's
    prompt builder (`Task.training_pair`): with a chat template the loss covers the assistant turn only."""
    prompt, target, append_eos = task.training_pair(ex, cot)
    return encode_sft_example(tokenizer, prompt, target, max_length, append_eos)


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    input_ids, attention_mask = pad_with_mask([ids for ids, _ in batch], pad_id)
    labels = pad([lab for _, lab in batch], IGNORE, width=input_ids.shape[1])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over labelled positions, and how many positions that was.

    Returning the sum (not the mean) lets gradient accumulation divide by the token count of the
    whole accumulated batch, so a micro-batch split never changes the loss.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((shift_labels != IGNORE).sum())


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak LR over `warmup_ratio` of the steps, then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shuffled_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch's order: indices 0..n-1 shuffled by `rng` (its state carries across epochs),
    cut into batches of `batch_size` (the last may be smaller)."""
    order = list(range(n))
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
