"""Plots (matplotlib, headless) for the comparison report and the demo's learning curves."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_bars(path: Path, methods: dict[str, dict], names: dict[str, str], k: int) -> None:
    """Grouped bars: greedy top-1, voting@k and reranking@k of each method."""
    plt = _pyplot()
    kinds = [("accuracy", "top-1 (greedy)"), ("vote_accuracy", f"voting@{k}"), ("rerank_accuracy", f"reranking@{k}")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(methods) + 2), 4))
    width = 0.8 / len(kinds)
    for j, (key, label) in enumerate(kinds):
        xs = [i + (j - 1) * width for i in range(len(methods))]
        ys = [m.get(key) if m.get(key) is not None else 0.0 for m in methods.values()]
        bars = ax.bar(xs, ys, width, label=label)
        for x, m, bar in zip(xs, methods.values(), bars):
            text = "n/a" if m.get(key) is None else f"{100 * m[key]:.1f}"
            ax.text(x, bar.get_height() + 0.01, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([names.get(m, m) for m in methods])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Accuracy by method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_k(path: Path, methods: dict[str, dict], names: dict[str, str]) -> None:
    """Voting, reranking and pass@k against the number of samples k (log2 axis), one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    all_ks: set[int] = set()
    panels = ((axes[0], "vote_curve", "Majority voting"), (axes[1], "rerank_curve", "Reward-model reranking"),
              (axes[2], "pass_curve", "pass@k (unbiased)"))
    for ax, key, title in panels:
        drawn = False
        for name, m in methods.items():
            curve = m.get(key)
            if not curve:
                continue
            # Keys are ints in memory and strings once read back from compare.json.
            points = sorted((int(kk), value) for kk, value in curve.items())
            ax.plot(*zip(*points), "o-", label=names.get(name, name))
            all_ks.update(kk for kk, _ in points)
            drawn = True
        ax.set_xscale("log", base=2)
        if all_ks:
            ax.set_xticks(sorted(all_ks), [str(kk) for kk in sorted(all_ks)])
        ax.set_xlabel("k (samples per question)")
        ax.set_title(title)
        ax.set_ylim(0, 1.05)
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no reward model", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reft_training(path: Path, rows: list[dict]) -> None:
    """ReFT's rollout score, KL to the reference and response length against the PPO step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in rows]
    for ax, key, title in zip(axes, ("reft/score", "reft/kl", "reft/response_length"),
                              ("rollout score", "KL to the warm-up model", "response length (tokens)")):
        values = [r.get(key) for r in rows]
        ax.plot(steps, [v if isinstance(v, (int, float)) else float("nan") for v in values], color="tab:orange")
        ax.set_xlabel("PPO step")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(path: Path, sft_history: list[dict], reft_history: list[dict], eval_split: str = "validation") -> None:
    """Left: SFT train loss and validation accuracy per epoch. Right: ReFT rollout score and
    validation accuracy per PPO step."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in sft_history]
    left.plot(epochs, [h["train_loss"] for h in sft_history], "o-", color="tab:gray", label="train loss")
    left.set_xlabel("SFT epoch")
    left.set_ylabel("loss per token")
    acc_key = f"{eval_split}_accuracy"
    if any(acc_key in h for h in sft_history):
        twin = left.twinx()
        twin.plot(epochs, [h.get(acc_key) for h in sft_history], "s-", color="tab:blue", label=f"{eval_split} acc")
        twin.set_ylabel("accuracy")
        twin.set_ylim(0, 1)
        twin.legend(loc="center right")
    left.legend(loc="upper right")
    left.set_title("SFT (warm-up and baseline)")
    steps = [h["step"] for h in reft_history]
    right.plot(steps, [h["reft/score"] for h in reft_history], color="tab:orange", alpha=0.5, label="rollout score")
    evals = [(h["step"], h[f"eval/{eval_split}_accuracy"]) for h in reft_history if f"eval/{eval_split}_accuracy" in h]
    if evals:
        right.plot(*zip(*evals), "s-", color="tab:green", label=f"{eval_split} acc (greedy)")
    sft_accs = [h[acc_key] for h in sft_history if h.get(acc_key) is not None]
    if sft_accs:  # the bar ReFT has to clear: the best SFT epoch on the same split
        right.axhline(max(sft_accs), color="tab:blue", linestyle="--", label=f"best SFT epoch ({eval_split})")
    right.set_ylim(0, 1)
    right.set_xlabel("PPO step")
    right.set_title("ReFT")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
