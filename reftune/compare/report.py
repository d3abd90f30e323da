"""The method comparison (`reftune compare`) as Markdown plus a self-contained HTML page (plots
embedded as data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from reftune.compare.methods import METHOD_NAMES
from reftune.compare.plots import plot_accuracy_bars, plot_accuracy_vs_k, plot_reft_training


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
        f"pass@{comparison['k']}: the unbiased estimate (Chen et al., 2021) that one of {comparison['k']} samples is "
        "correct, the ceiling of voting and reranking; the plot shows pass@k for every k.",
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
