"""Reports: Markdown with PNG learning curves (matplotlib, headless), and the method comparison
(`reftune compare`) as Markdown plus a self-contained HTML page (plots embedded as data URIs)."""

from __future__ import annotations

import base64
import html
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
        *([f"Offline-ST = SFT from the base model on the gold CoTs + {summary['offline_st_data']['n_kept']} distinct "
           f"correct warm-up samples ({summary['offline_st_data']['epochs']} epochs, best on validation); Online-ST = "
           "ReFT's loop and budget with a cross-entropy update on own correct samples + gold (best step on validation)."]
          if "offline_st_data" in summary else []),
        "",
        "| method | accuracy | n | voting@k | reranking@k |",
        "|---|---|---|---|---|",
        *[f"| {m} | {summary[m]['accuracy']:.3f} | {summary[m]['n']} | {_pct_or_dash(summary[m].get('vote_accuracy'))} "
          f"| {_pct_or_dash(summary[m].get('rerank_accuracy'))} |" for m in methods],
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    if summary.get("compare"):
        lines += [f"Voting and reranking use k={summary['compare']['k']} samples per test question (T=1). "
                  f"The full comparison with plots: [compare.html]({summary['compare']['html']}) "
                  f"([compare.md]({summary['compare']['markdown']})).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _pct_or_dash(value) -> str:
    return "-" if value is None else f"{value:.3f}"


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
    """Voting and reranking accuracy against the number of samples k (log2 axis), one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    all_ks: set[int] = set()
    for ax, key, title in ((axes[0], "vote_curve", "Majority voting"), (axes[1], "rerank_curve", "Reward-model reranking")):
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


def _comparison_rows(comparison: dict, names: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    k = comparison["k"]
    header = ["method", "top-1", f"voting@{k}", f"reranking@{k}", "sample acc.", f"pass@{k}", "n", "checkpoint"]
    rows = []
    for name, m in comparison["methods"].items():
        rows.append([names.get(name, name), _pct(m["accuracy"]), _pct(m["vote_accuracy"]), _pct(m["rerank_accuracy"]),
                     _pct(m.get("sample_accuracy")), _pct(m.get("pass_at_k")), str(m["n"]), m["checkpoint"]])
    return header, rows


def _paper_rows(comparison: dict, names: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    header = ["backbone", "method", "top-1", "voting@100", "reranking@100"]
    rows = []
    for ref in comparison.get("paper", []):
        for method in ("warmup", "sft", "reft"):
            if method in ref:
                rows.append([ref["model"], names.get(method, method),
                             *["-" if v is None else f"{v:.2f}" for v in ref[method]]])
    return header, rows


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _notes(comparison: dict) -> list[str]:
    rm = comparison.get("reward_model", {})
    notes = [
        f"Task `{comparison['task']}` ({comparison['style']} CoT), split `{comparison['split']}`; accuracy in percent.",
        f"Top-1: greedy. Voting@{comparison['k']} and reranking@{comparison['k']}: {comparison['k']} samples per "
        f"question at T={comparison['temperature']}, top-p={comparison['top_p']}; answers are normalised before "
        "voting (17.99999 and 18 are one answer), ties go to the answer seen first, unparsable answers do not vote.",
        "Reranking: the sample with the highest P(correct) under the reward model among those with a parsable answer.",
        "Checkpoints: " + comparison["selection"] + ". The paper's release selected on the test set.",
    ]
    if rm.get("used"):
        detail = f" trained on {rm['n_train']} distinct training-split samples ({100 * rm['positive_fraction']:.1f}% " \
                 f"correct) from {rm['init']}" if "n_train" in rm else ""
        notes.append(f"Reward model: {rm['path']}{detail}.")
        if rm.get("warning"):
            notes.append(f"Warning: the reward model's {rm['warning']}.")
    elif rm.get("note"):
        notes.append(f"Reranking skipped: {rm['note']}.")
    return notes


def write_compare_report(out: Path, comparison: dict, reft_rows: list[dict] | None = None) -> dict[str, Path]:
    """compare.md and a self-contained compare.html (images as base64 data URIs), with the PNGs
    beside them. Returns the paths written."""
    from reftune.compare import METHOD_NAMES

    out = Path(out)
    methods = comparison["methods"]
    images = {"accuracy": out / "compare_accuracy.png", "vs_k": out / "compare_accuracy_vs_k.png"}
    plot_accuracy_bars(images["accuracy"], methods, METHOD_NAMES, comparison["k"])
    plot_accuracy_vs_k(images["vs_k"], methods, METHOD_NAMES)
    if reft_rows:
        images["reft_training"] = out / "compare_reft_training.png"
        plot_reft_training(images["reft_training"], reft_rows)
    captions = {"accuracy": "Accuracy by method", "vs_k": "Accuracy against the number of samples k",
                "reft_training": "ReFT training: rollout score, KL and response length"}

    header, rows = _comparison_rows(comparison, METHOD_NAMES)
    paper_header, paper_rows = _paper_rows(comparison, METHOD_NAMES)
    notes = _notes(comparison)

    md = ["# Method comparison", "", *[f"- {n}" for n in notes], "", *_md_table(header, rows), ""]
    if paper_rows:
        md += ["## The paper's numbers (same dataset and CoT style)", "", *_md_table(paper_header, paper_rows), ""]
    md += [f"![{captions[key]}]({path.name})\n" for key, path in images.items()]
    (out / "compare.md").write_text("\n".join(md))

    figures = "".join(
        f"<figure><img alt=\"{html.escape(captions[key])}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}\"><figcaption>{html.escape(captions[key])}</figcaption></figure>"
        for key, path in images.items())
    paper = (f"<h2>The paper's numbers (same dataset and CoT style)</h2>{_html_table(paper_header, paper_rows)}"
             if paper_rows else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>reftune: method comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child, td:last-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Method comparison</h1>
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes)}</ul>
{_html_table(header, rows)}
{paper}
{figures}
</body></html>
"""
    (out / "compare.html").write_text(page)
    return {"markdown": out / "compare.md", "html": out / "compare.html", **images}
