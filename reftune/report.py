"""Reports: Markdown with PNG learning curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_learning_curves(path: Path, sft_history: list[dict], reft_history: list[dict], eval_split: str = "validation") -> None:
    """Left: SFT train loss and validation accuracy per epoch. Right: ReFT rollout score and
    validation accuracy per PPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    right.set_ylim(0, 1)
    right.set_xlabel("PPO step")
    right.set_title("ReFT")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_demo_report(out: Path, summary: dict, sft_history: list[dict], reft_history: list[dict]) -> Path:
    out = Path(out)
    plot_learning_curves(out / "learning_curves.png", sft_history, reft_history)
    methods = [m for m in ("warmup", "sft", "reft", "offline_st", "online_st") if m in summary]
    lines = [
        "# reftune demo",
        "",
        f"Task `{summary['task']}` ({summary['style']} CoT), seed {summary['seed']}, "
        f"wall time {summary['wall_seconds']:.0f} s{' (quick mode: numbers are meaningless)' if summary.get('quick') else ''}.",
        f"Warm-up = SFT epoch {summary['warmup_epoch']}; SFT baseline = best epoch on validation "
        f"({summary['sft_best_epoch']}); ReFT = best PPO step on validation. Accuracy: greedy top-1 on the test split.",
        "",
        "| method | accuracy | n |",
        "|---|---|---|",
        *[f"| {m} | {summary[m]['accuracy']:.3f} | {summary[m]['n']} |" for m in methods],
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
