"""File-backed tasks: GSM8K's own JSONL, the ReFT release's JSON files, any JSON/JSONL file, and
Hugging Face `datasets`.

Every source goes through one row converter (`convert_row`), so all of them check rows the same
way: a malformed line, a missing field or an unparsable gold answer is a `DatasetError` naming the
file and line/row, or (with `data.skip_bad_rows`) a skipped row counted in `task.stats`.

Training rows are also cleaned of what would teach the model something wrong (each counted in
`task.stats` and logged): rows listed in `KNOWN_BAD_GOLD`, N-CoT rows whose gold CoT states
another answer than the gold answer, exact duplicates of a test question. The validation split is
held out from the training file (seeded), never from the test set.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from reftune.config import read_text_utf8
from reftune.rewards import answers, formats, grading
from reftune.tasks.base import NL_ANSWER_PREFIX, DataConfig, Example, Task
from reftune.tasks.conversations import conversational_row, other_columns

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file or row that cannot be used, with the file and line/row in the message."""


@dataclass(frozen=True)
class Release:
    prefix: str
    """File name prefix in the ReFT release (`{prefix}_nl.json`, ...)."""
    answer_type: str


# The ReFT release (data/ in lqtrung1998/mwp_ReFT): N-CoT `{prefix}_nl.json`, P-CoT
# `{prefix}_python_sdp.json`, test `{prefix}_test_set.json`; rows are item_id/question/answer_cot/
# answer_value. Only SVAMP's training files and the four test sets ship in ../shared/data.
RELEASE = {
    "svamp": Release("svamp", "number"),
    "gsm8k_reft": Release("gsm8k", "number"),
    "mathqa": Release("mathqa", "choice"),
    "mathqa_numeric": Release("mathqa-numeric", "number"),
}
RELEASE_TRAIN_FILE = {"nl": "{prefix}_nl.json", "program": "{prefix}_python_sdp.json"}
RELEASE_TEST_FILE = "{prefix}_test_set.json"
GSM8K_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}

# Gold rows inspected by hand and found broken (bench/check_gold.py lists every failing row; the
# tests assert that exactly these fail). They are dropped from training: SFT would learn them.
KNOWN_BAD_GOLD: dict[str, dict[str, str]] = {
    "svamp_nl.json": {
        **{i: "no reasoning: the CoT only says the question was answered before (no answer line)"
           for i in ("svamp_852", "svamp_993", "svamp_1085", "svamp_1650", "svamp_1753",
                     "svamp_2033", "svamp_2109", "svamp_2636", "svamp_2697")},
        "svamp_2000": "arithmetic slip: 53.2 / 76.7 x 100 is 69.36, the CoT says 69.32; answer_value 69.4",
        "svamp_929": "label and CoT both wrong: answer_value is 134 / 15 = 8.93 large trucks, the CoT "
                     "rounds it up to 9; the answer is 8 (8 x 15 + 2 x 7 = 134)",
    },
    "svamp_python_sdp.json": {},
}

_GSM8K_NOTE_RE = re.compile(r"<<[^<>]*>>")  # calculator annotations: "48/2 = <<48/2=24>>24"
_OPTION_START = r"(?:^|,\s*){letter}\s*\)\s*"


# ----------------------------------------------------------------------------------------------
# rows -> examples
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fields:
    """Which row fields hold what. cot == answer means GSM8K style: reasoning, then `#### 72`."""

    question: str = "question"
    cot: str = "answer_cot"
    answer: str = "answer_value"
    id: str = "item_id"


def parse_options(question: str) -> dict[str, str] | None:
    """MathQA options from the question's last line: `a ) 38 , b ) 27.675 , ...` (also the
    `['a ) 12', 'b ) 15', ...]` form and doubled labels `b ) b ) 120 %`), or None."""
    line = question.strip().splitlines()[-1].strip() if question.strip() else ""
    if line.startswith("[") and line.endswith("]"):
        try:
            items = ast.literal_eval(line)
            line = " , ".join(str(x) for x in items)
        except (ValueError, SyntaxError):
            pass
    marks, pos = [], 0
    for letter in answers.LETTERS:
        m = re.compile(_OPTION_START.format(letter=letter)).search(line, pos)
        if m is None:
            break
        marks.append((letter, m.start(), m.end()))
        pos = m.end()
    if len(marks) < 2 or marks[0][1] != 0:
        return None
    options = {}
    for k, (letter, _, end) in enumerate(marks):
        stop = marks[k + 1][1] if k + 1 < len(marks) else len(line)
        text = line[end:stop].strip().rstrip(",").strip()
        options[letter] = re.sub(rf"^{letter}\s*[).]\s*", "", text)  # "b ) b ) 120 %", "a ) a . 0.6"
    return options


def nl_target(cot: str, answer: str, answer_type: str, answer_format: str = "reft") -> str | None:
    """The N-CoT training target. A CoT whose last answer line already gives the gold answer is kept
    as written (SVAMP's `Therefore, the answer is <203>.` is read back as 203); a CoT without an
    answer line gets one in `answer_format` appended (the paper's: `Therefore, the answer is: X`).
    None when the CoT's own answer line contradicts the gold answer."""
    cot = cot.rstrip()
    if formats.find_answer(cot, answer_format) is None:
        return f"{cot}\n{formats.answer_line(answer, answer_format)}"
    graded = grading.grade_batch([cot], [Example("", "", answer)], "nl", answer_type, choice_guard=False,
                                 answer_format=answer_format)[0]
    return cot if graded.correct else None


def convert_row(row: dict, index: int, *, fields: Fields, answer_type: str, style: str,
                need_cot: bool, source: str, where: str = "row", id_prefix: str = "",
                answer_format: str = "reft") -> Example:
    """One raw row (a dict from a JSON file, a JSONL line or a Hugging Face dataset) as an Example.

    Rows hold the question, gold CoT and gold answer in `fields`, or are TRL's conversational rows
    (`messages`, or `prompt` + `completion` as lists of {role, content}: tasks/conversations.py).
    `index` and `where` ("line" for JSONL, "row" for JSON lists and datasets) only name the row in
    errors; rows without an id get `{id_prefix}-{index}` (default: from the file name). The gold
    answer is canonicalised ("203.0" -> "203", "1,080" -> "1080", "C" -> "c"); the row's other
    fields travel along as `Example.columns` (reward functions get them).
    Raises DatasetError on a missing field or an unparsable gold answer.
    """
    at = f"{source}: {where} {index}"
    if not isinstance(row, dict):
        raise DatasetError(f"{at}: expected a JSON object, got {type(row).__name__}")
    get = _field_reader(row, at)
    chat = conversational_row(row, fields, at, DatasetError)
    row_id = row.get(fields.id)
    if row_id is None:  # GSM8K has no ids: "gsm8k-train-12" (the line number)
        stem = Path(source).stem
        if not id_prefix:
            id_prefix = f"{Path(source).parent.name}-{stem}" if stem in ("train", "test", "validation") else stem
        row_id = f"{id_prefix}-{index}"
    if chat is not None:
        question, cot, messages = chat
        if need_cot and cot is None:
            raise DatasetError(f"{at}: a training row needs the answer turn (an assistant message, or `completion`)")
        raw_answer = get(fields.answer, required=cot is None)
        if raw_answer is None:  # the gold answer as the gold completion states it
            raw_answer = formats.find_answer(cot, answer_format)
            if raw_answer is None:
                raise DatasetError(f"{at}: missing field {fields.answer!r}, and the completion states no answer in "
                                   f"data.answer_format={answer_format} (fields present: {sorted(row)})")
    else:
        question, messages = str(get(fields.question)).strip(), None
        cot = get(fields.cot, required=need_cot)
        raw_answer = None
        if fields.cot == fields.answer:  # GSM8K style: "reasoning\n#### 72"
            text = str(get(fields.answer))
            if "####" not in text:
                raise DatasetError(f"{at}: field {fields.answer!r} has no '#### answer' line")
            reasoning, raw_answer = text.rsplit("####", 1)
            cot = _GSM8K_NOTE_RE.sub("", reasoning).strip() or None
        else:
            raw_answer = get(fields.answer)
    answer, options = _gold_answer(str(raw_answer).strip(), question, answer_type, fields.answer, at)
    if cot is not None:
        cot = str(cot).rstrip()
        if style == "nl":  # None for a CoT that contradicts the answer: dropped from training
            cot = nl_target(cot, answer, answer_type, answer_format)
    return Example(str(row_id), question, answer, cot, options, messages, other_columns(row, fields))


def _field_reader(row: dict, at: str):
    """`get(name, required)`: a text or number field of the row, or a DatasetError naming it."""
    def get(name: str, required: bool = True):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise DatasetError(f"{at}: missing field {name!r} (fields present: {sorted(row)})")
            return None
        # A list, an object or a boolean is not text: str() of it would be read as its first number.
        if isinstance(value, (list, dict, bool)):
            raise DatasetError(f"{at}: field {name!r} is a JSON {type(value).__name__} ({json.dumps(value)[:60]}); "
                               f"expected a string or a number")
        return value
    return get


def _gold_answer(raw_answer: str, question: str, answer_type: str, field_name: str,
                 at: str) -> tuple[str, dict[str, str] | None]:
    """(canonical gold answer, options) or a DatasetError: a number, or an option letter."""
    if raw_answer[:1] in "[{" and _is_json_container(raw_answer):
        raise DatasetError(f"{at}: field {field_name!r} holds {raw_answer[:60]!r}, a list or object; "
                           f"a gold answer is one number or option letter")
    if answer_type == "choice":
        answer = answers.parse_choice(raw_answer)
        options = parse_options(question)
        if answer is None or (options is not None and answer not in options):
            raise DatasetError(f"{at}: gold answer {raw_answer!r} is not an option letter"
                               + (f" among {sorted(options)}" if options else ""))
        return answer, options
    answer, why = formats.read_number(raw_answer)
    if answer is None:
        why = why if why == formats.NEEDS_MATH_VERIFY else "not a number"
        raise DatasetError(f"{at}: gold answer {raw_answer!r} is {why}")
    return answer, None


def _is_json_container(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (list, dict))
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

def read_rows(path: Path, skip_bad_rows: bool, stats: dict) -> list[tuple[int, str, object]]:
    """(index, "line"|"row", row) for a JSON list (0-based row index) or JSONL (1-based line)."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (resolved: {path.resolve()}); set data.data_dir to the "
                           "folder holding the dataset files, or data.train_path / data.test_path")
    text = read_text_utf8(path, DatasetError)
    if not text.strip():
        raise DatasetError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        return [(i, "row", r) for i, r in enumerate(data)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, "line", json.loads(line)))
        except json.JSONDecodeError as e:
            err = DatasetError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                               f"expected one JSON object per line")
            _bad_row(err, skip_bad_rows, stats)
    return rows


def _bad_row(err: DatasetError, skip: bool, stats: dict) -> None:
    if not skip:
        raise err
    stats["skipped_rows"] = stats.get("skipped_rows", 0) + 1
    log.warning("skipping bad row: %s", err)


def load_examples(path: Path, *, fields: Fields, answer_type: str, style: str, need_cot: bool,
                  skip_bad_rows: bool, stats: dict, answer_format: str = "reft") -> list[Example]:
    """All usable rows of one file (bad rows raise, or are skipped and counted)."""
    examples = []
    for index, where, row in read_rows(path, skip_bad_rows, stats):
        try:
            examples.append(convert_row(row, index, fields=fields, answer_type=answer_type, style=style,
                                        need_cot=need_cot, source=str(path), where=where, answer_format=answer_format))
        except DatasetError as err:
            _bad_row(err, skip_bad_rows, stats)
    if not examples:
        raise DatasetError(f"{path}: no usable examples")
    return examples


def hf_rows_to_examples(rows, cfg: DataConfig, split: str, need_cot: bool, stats: dict) -> list[Example]:
    """Rows of a Hugging Face split (any iterable of dicts) as Examples, with the data.* field names."""
    fields = Fields(cfg.question_field, cfg.cot_field, cfg.answer_field, cfg.id_field)
    source = f"hf:{cfg.hf_id}{'/' + cfg.hf_config if cfg.hf_config else ''}[{split}]"
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(convert_row(dict(row), i, fields=fields, answer_type=cfg.answer_type,
                                        style=cfg.style, need_cot=need_cot, source=source, id_prefix=split,
                                        answer_format=formats.resolve_answer_format(cfg.answer_format, "hf")))
        except DatasetError as err:
            _bad_row(err, cfg.skip_bad_rows, stats)
    if not examples:
        raise DatasetError(f"{source}: no usable examples")
    return examples


def _load_hf_split(cfg: DataConfig, split: str, need_cot: bool, stats: dict) -> list[Example]:
    try:
        import datasets  # optional extra: pip install 'reftune[hf]'
    except ImportError:  # an ImportError still (the API's contract); the CLI reports it in one line
        raise ImportError("data.name=hf needs the `datasets` package: pip install datasets "
                          "(or pip install 'reftune[hf]')") from None
    kwargs = {}
    if cfg.hf_id in ("json", "csv", "parquet"):  # datasets' builders for local files
        kwargs["data_files"] = {cfg.hf_train_split: cfg.train_path, cfg.hf_test_split: cfg.test_path}
        kwargs["data_files"] = {k: v for k, v in kwargs["data_files"].items() if v}
    try:
        rows = datasets.load_dataset(cfg.hf_id, cfg.hf_config or None, split=split, **kwargs)
    except Exception as e:  # offline, unknown id, missing split...: datasets raises many types
        raise DatasetError(f"data.hf_id={cfg.hf_id!r} split {split!r}: cannot load it with `datasets` "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return hf_rows_to_examples(rows, cfg, split, need_cot, stats)


DATA_DIR_ENV = "REFTUNE_DATA_DIR"


def data_dir(cfg: DataConfig) -> Path:
    """The folder of the presets' files: `data.data_dir`, else $REFTUNE_DATA_DIR, else ./data."""
    return Path(cfg.data_dir or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


def data_dir_note(cfg: DataConfig) -> str:
    """How the data folder was chosen, for errors about a missing file."""
    if cfg.data_dir:
        return f"data.data_dir={cfg.data_dir!r}"
    if os.environ.get(DATA_DIR_ENV):
        return f"${DATA_DIR_ENV}, as data.data_dir is empty"
    return f"the default ./data, as data.data_dir is empty and ${DATA_DIR_ENV} is not set"


def _release_path(cfg: DataConfig, file_name: str) -> Path:
    """`data_dir/reft/<file>` (this project's layout) or `data_dir/<file>` (the release's data/)."""
    base = data_dir(cfg)
    candidates = [base / "reft" / file_name, base / file_name]
    return next((p for p in candidates if p.is_file()), candidates[0])


def gold_failures(path: Path, style: str, answer_type: str, fields: Fields = Fields(),
                  timeout: float = 5.0) -> tuple[int, list[tuple[str, str, str | None, str]]]:
    """Grade every gold CoT of a training file against its own gold answer, as the reward would.

    N-CoT rows are graded on the CoT as written in the file (not the normalised target). GSM8K-style
    rows have no answer line: theirs is `#### 1,080` rewritten as `Therefore, the answer is: 1,080`
    (raw text, so the extractor must read it). Returns (number of rows, failures as
    (id, gold answer, extracted answer, reason)).
    """
    examples, cots = [], []
    for index, where, row in read_rows(Path(path), False, {}):
        ex = convert_row(row, index, fields=fields, answer_type=answer_type, style="program",
                         need_cot=True, source=str(path), where=where)  # "program": CoT untouched
        cot = ex.cot
        if style == "nl" and fields.cot == fields.answer:
            raw_answer = str(row[fields.answer]).rsplit("####", 1)[1].strip()
            cot = f"{ex.cot}\n{NL_ANSWER_PREFIX} {raw_answer}"
        examples.append(ex)
        cots.append(cot or "")
    graded = grading.grade_batch(cots, examples, style, answer_type, timeout=timeout)
    failures = [(ex.id, ex.answer, g.answer, g.reason or "wrong answer")
                for ex, g in zip(examples, graded) if not g.correct]
    return len(examples), failures


# ----------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------

def _question_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _clean_training(train: list[Example], test: list[Example], source: str, stats: dict) -> list[Example]:
    """Drop training rows that would teach something wrong or leak the test set (counted, logged)."""
    known = KNOWN_BAD_GOLD.get(Path(source).name, {})
    test_ids = {ex.id for ex in test}
    test_questions = {_question_key(ex.question) for ex in test}
    kept = []
    for ex in train:
        if ex.id in known:
            stats["dropped_known_bad_gold"] += 1
        elif ex.cot is None:  # N-CoT whose answer line contradicts the gold answer
            stats["dropped_inconsistent_cot"] += 1
            log.warning("%s: %s: gold CoT states another answer than %s; dropped", source, ex.id, ex.answer)
        elif ex.id in test_ids or _question_key(ex.question) in test_questions:
            # SVAMP (checked): no training row shares an item_id or a question text with the test
            # set. The check stays for other files (GSM8K or user data may contain copies).
            stats["dropped_test_overlap"] += 1
        else:
            kept.append(ex)
    for key in ("dropped_known_bad_gold", "dropped_inconsistent_cot", "dropped_test_overlap"):
        if stats[key]:
            log.warning("%s: %s = %d", source, key, stats[key])
    return kept


def split_validation(examples: list[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): `size` examples held out with a seeded shuffle. Rows with the same
    question text stay on the same side (SVAMP's training file repeats some questions)."""
    if size <= 0:
        return list(examples), []
    if size >= len(examples):
        raise DatasetError(f"data.validation_size={size} leaves no training examples (the file has {len(examples)})")
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(_question_key(ex.question), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held: set[int] = set()
    for key in keys:
        if len(held) + len(groups[key]) <= size:
            held.update(groups[key])
        if len(held) == size:
            break
    train = [ex for i, ex in enumerate(examples) if i not in held]
    validation = [ex for i, ex in enumerate(examples) if i in held]
    return train, validation


def _resolve(cfg: DataConfig) -> tuple[str, Fields, Path | None, Path | None]:
    """answer type, fields and the train/test files of a file-backed dataset."""
    override = lambda p, default: Path(p) if p else default  # noqa: E731
    if cfg.name == "gsm8k":
        if cfg.style != "nl":
            raise DatasetError("data.name=gsm8k (GSM8K's own files) has natural-language CoTs only; "
                               "for program CoTs use data.name=gsm8k_reft with the release's gsm8k_python_sdp.json")
        base = data_dir(cfg)
        return ("number", Fields("question", "answer", "answer", "id"),
                override(cfg.train_path, base / GSM8K_FILES["train"]), override(cfg.test_path, base / GSM8K_FILES["test"]))
    if cfg.name in RELEASE:
        rel = RELEASE[cfg.name]
        train = _release_path(cfg, RELEASE_TRAIN_FILE[cfg.style].format(prefix=rel.prefix))
        test = _release_path(cfg, RELEASE_TEST_FILE.format(prefix=rel.prefix))
        return rel.answer_type, Fields(), override(cfg.train_path, train), override(cfg.test_path, test)
    if cfg.name == "json":
        if not cfg.test_path or not (cfg.train_path or cfg.test_only):
            raise DatasetError("data.name=json needs data.test_path and data.train_path (or data.test_only)")
        return (cfg.answer_type, Fields(cfg.question_field, cfg.cot_field, cfg.answer_field, cfg.id_field),
                override(cfg.train_path, None), Path(cfg.test_path))
    raise DatasetError(f"unknown data.name {cfg.name!r}: arithmetic, gsm8k, gsm8k_reft, svamp, mathqa, "
                       "mathqa_numeric, json or hf")


def _check_preset_files(cfg: DataConfig, paths: list[Path]) -> None:
    """A preset's file missing from the data folder: say which folder was looked in and why."""
    if cfg.name == "json":
        return
    for path in paths:
        if not path.is_file():
            given = path in (Path(cfg.train_path), Path(cfg.test_path))
            where = "" if given else (f" in the data folder {data_dir(cfg)} (from {data_dir_note(cfg)}); set "
                                      f"data.data_dir or ${DATA_DIR_ENV} to the folder holding the dataset files")
            raise DatasetError(f"{path}: file not found (resolved: {path.resolve()}){where}, or give "
                               f"data.train_path / data.test_path")


def load_dataset_task(cfg: DataConfig) -> Task:
    """The Task named by `cfg.name` (see DataConfig), with train/validation/test splits."""
    if cfg.style not in RELEASE_TRAIN_FILE:
        raise DatasetError(f"data.style must be nl or program, got {cfg.style!r}")
    stats = {"skipped_rows": 0, "dropped_known_bad_gold": 0, "dropped_inconsistent_cot": 0,
             "dropped_test_overlap": 0}
    if cfg.name == "hf":
        if not cfg.hf_id:
            raise DatasetError("data.name=hf needs data.hf_id")
        answer_type = cfg.answer_type
        test = _load_hf_split(cfg, cfg.hf_test_split, False, stats)
        train = [] if cfg.test_only else _load_hf_split(cfg, cfg.hf_train_split, True, stats)
        train_source = f"hf:{cfg.hf_id}"
    else:
        answer_type, fields, train_path, test_path = _resolve(cfg)
        _check_preset_files(cfg, [test_path] + ([] if cfg.test_only else [train_path]))
        common = dict(fields=fields, answer_type=answer_type, style=cfg.style, skip_bad_rows=cfg.skip_bad_rows,
                      stats=stats, answer_format=formats.resolve_answer_format(cfg.answer_format, cfg.name))
        test = load_examples(test_path, need_cot=False, **common)
        train = [] if cfg.test_only else load_examples(train_path, need_cot=True, **common)
        stats.update(test_file=str(test_path), train_file=None if cfg.test_only else str(train_path))
        train_source = str(train_path)
    if train:
        train = _clean_training(train, test, train_source, stats)
    train, validation = split_validation(train, cfg.validation_size, cfg.seed) if train else ([], [])
    if cfg.max_train:
        train = train[: cfg.max_train]
    if cfg.max_test:
        test, validation = test[: cfg.max_test], validation[: cfg.max_test]
    if stats["skipped_rows"]:
        log.warning("%s: skipped %d bad rows", cfg.name, stats["skipped_rows"])
    return Task(name=cfg.name, style=cfg.style, answer_type=answer_type, train=train, validation=validation,
                test=test, choice_guard=cfg.choice_guard, program_header_in_prompt=cfg.program_header_in_prompt,
                stats=stats, prompt_format=cfg.prompt_format, system_prompt=cfg.system_prompt,
                answer_format=cfg.answer_format)
