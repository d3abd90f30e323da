"""What every task is made of: examples, the paper's prompt format, and grading.

A `Task` owns its splits, how a question becomes a prompt, what the gold target is, and how a
model's completion is graded. Trainers never look inside a dataset; they call these methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from reftune.rewards.formats import ANSWER_FORMATS, resolve_answer_format
from reftune.rewards.grading import grade_batch
from reftune.tasks.prompts import (PROMPT_FORMATS, PROMPT_TEMPLATE, ChatTemplate, PromptFormatError, conversation,
                                   plain_prompt, resolve_prompt_format)
from reftune.types import Example, Graded

NL_ANSWER_PREFIX = "Therefore, the answer is:"
STYLES = ("nl", "program")
DATASET_NAMES = ("arithmetic", "gsm8k", "gsm8k_reft", "svamp", "mathqa", "mathqa_numeric", "json", "hf")
ANSWER_TYPES = ("number", "choice")


@dataclass
class BuiltinTaskOptions:
    """The built-in generator of arithmetic word problems (`name=arithmetic`)."""

    n_train: int = 2000
    """Built-in task: number of training problems."""
    n_test: int = 400
    """Built-in task: number of test problems."""
    min_steps: int = 2
    """Built-in task: fewest arithmetic steps in a problem."""
    max_steps: int = 4
    """Built-in task: most arithmetic steps in a problem."""
    max_number: int = 20
    """Built-in task: largest number given in a question."""
    gold_order: str = "random"
    """Built-in task: order of steps in the gold CoT: random (one of the valid orders) | built."""


@dataclass
class RowFields:
    """Where a row of a `json` or `hf` dataset keeps each part of an example."""

    question_field: str = "question"
    """json/hf: field holding the question."""
    cot_field: str = "answer_cot"
    """json/hf: field holding the gold chain of thought (may be absent in test files)."""
    answer_field: str = "answer_value"
    """json/hf: field holding the gold final answer."""
    id_field: str = "item_id"
    """json/hf: field holding a row id (row number when missing)."""
    answer_type: str = "number"
    """json/hf: number or choice."""


@dataclass
class PromptOptions:
    """How a question becomes the model's prompt, and where a CoT states its answer."""

    prompt_format: str = "auto"
    """auto (the tokenizer's chat template when it has one) | plain (the paper's template) | chat (the chat template)."""
    system_prompt: str = ""
    """Chat: the system turn (unless a row has its own); plain: text put before the template."""
    answer_format: str = "auto"
    """Where an N-CoT states its answer: auto (per dataset) | reft | answer_is | gsm8k | boxed | any (see docs/data.md)."""


@dataclass
class HubSource:
    """A Hugging Face `datasets` dataset (`name=hf`)."""

    hf_id: str = ""
    """hf: a Hugging Face datasets id (needs the network or a local cache)."""
    hf_config: str = ""
    """hf: the dataset's config name, if any."""
    hf_train_split: str = "train"
    """hf: split used for training."""
    hf_test_split: str = "test"
    """hf: split used for testing."""


@dataclass
class DataConfig(PromptOptions, HubSource, RowFields, BuiltinTaskOptions):
    """Which task to train and evaluate on, and how its prompts are built. The built-in task needs
    no files; the other sources' own fields are grouped in the classes above (keys stay flat:
    `data.n_train`, `data.question_field`, `data.hf_id`)."""

    name: str = "arithmetic"
    """arithmetic (built-in generator) | gsm8k | svamp | mathqa | mathqa_numeric | json | hf"""
    style: str = "program"
    """Chain-of-thought style: nl (natural language) or program (Python `def solution()`)."""
    train_path: str = ""
    """File with training examples (question, gold CoT, answer); dataset default when empty."""
    test_path: str = ""
    """File with test examples (question, answer); dataset default when empty."""
    data_dir: str = ""
    """Folder of the dataset presets' files (empty: $REFTUNE_DATA_DIR, else ./data)."""
    validation_size: int = 200
    """Examples held out from the training file for checkpoint selection (never the test set)."""
    max_train: int = 0
    """Use at most this many training examples (0 = all); for quick runs."""
    max_test: int = 0
    """Evaluate on at most this many test (and validation) examples (0 = all)."""
    seed: int = 0
    """Seed for the built-in generator and for the validation split."""
    skip_bad_rows: bool = False
    """Skip malformed rows (counted in the log) instead of stopping with an error."""
    test_only: bool = False
    """Load only the test set (train and validation empty): evaluation without a training file."""
    choice_guard: bool = True
    """Multiple choice + program CoT: credit only when the computed value matches the picked option."""
    program_header_in_prompt: bool = False
    """Program CoT: put `def solution():` and the question docstring in the sampling prompt (release)."""
    max_prompt_tokens: int = 0
    """Longest prompt in tokens (0: the model's context, `max_position_embeddings`)."""
    long_prompts: str = "error"
    """A prompt over that limit: error (refuse the run, with a count) | skip (leave it out, counted)."""

    def validate(self, prefix: str = "data.") -> None:
        """Ranges and choices of every field; file paths are checked when the data is loaded."""
        from reftune.validate import Checks

        c = Checks(self, prefix)
        c.choice("name", DATASET_NAMES).choice("style", STYLES).choice("answer_type", ANSWER_TYPES)
        c.str("train_path", "test_path", "data_dir", "question_field", "cot_field", "answer_field", "id_field",
              "hf_id", "hf_config", "hf_train_split", "hf_test_split")
        c.int("validation_size", 0).int("max_train", 0).int("max_test", 0).int("seed", 0, 2**32 - 1)
        c.int("n_train", 1).int("n_test", 1).int("min_steps", 1)
        c.int("max_steps", self.min_steps, note=f"at least {prefix}min_steps")
        c.int("max_number", 4).choice("gold_order", ("random", "built")).int("max_prompt_tokens", 0)
        c.choice("long_prompts", ("error", "skip")).choice("prompt_format", PROMPT_FORMATS)
        c.choice("answer_format", ANSWER_FORMATS).str("system_prompt")
        c.bool("skip_bad_rows", "test_only", "choice_guard", "program_header_in_prompt")
        for key in ("question_field", "cot_field", "answer_field", "id_field"):
            c.str(key, nonempty=True)
        if self.name == "json" and not self.test_path:
            c.fail("test_path", "data.name=json needs data.test_path (and data.train_path, or data.test_only=true)")
        if self.name == "json" and not (self.train_path or self.test_only):
            c.fail("train_path", "data.name=json needs data.train_path (or data.test_only=true)")
        if self.name == "hf":
            if not self.hf_id:
                c.fail("hf_id", "data.name=hf needs data.hf_id (a Hugging Face datasets id)")
            try:
                import datasets  # noqa: F401  (optional extra)
            except ImportError:
                c.fail("name", "data.name=hf needs the `datasets` package: pip install datasets "
                               "(or pip install 'reftune[hf]')")


@dataclass
class Task:
    """A dataset in a fixed CoT style, with its prompt format and its grader."""

    name: str
    style: str
    answer_type: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    choice_guard: bool = True
    program_header_in_prompt: bool = False
    stats: dict = field(default_factory=dict)
    """Loading statistics, e.g. {"skipped_rows": 3}."""
    prompt_format: str = "auto"
    """auto | plain | chat (tasks/prompts.py); chat needs `with_tokenizer`."""
    system_prompt: str = ""
    answer_format: str = "reft"
    """Where an N-CoT states its answer (reftune.rewards.formats), resolved for the dataset."""
    chat: ChatTemplate | None = field(default=None, repr=False, compare=False)
    """The tokenizer's chat template when the prompts are chat prompts (set by `with_tokenizer`)."""
    _by_id: dict | None = field(default=None, repr=False, compare=False)
    """Examples by id, built on first use (`record_prompt`); a copy of the task may carry it along."""

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"task {self.name}: style must be one of {STYLES}, got {self.style!r}")
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"task {self.name}: answer_type must be one of {ANSWER_TYPES}")
        self.answer_format = resolve_answer_format(self.answer_format, self.name)

    def with_tokenizer(self, tokenizer) -> "Task":
        """This task with its prompts rendered for `tokenizer`: `auto` picks the chat template when
        there is one. Every command binds its task this way before building a prompt."""
        fmt = resolve_prompt_format(self.prompt_format, tokenizer)
        return dataclasses.replace(self, chat=ChatTemplate(tokenizer) if fmt == "chat" else None)

    @property
    def uses_chat(self) -> bool:
        return self.chat is not None

    def messages(self, ex: Example) -> list[dict]:
        """The conversation before the answer ({role, content} turns), as chat prompts render it."""
        return conversation(ex.question, self.system_prompt, ex.messages)

    def prompt(self, ex: Example, for_generation: bool = False) -> str:
        """The model's input. With program CoTs the release starts sampling prompts with the
        function header and the question as docstring; SFT learns that header as output."""
        if self.chat is not None:
            text = self.chat.prompt(self.messages(ex))
        elif self.prompt_format == "chat":
            raise PromptFormatError(f"task {self.name}: data.prompt_format=chat renders prompts with the tokenizer's "
                                    f"chat template: bind it first (task.with_tokenizer(tokenizer))")
        else:
            text = plain_prompt(ex.question, self.system_prompt)
        if for_generation and self.style == "program" and self.program_header_in_prompt:
            text += program_header(ex.question)
        return text

    def record_prompt(self, record: dict) -> str:
        """`prompt(ex)` for a samples-file record (id, question, gold): the task's own example with
        that id and question when it has one (its conversation included), else one built from it."""
        if self._by_id is None:
            self._by_id = {ex.id: ex for split in (self.test, self.validation, self.train) for ex in split}
        ex = self._by_id.get(record["id"])
        if ex is None or ex.question != record["question"]:
            ex = Example(record["id"], record["question"], record["gold"])
        return self.prompt(ex)

    def training_pair(self, ex: Example, cot: str | None = None) -> tuple[str, str, bool]:
        """(prompt, target, append_eos) to train on `cot` (default: the gold CoT) as the answer: the
        loss falls on the target only. Chat: the assistant turn as the template closes it."""
        cot = self.target(ex) if cot is None else cot
        if self.chat is not None:
            return self.chat.answer_turn(self.messages(ex), cot)
        return self.prompt(ex), cot, True

    def target(self, ex: Example) -> str:
        """The gold CoT the model learns in SFT (without EOS)."""
        if ex.cot is None:
            raise ValueError(f"task {self.name}: example {ex.id} has no gold chain of thought")
        return ex.cot

    def completion_text(self, ex: Example, generated: str) -> str:
        """The full CoT a generation stands for: header from the prompt + generated text."""
        if self.style == "program" and self.program_header_in_prompt:
            return program_header(ex.question) + generated
        return generated

    def grade(self, completions: list[str], examples: list[Example]) -> list[Graded]:
        """Grade generated CoTs (as returned by the model for `prompt(ex, for_generation=True)`)."""
        cots = [self.completion_text(ex, c) for ex, c in zip(examples, completions)]
        return grade_batch(cots, examples, style=self.style, answer_type=self.answer_type,
                           choice_guard=self.choice_guard, answer_format=self.answer_format)


def program_header(question: str) -> str:
    return f'def solution():\n    """{question}"""\n'
