"""Answer formats (reftune/rewards/formats.py), TRL's conversational rows in the json/hf loaders
(reftune/tasks/conversations.py), and where the presets' files are looked up (data.data_dir,
$REFTUNE_DATA_DIR, ./data)."""

from __future__ import annotations

import json
import sys

import pytest

from reftune.rewards import formats
from reftune.rewards.formats import answer_line, extract_final, find_answer, resolve_answer_format
from reftune.tasks import DataConfig, load_task
from reftune.tasks.datasets import DatasetError, Fields, convert_row, hf_rows_to_examples, load_dataset_task, nl_target
from reftune.types import Example


@pytest.mark.parametrize("text, fmt, answer_type, expected", [
    ("24 + 48 = 72\nTherefore, the answer is: 1,080.", "reft", "number", "1080"),
    ("Therefore the answer is <203>.", "reft", "number", "203"),
    ("So the answer is 42.", "answer_is", "number", "42"),
    ("Therefore, the answer is 7", "answer_is", "number", "7"),
    ("The final answer is: $\\frac{3}{4}$", "answer_is", "number", "0.75"),
    ("48/2 = 24\n#### 72", "gsm8k", "number", "72"),
    ("so $\\boxed{\\frac{1}{2}}$ in all", "boxed", "number", "0.5"),
    ("\\boxed{3} first, then \\boxed{{12}}", "boxed", "number", "12"),
    ("The answer is 3.\nChecking: \\boxed{5}", "any", "number", "5"),
    ("\\boxed{5} hmm\n#### 7", "any", "number", "7"),
    ("#### 7\nTherefore, the answer is: 9", "any", "number", "9"),
    ("Hence \\boxed{C}", "boxed", "choice", "c"),
    ("The answer is (B).", "answer_is", "choice", "b"),
    ("Therefore, the answer is: e )", "reft", "choice", "e"),
])
def test_one_extractor_for_every_format(text, fmt, answer_type, expected):
    assert extract_final(text, answer_type, fmt) == (expected, "")


@pytest.mark.parametrize("text, fmt, reason", [
    ("\\boxed{5}", "reft", "no answer line"),
    ("The answer is 5", "gsm8k", "no answer line"),
    ("so \\boxed{5", "boxed", "no \\boxed{} answer"),  # never closed
    ("The answer is many.", "answer_is", "answer is not a number"),
])
def test_no_answer_in_the_format_says_why(text, fmt, reason):
    assert extract_final(text, "number", fmt) == (None, reason)


@pytest.mark.parametrize("fmt", ["reft", "answer_is", "gsm8k", "boxed", "any"])
def test_the_line_a_format_writes_reads_back(fmt):
    for answer in ("72", "0.5", "c"):
        assert find_answer(f"some reasoning\n{answer_line(answer, fmt)}", fmt).strip().rstrip(".") == answer


def test_auto_is_chosen_per_dataset_and_overridable():
    assert [resolve_answer_format("auto", n) for n in ("arithmetic", "svamp", "gsm8k", "mathqa")] == ["reft"] * 4
    assert resolve_answer_format("auto", "json") == resolve_answer_format("auto", "hf") == "any"
    assert resolve_answer_format("boxed", "svamp") == "boxed"
    with pytest.raises(ValueError, match="data.answer_format must be one of auto, reft, answer_is, gsm8k, boxed, any"):
        resolve_answer_format("latex", "svamp")


def test_gold_cots_state_the_answer_the_way_it_is_read():
    assert nl_target("24 + 48 = 72", "72", "number", "boxed") == "24 + 48 = 72\n\\boxed{72}"
    assert nl_target("24 + 48 = 72\n#### 72", "72", "number", "gsm8k") == "24 + 48 = 72\n#### 72"
    assert nl_target("so \\boxed{71}", "72", "number", "boxed") is None  # contradicts the gold answer
    task = load_task(DataConfig(style="nl", n_train=8, n_test=4, validation_size=2, answer_format="gsm8k"))
    assert all(ex.cot.splitlines()[-1] == f"#### {ex.answer}" for ex in task.train)
    assert all(g.correct for g in task.grade([ex.cot for ex in task.train], task.train))


# ---------------------------------------------------------------------------------------------- LaTeX

def test_latex_that_needs_math_verify_is_no_answer_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    answer, why = extract_final("so \\boxed{\\sqrt{2}}", "number", "boxed")
    assert answer is None and "math-verify" in why and "pip install 'reftune[latex]'" in why
    # Plain LaTeX (fractions, boxes, text) needs no extra.
    assert extract_final("\\boxed{\\dfrac{3}{4}\\text{ cups}}", "number", "boxed") == ("0.75", "")
    with pytest.raises(DatasetError, match=r"row 0: gold answer '\\\\pi/2' is a LaTeX answer that needs math-verify "
                                           r"\(pip install 'reftune\[latex\]'\)"):
        convert_row({"question": "q", "answer_value": "\\pi/2"}, 0, fields=Fields(), answer_type="number",
                    style="program", need_cot=False, source="f.json")


def test_needs_math_verify_only_for_commands_the_plain_rules_misread():
    assert formats.needs_math_verify("\\sqrt{2}") and formats.needs_math_verify("2\\cdot 3")
    assert not formats.needs_math_verify("\\frac{1}{2}") and not formats.needs_math_verify("\\$5\\,000")
    assert not formats.needs_math_verify("$5 \\times 3 = 15$ apples\n\\sqrt{2} later")  # the number is 15
    assert extract_final("The answer is $5 \\times 3 = 15$", "number", "answer_is") == ("15", "")


# ---------------------------------------------------------------------------------------------- TRL rows

CONVERSATIONAL = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                  {"role": "assistant", "content": "2 + 3 = 5\nThe answer is 5"}], "answer_value": "5", "level": 1},
    {"prompt": [{"role": "user", "content": "What is 4+4?"}],
     "completion": [{"role": "assistant", "content": "4 + 4 = 8\n#### 8"}], "level": 2},
    {"prompt": "What is 1+6?", "completion": "1 + 6 = 7\n\\boxed{7}", "item_id": "own-id"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_json_loader_reads_trls_conversational_rows(tmp_path):
    train = _write(tmp_path / "train.jsonl", CONVERSATIONAL)
    test = _write(tmp_path / "test.jsonl", [{"prompt": [{"role": "user", "content": "What is 9+1?"}],
                                              "answer_value": "10"}])
    task = load_dataset_task(DataConfig(name="json", style="nl", train_path=train, test_path=test, validation_size=0))
    assert task.answer_format == "any"  # auto for your own files
    a, b, c = task.train
    assert (a.question, a.answer, a.cot) == ("What is 2+3?", "5", "2 + 3 = 5\nThe answer is 5")
    assert a.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"})
    assert a.columns == {"level": 1}
    # No answer field: the gold answer is what the gold completion states.
    assert (b.question, b.answer, b.cot, b.columns) == ("What is 4+4?", "8", "4 + 4 = 8\n#### 8", {"level": 2})
    assert (c.id, c.question, c.answer, c.messages) == ("own-id", "What is 1+6?", "7", None)
    (t,) = task.test
    assert (t.question, t.answer, t.cot) == ("What is 9+1?", "10", None)
    # The plain prompt uses the last user turn; the row's system turn is for chat prompts.
    assert task.prompt(a) == "Question:\nWhat is 2+3?\nAnswer reasoning:\n"
    assert task.messages(a)[0] == {"role": "system", "content": "Be brief."}


def test_hf_rows_may_be_conversational():
    cfg = DataConfig(name="hf", hf_id="x", style="nl")
    out = hf_rows_to_examples(CONVERSATIONAL[:2], cfg, "train", True, {})
    assert [(ex.question, ex.answer) for ex in out] == [("What is 2+3?", "5"), ("What is 4+4?", "8")]


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user"}]}, r"line 1: messages\[0\] must be \{\"role\": ..., \"content\": \"text\"\}"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\] has role 'robot'"),
    ({"prompt": [{"role": "system", "content": "x"}], "completion": [{"role": "assistant", "content": "1"}]},
     r"prompt has no user turn with the question"),
    ({"messages": [{"role": "user", "content": "q"}], "answer_value": "1"}, r"a training row needs the answer turn"),
    ({"prompt": "q", "completion": "no answer stated"}, r"missing field 'answer_value', and the completion states "
                                                        r"no answer in data.answer_format=any"),
    ({"prompt": "q", "completion": {"a": 1}}, r"'completion' must be text when 'prompt' is text"),
])
def test_bad_conversational_rows_name_the_line(tmp_path, row, message):
    path = _write(tmp_path / "train.jsonl", [row])
    test = _write(tmp_path / "test.jsonl", [{"question": "q", "answer_value": "1"}])
    with pytest.raises(DatasetError, match=message):
        load_dataset_task(DataConfig(name="json", train_path=path, test_path=test, style="nl", validation_size=0))


# ---------------------------------------------------------------------------------------------- data folder

def test_data_dir_is_the_config_then_the_environment_then_dot_data(tmp_path, monkeypatch):
    from reftune.tasks.datasets import data_dir

    monkeypatch.setenv("REFTUNE_DATA_DIR", str(tmp_path / "env"))
    assert data_dir(DataConfig()) == tmp_path / "env"
    assert data_dir(DataConfig(data_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("REFTUNE_DATA_DIR")
    assert str(data_dir(DataConfig())) == "data"


def test_a_missing_preset_file_names_the_folder_and_how_it_was_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("REFTUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=r"svamp_test_set.json: file not found .* in the data folder "
                                           rf"{tmp_path} \(from \$REFTUNE_DATA_DIR, as data.data_dir is empty\); "
                                           r"set data.data_dir or \$REFTUNE_DATA_DIR"):
        load_dataset_task(DataConfig(name="svamp", style="nl"))
    monkeypatch.delenv("REFTUNE_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"in the data folder data \(from the default ./data, as data.data_dir is "
                                           r"empty and \$REFTUNE_DATA_DIR is not set\)"):
        load_dataset_task(DataConfig(name="gsm8k", style="nl"))


def test_the_tests_shared_data_folder_comes_through_the_environment():
    """tests/conftest.py points $REFTUNE_DATA_DIR at the shared folder: presets load with no data_dir."""
    task = load_dataset_task(DataConfig(name="svamp", style="nl", test_only=True))
    assert len(task.test) == 1000 and isinstance(task.test[0], Example)
