"""The data types every layer shares: a task's `Example` and a grader's verdict `Graded`.

A leaf module (no reftune imports), so tasks, rewards, engines and trainers can all use these
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str
    """Gold final answer as text: a number ("29", "2.5") or an option letter ("c")."""
    cot: str | None = None
    """Gold chain of thought in the task's style, without EOS; None for test sets without CoT."""
    options: dict[str, str] | None = None
    """Multiple choice only: option letter -> option text ("a" -> "38")."""
    messages: tuple[dict, ...] | None = None
    """Conversational rows: the turns before the answer ({role, content}); the chat prompt renders them."""
    columns: dict | None = None
    """The row's other fields (json/hf), given to reward functions as keyword columns."""


@dataclass(frozen=True)
class Graded:
    answer: str | None
    """The extracted (normalised) answer, or None when nothing usable was extracted."""
    correct: bool
    reason: str = ""
    """Why `answer` is None (e.g. 'timeout', 'no answer line'); empty otherwise."""
