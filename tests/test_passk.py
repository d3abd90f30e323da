"""pass@k: the unbiased estimator's numbers worked out by hand, and `reftune eval k=N` reporting it."""

from __future__ import annotations

import json
import math

import pytest
from conftest import small_overrides

from reftune.inference.passk import pass_at_k, pass_at_k_curve


def test_pass_at_k_by_hand():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k=1 is the share of correct samples: c/n
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    # no correct sample: 0 for every k; n - c < k: every draw holds a correct one
    assert pass_at_k(6, 0, 3) == 0.0 and pass_at_k(6, 4, 3) == 1.0
    # n=100, c=1, k=10: 1 - C(99,10)/C(100,10) = 1 - 90/100 = 0.1, without overflow
    assert pass_at_k(100, 1, 10) == pytest.approx(0.1)
    assert pass_at_k(100, 30, 50) == pytest.approx(1 - math.comb(70, 50) / math.comb(100, 50))


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_curve_averages_questions_and_stops_at_the_fewest_samples():
    records = [{"samples": [{"correct": True}, {"correct": False}, {"correct": False}, {"correct": False}]},
               {"samples": [{"correct": False}] * 4},
               {"samples": []}]  # no samples: left out
    curve = pass_at_k_curve(records)
    # question 1: pass@k = k/4 (one correct of 4); question 2: 0
    assert curve == pytest.approx({1: 0.125, 2: 0.25, 3: 0.375, 4: 0.5})
    assert list(pass_at_k_curve(records, 2)) == [1, 2]
    assert pass_at_k_curve([]) == {}


def test_eval_with_k_reports_pass_at_1_to_k_beside_greedy(warmup_model, tmp_path):
    from reftune.cli import main

    out = tmp_path / "eval"
    code = main(["eval", f"model={warmup_model}", f"out_dir={out}", "k=4", "max_new_tokens=24", "device=cpu",
                 "split=test", "progress=false", *small_overrides()])
    assert code == 0
    summary = json.loads((out / "test_summary.json").read_text())
    records = [json.loads(line) for line in (out / "test_samples.jsonl").read_text().splitlines()]
    assert summary["k"] == 4 and "accuracy" in summary  # greedy top-1 stays
    assert len(records) == summary["n"] and all(len(r["samples"]) == 4 for r in records)
    expected = pass_at_k_curve(records)
    assert [summary[f"pass@{k}"] for k in range(1, 5)] == pytest.approx([expected[k] for k in range(1, 5)])
    assert summary["pass@1"] == pytest.approx(summary["sample_accuracy"])
    assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"]
