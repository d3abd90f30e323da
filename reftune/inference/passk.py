"""pass@k: the chance that at least one of k samples of a question is correct.

With n samples of which c are correct, the unbiased estimate for any k <= n (Chen et al., 2021,
"Evaluating Large Language Models Trained on Code") is

    pass@k = 1 - C(n - c, k) / C(n, k)

the chance that k samples drawn without replacement from the n include a correct one. Taking the
share of questions whose first k samples include a correct one instead is unbiased too but noisier,
and "any of the n correct" is only pass@n. The ratio of binomials is computed as a product, so
it neither overflows for n = 100 nor loses precision.
"""

from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with `n` samples, `c` of them correct (0 <= c <= n, 1 <= k <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k includes a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_curve(records: list[dict], k_max: int | None = None) -> dict[int, float]:
    """Mean unbiased pass@k over questions for k = 1 .. k_max (default: the fewest samples any
    question has). `records`: samples records (`{"samples": [{"correct": bool}, ...]}`); questions
    without samples are left out. Keys are ints; JSON writers turn them into strings."""
    counts = [(len(r["samples"]), sum(bool(s["correct"]) for s in r["samples"])) for r in records if r["samples"]]
    if not counts:
        return {}
    fewest = min(n for n, _ in counts)
    k_max = fewest if k_max is None else min(k_max, fewest)
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in range(1, k_max + 1)}
