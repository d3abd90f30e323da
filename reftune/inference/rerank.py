"""Reward-model reranking@k: a 2-class sequence classifier scores each sampled CoT; the sample
with the highest P(correct) among those with a parsable answer is the prediction. Training the
classifier is `reftune.trainers.reward_model`; this module loads, scores and reranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reftune.batching import pad_with_mask
from reftune.inference.voting import ks_up_to
from reftune.models import ModelLoadError, encode_prompt, load_tokenizer
from reftune.tasks import Task

POSITIVE = 1  # label index of "correct"


def encode_rm_input(tokenizer, prompt: str, completion: str, max_length: int) -> list[int]:
    """Token ids of prompt + completion, cut on the LEFT when too long: the classifier reads the
    last token's state, and the end of the CoT is where the answer is."""
    ids = encode_prompt(tokenizer, prompt) + \
        tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def load_reward_model(path: str, device: torch.device, dtype: torch.dtype):
    """(classifier, tokenizer) from a causal LM checkpoint (new score head) or a trained reward model."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(path)  # also checks that a local path exists
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "score.weight newly initialised" table is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a sequence classifier from {path!r}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # Batched pooling finds each row's last token by the pad id: it must be the tokenizer's.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


@torch.no_grad()
def score_candidates(rm, tokenizer, question_prompts: list[str], completions: list[str], batch_size: int = 64,
                     max_length: int = 1024) -> torch.Tensor:
    """P(correct) of each (prompt, completion) pair, a float32 CPU tensor in input order."""
    if len(question_prompts) != len(completions):
        raise ValueError(f"score_candidates: {len(question_prompts)} prompts for {len(completions)} completions")
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    rows = [encode_rm_input(tokenizer, p, c, max_length) for p, c in zip(question_prompts, completions)]
    # Score in length order (less padding), write back in input order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = torch.zeros(len(rows), dtype=torch.float32)
    for begin in range(0, len(order), batch_size):
        idx = order[begin:begin + batch_size]
        input_ids, attention_mask = pad_with_mask([rows[i] for i in idx], tokenizer.pad_token_id)
        logits = rm(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        probs = torch.softmax(logits.float(), dim=-1)[:, POSITIVE]
        scores[torch.tensor(idx)] = probs.cpu()
    rm.train(was_training)
    return scores


def score_records(rm, tokenizer, task: Task, records: list[dict], batch_size: int = 64,
                  max_length: int = 1024) -> list[list[float]]:
    """P(correct) of every sample of every record, aligned with `record["samples"]`."""
    prompts, completions = [], []
    for r in records:
        prompt = task.record_prompt(r)
        for s in r["samples"]:
            prompts.append(prompt)
            completions.append(s["completion"])
    flat = score_candidates(rm, tokenizer, prompts, completions, batch_size, max_length).tolist()
    out, at = [], 0
    for r in records:
        out.append(flat[at:at + len(r["samples"])])
        at += len(r["samples"])
    return out


def rerank_index(scores: list[float], answers: list) -> int | None:
    """Index of the highest-scored candidate with a parsable answer (ties: the earliest), or None."""
    best = None
    for i, (score, answer) in enumerate(zip(scores, answers)):
        if answer is not None and (best is None or score > scores[best]):
            best = i
    return best


def rerank_accuracy(records: list[dict], scores: list[list[float]], k: int) -> float:
    """Reranking accuracy over the first `k` samples of each question; a question without any
    parsable answer counts as wrong."""
    if not records:
        raise ValueError("rerank_accuracy: no records")
    hits = 0
    for r, s in zip(records, scores):
        samples = r["samples"][:k]
        pick = rerank_index(s[:k], [x["answer"] for x in samples])
        hits += pick is not None and bool(samples[pick]["correct"])
    return hits / len(records)


def rerank_curve(records: list[dict], scores: list[list[float]], k: int) -> dict[int, float]:
    """Reranking accuracy for k' in 1, 2, 4, ..., k (the first k' samples of each question)."""
    return {kk: rerank_accuracy(records, scores, kk) for kk in ks_up_to(k)}


def reward_model_path(result_or_dir: str | Path) -> str:
    """The classifier folder inside a reward-model run folder (or the folder itself)."""
    path = Path(result_or_dir)
    return str(path / "checkpoints" / "final") if (path / "checkpoints" / "final").exists() else str(path)
