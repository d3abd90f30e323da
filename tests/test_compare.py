"""`reftune compare` and `reftune sample`: the report renders (every image it references is there and
is a PNG; headless chromium opens the page when installed), the paper's numbers appear where the
dataset matches, and sampling resumes after a kill without losing or duplicating questions."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import small_data, small_overrides

from reftune.cli import main
from reftune.compare.compare import CompareConfig, check_samples_origin, paper_reference, run_compare
from reftune.compare.report import write_compare_report
from reftune.trainers.reward_model import RewardModelConfig
from reftune.inference.sample import read_samples

PNG = b"\x89PNG\r\n\x1a\n"


def image_sources(page: str) -> list[str]:
    return re.findall(r"<img[^>]*\bsrc=\"([^\"]+)\"", page)


def assert_images_resolve(folder: Path, page: str) -> int:
    """Every <img> of the HTML page is a PNG data URI (or an existing PNG file); returns the count."""
    sources = image_sources(page)
    for src in sources:
        if src.startswith("data:"):
            assert src.startswith("data:image/png;base64,"), src[:40]
            assert base64.b64decode(src.split(",", 1)[1], validate=True)[:8] == PNG
        else:
            assert (folder / src).read_bytes()[:8] == PNG, src
    return len(sources)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, warmup_model, small_task):
    """A real compare run on the tiny models: three 'methods', k=4, a reward model trained here,
    and a fake ReFT run folder whose metrics.jsonl feeds the training-curves plot."""
    root = tmp_path_factory.mktemp("compare")
    reft_run = root / "reft_run"
    reft_run.mkdir()
    (reft_run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reft/score": 0.1 * s, "reft/kl": 0.01 * s, "reft/response_length": 30 - s}) + "\n"
        for s in range(1, 6)) + json.dumps({"step": 5, "eval/validation_accuracy": 0.2}) + "\n")
    cfg = CompareConfig(data=small_data(), out_dir=str(root / "out"), warmup=warmup_model, sft=warmup_model,
                        reft=warmup_model, reft_run=str(reft_run), k=4, max_new_tokens=30, rm_k=2, chunk_size=8,
                        device="cpu", progress=False,
                        rm=RewardModelConfig(epochs=1, lr=1e-3, batch_size=16, progress=False))
    return root / "out", run_compare(cfg, task=small_task)


def test_compare_results_and_files(comparison):
    out, result = comparison
    assert list(result["methods"]) == ["warmup", "sft", "reft"]
    for entry in result["methods"].values():
        assert entry["k"] == 4 and entry["n"] == 16
        for key in ("accuracy", "vote_accuracy", "rerank_accuracy", "sample_accuracy", "pass_at_k"):
            assert 0.0 <= entry[key] <= 1.0, key
        assert list(entry["vote_curve"]) == [1, 2, 4] and list(entry["rerank_curve"]) == [1, 2, 4]
        assert list(entry["pass_curve"]) == [1, 2, 3, 4]  # unbiased pass@k for every k <= 4
        assert entry["pass_curve"][4] == entry["pass_at_k"] and entry["pass_curve"][1] == pytest.approx(entry["sample_accuracy"])
        assert entry["pass_curve"][1] <= entry["pass_curve"][2] <= entry["pass_curve"][4]
    assert result["reward_model"]["used"] and Path(result["reward_model"]["path"]).exists()
    assert json.loads((out / "compare.json").read_text())["k"] == 4
    for name in ("warmup", "sft", "reft"):
        assert len(read_samples(out / "samples" / f"{name}_test.jsonl")) == 16
        assert (out / "eval" / name / "test_predictions.jsonl").exists()
    # the reward model's training samples: the warm-up model over the training split
    assert len(read_samples(out / "rm" / "train_samples.jsonl")) == 64


def test_compare_html_is_self_contained(comparison):
    out, _ = comparison
    page = (out / "compare.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert assert_images_resolve(out, page) == 3  # accuracy bars, accuracy vs k, ReFT training curves
    assert "Warm-up" in page and "ReFT" in page and "voting@4" in page
    md = (out / "compare.md").read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / name).read_bytes()[:8] == PNG


def test_compare_html_opens_in_headless_chromium(comparison, tmp_path):
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if exe is None:
        assert not os.environ.get("REFTUNE_REQUIRE_BROWSER"), "REFTUNE_REQUIRE_BROWSER is set but chromium is missing"
        pytest.skip("chromium is not installed on this machine (not on PATH): the headless rendering check "
                    "needs a browser; the HTML and its images are still checked by test_compare_html_is_self_contained")
    out, _ = comparison
    shot = tmp_path / "page.png"
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,1600", (out / "compare.html").as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 10_000


def test_paper_numbers_appear_where_the_dataset_matches(tmp_path):
    assert [r["model"] for r in paper_reference("gsm8k_reft", "program")] == ["CodeLlama-7B", "Galactica-6.7B"]
    assert paper_reference("arithmetic", "program") == [] and len(paper_reference("svamp", "program")) == 1
    method = {"checkpoint": "x", "accuracy": 0.5, "n": 10, "k": 2, "vote_accuracy": 0.6, "rerank_accuracy": None,
              "vote_curve": {"1": 0.5, "2": 0.6}, "rerank_curve": None}
    comparison = {"task": "gsm8k", "style": "program", "split": "test", "k": 2, "temperature": 1.0, "top_p": 1.0,
                  "selection": "as given", "methods": {"sft": method}, "reward_model": {"used": False, "note": "none"},
                  "paper": paper_reference("gsm8k", "program")}
    paths = write_compare_report(tmp_path, comparison, reft_rows=[])
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    for text in (md, page):
        assert "75.28" in text and "63.68" in text and "Galactica-6.7B" in text and "Reranking skipped" in text
    assert assert_images_resolve(tmp_path, page) == 2  # no ReFT metrics: no training-curves plot


def test_compare_refuses_to_resume_samples_of_another_checkpoint(tmp_path):
    path = tmp_path / "samples" / "sft_test.jsonl"
    origin = {"checkpoint": "a", "k": 4, "temperature": 1.0}
    check_samples_origin(path, origin)  # nothing there yet: records the origin
    path.write_text("")
    check_samples_origin(path, dict(origin))  # same origin: resumes
    with pytest.raises(ValueError, match="checkpoint"):
        check_samples_origin(path, {**origin, "checkpoint": "b"})


# ------------------------------------------------------------------------------------ sample resume

def test_sample_resumes_after_a_torn_write(capsys, warmup_model, tmp_path):
    args = ["sample", f"model={warmup_model}", "split=test", "k=3", "chunk_size=4", "max_new_tokens=20",
            "device=cpu", "progress=false", *small_overrides()]
    assert main([*args, f"out_dir={tmp_path / 'full'}"]) == 0
    full = (tmp_path / "full" / "test_samples.jsonl").read_text().splitlines()
    summary = json.loads((tmp_path / "full" / "test_samples_summary.json").read_text())
    assert len(full) == 16 and summary["n"] == 16 and summary["k"] == 3
    assert all(len(json.loads(x)["samples"]) == 3 for x in full)

    # a kill during the second chunk: 5 complete lines and half of the sixth
    cut = tmp_path / "cut"
    cut.mkdir()
    torn = "\n".join(full[:5]) + "\n" + full[5][: len(full[5]) // 2]
    (cut / "test_samples.jsonl").write_text(torn)
    assert len(read_samples(cut / "test_samples.jsonl")) == 5  # the torn line is dropped when read
    capsys.readouterr()
    assert main([*args, f"out_dir={cut}"]) == 0
    resumed = (cut / "test_samples.jsonl").read_text().splitlines()
    ids = [json.loads(x)["id"] for x in resumed]
    assert len(ids) == 16 and len(set(ids)) == 16  # complete, no duplicates
    # chunks are seeded by position: the re-drawn questions get the samples they would have had
    assert sorted(resumed) == sorted(full)

    # resuming with other sampling settings would mix two distributions in one file: refused
    capsys.readouterr()
    assert main([*args, f"out_dir={cut}", "temperature=0.5"]) == 2
    assert "temperature" in capsys.readouterr().err

    # a damaged line that is not the last one is an error, not silently dropped
    (cut / "test_samples.jsonl").write_text(full[0] + "\n{broken\n" + full[1] + "\n")
    capsys.readouterr()
    assert main([*args, f"out_dir={cut}"]) == 2
    assert "line 2" in capsys.readouterr().err
