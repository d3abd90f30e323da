"""bench/demo_study.py's variant table: margins against each seed's SFT, worked out by hand."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def study():
    sys.path.insert(0, str(BENCH))
    try:
        import demo_study
    finally:
        sys.path.pop(0)
    return demo_study


def write_seed(out: Path, seed: int, sft_val: float, sft_test: float, reft_vals: list[float], reft_test: float):
    """A finished demo run as the table reads it: summary, SFT history, ReFT's validation records."""
    base = out / f"fp32-seed-{seed}"
    (base / "sft").mkdir(parents=True)
    (base / "reft").mkdir()
    (base / "summary.json").write_text(json.dumps(
        {"sft_best_epoch": 2, "sft": {"accuracy": sft_test}, "reft": {"accuracy": reft_test}}))
    (base / "sft" / "result.json").write_text(json.dumps(
        {"history": [{"epoch": 1, "validation_accuracy": 0.01}, {"epoch": 2, "validation_accuracy": sft_val}]}))
    records = [{"step": 20 * (i + 1), "eval/validation_accuracy": v} for i, v in enumerate(reft_vals)]
    (base / "reft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1}, *records]))


def write_variant(out: Path, name: str, seed: int, validation: float, test: float, cpu: float,
                  vals: list[float] = ()):
    folder = out / "variants" / f"{name}-seed-{seed}"
    (folder / "reft").mkdir(parents=True)
    records = [{"step": 20 * (i + 1), "eval/validation_accuracy": v} for i, v in enumerate(vals)]
    (folder / "reft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "result.json").write_text(json.dumps(
        {"overrides": ["reft.max_staleness=1"], "validation": validation, "test": test, "best_step": 40,
         "reft_cpu_seconds": cpu, "reft_wall_seconds": cpu / 2}))


def test_variant_margins_are_against_each_seeds_sft(tmp_path, study):
    # seed 0: SFT val 0.40, test 0.50; the demo's ReFT best val 0.45 (at step 40), test 0.55
    # seed 1: SFT val 0.30, test 0.40; the demo's ReFT best val 0.35 (at step 20), test 0.42
    write_seed(tmp_path, 0, 0.40, 0.50, [0.44, 0.45, 0.45], 0.55)
    write_seed(tmp_path, 1, 0.30, 0.40, [0.35, 0.30], 0.42)
    write_variant(tmp_path, "async", 0, 0.48, 0.60, 300.0)
    write_variant(tmp_path, "async", 1, 0.29, 0.39, 500.0)
    lines, report = study.variants_table(tmp_path, [0, 1], {"async": ["reft.max_staleness=1"]}, jobs=1)
    # default: val margins +5, +5 -> +5.00; test margins +5, +2 -> +3.50, worst +2.00
    assert report["default"]["validation_margin"] == pytest.approx(5.0)
    assert report["default"]["test_margin"] == pytest.approx(3.5)
    assert report["default"]["per_seed"][0]["best_step"] == 40  # the first step at the best accuracy
    # async: val +8, -1 -> +3.50; test +10, -1 -> +4.50 (worst -1.00); CPU (300 + 500) / 2 = 400
    assert report["async"]["validation_margin"] == pytest.approx(3.5)
    assert report["async"]["test_margin"] == pytest.approx(4.5)
    text = "\n".join(lines)
    assert "| **async** | mean | | | | | **+3.50** | **+4.50** (worst -1.00) | 400 |" in text
    assert "| default | the demo | 1 | 20 | 35.00 | 42.00 | +5.00 | +2.00 | - |" in text


def test_a_variant_needs_a_name_and_overrides(study):
    assert study.parse_variant("dapo:reft.clip_high=0.28,reft.loss_aggregation=token_mean") == (
        "dapo", ["reft.clip_high=0.28", "reft.loss_aggregation=token_mean"])
    for bad in ("dapo", ":reft.clip_high=0.28", "default:reft.clip_high=0.28"):
        with pytest.raises(Exception, match="a variant is NAME"):
            study.parse_variant(bad)


def test_margin_by_step_is_the_best_validation_up_to_that_step(tmp_path, study):
    # SFT validation: seed 0 0.40, seed 1 0.30. Validation logged at steps 20, 40, 60.
    write_seed(tmp_path, 0, 0.40, 0.50, [0.44, 0.45, 0.45], 0.55)
    write_seed(tmp_path, 1, 0.30, 0.40, [0.35, 0.30, 0.36], 0.42)
    write_variant(tmp_path, "dapo", 0, 0.50, 0.60, 300.0, vals=[0.38, 0.50, 0.41])
    write_variant(tmp_path, "dapo", 1, 0.34, 0.39, 500.0, vals=[0.31, 0.29, 0.34])
    lines, report = study.by_step_table(tmp_path, [0, 1], ["dapo"], [10, 30, 40, 60, 80])
    # by 10: nothing evaluated yet; by 80: the runs stopped at 60. by 30 (= step 20): default (+4 +5)/2 = +4.5, dapo (-2 +1)/2 = -0.5;
    # by 40: default (+5 +5)/2 = +5, dapo (+10 +1)/2 = +5.5; by 60: default (+5 +6)/2 = +5.5, dapo (+10 +4)/2 = +7
    assert report["default"] == pytest.approx({10: None, 30: 4.5, 40: 5.0, 60: 5.5, 80: None})
    assert report["dapo"] == pytest.approx({10: None, 30: -0.5, 40: 5.5, 60: 7.0, 80: None})
    assert "| dapo | - | -0.50 | +5.50 | +7.00 | - |" in lines
