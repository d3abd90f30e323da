"""Majority voting@k (self-consistency): the most frequent final answer among k sampled CoTs.

Answers are normalised before counting with `grading.answer_key`, so answers the grader treats as
equal vote together ("18", "18.0" and 17.99999 are one answer; the release votes on raw floats and
splits them). Unparsable answers (None) do not vote; a question where no sample has a parsable
answer counts as wrong.

Tie-break (deterministic): among answers with the same count, the one whose first occurrence
comes earliest in the sample order wins.

Correctness of the vote is the grader's verdict on the winning group's first sample (the
`correct` flag of the samples file), so voting is judged exactly like top-1, multiple-choice
guards included.
"""

from __future__ import annotations

from reftune.rewards import answer_key


def vote_index(answers: list, answer_type: str) -> int | None:
    """Index of the sample that represents the majority answer (its first occurrence), or None
    when no answer is parsable."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = answer_key(answer, answer_type)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    # Highest count, then earliest first occurrence.
    winner = min(counts, key=lambda key: (-counts[key], first[key]))
    return first[winner]


def vote(answers: list, answer_type: str):
    """The majority answer (as first written among the samples), or None if none is parsable."""
    index = vote_index(answers, answer_type)
    return None if index is None else answers[index]


def vote_correct(samples: list[dict], answer_type: str) -> bool:
    """Whether the majority vote over `samples` (dicts with `answer` and `correct`) is correct."""
    index = vote_index([s["answer"] for s in samples], answer_type)
    return index is not None and bool(samples[index]["correct"])


def voting_accuracy(records: list[dict], answer_type: str, k: int) -> float:
    """Voting accuracy over the first `k` samples of each question (records of a samples file)."""
    if not records:
        raise ValueError("voting_accuracy: no records")
    return sum(vote_correct(r["samples"][:k], answer_type) for r in records) / len(records)


def ks_up_to(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself when it is not a power of two."""
    ks, value = [], 1
    while value <= k:
        ks.append(value)
        value *= 2
    if ks and ks[-1] != k:
        ks.append(k)
    return ks


def voting_curve(records: list[dict], answer_type: str, k: int) -> dict[int, float]:
    """Voting accuracy for k' in 1, 2, 4, ..., k, each on the first k' samples (one draw of k
    samples subsampled, so the points are nested rather than independent)."""
    return {kk: voting_accuracy(records, answer_type, kk) for kk in ks_up_to(k)}
