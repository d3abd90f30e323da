"""TRL's dataset rows, read beside reftune's own fields (question / answer_cot / answer_value):

    {"messages": [{"role": "system", ...}, {"role": "user", "content": Q}, {"role": "assistant", "content": CoT}],
     "answer_value": "18"}                                       # conversational language modeling
    {"prompt": [{"role": "user", "content": Q}], "completion": [{"role": "assistant", "content": CoT}],
     "answer_value": "18"}                                       # conversational prompt-completion
    {"prompt": Q, "completion": CoT, "answer_value": "18"}       # standard prompt-completion

The question is the prompt's last user turn; the turns before the answer are kept for chat
prompts (a row's own system turn wins over `data.system_prompt`). A test row may stop at the
prompt. The gold answer is the row's `data.answer_field`, or, when absent, what the gold
completion states in `data.answer_format`. Every other field is a column for reward functions.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool", "developer")
CONVERSATION_KEYS = ("messages", "prompt", "completion")


def conversational_row(row: dict, fields, at: str, error: type[Exception]):
    """(question, gold CoT or None, prompt turns as a tuple or None) of a TRL row, or None for a row
    in reftune's own fields (a row that has `fields.question` is read the usual way)."""
    if fields.question in row:
        return None
    if isinstance(row.get("messages"), list):
        turns = _turns(row["messages"], "messages", at, error)
        cot = None
        if turns and turns[-1]["role"] == "assistant":
            cot, turns = turns[-1]["content"], turns[:-1]
        return _question(turns, "messages", at, error), _text(cot), tuple(turns)
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        completion = row.get("completion")
        if completion is not None and not isinstance(completion, str):
            raise error(f"{at}: field 'completion' must be text when 'prompt' is text, got {_show(completion)}")
        return prompt.strip(), _text(completion), None
    if isinstance(prompt, list):
        turns = _turns(prompt, "prompt", at, error)
        completion = row.get("completion")
        if isinstance(completion, list):
            answer = [t for t in _turns(completion, "completion", at, error) if t["role"] == "assistant"]
            completion = "\n".join(t["content"] for t in answer) if answer else None
        elif completion is not None and not isinstance(completion, str):
            raise error(f"{at}: field 'completion' must be a list of messages or text, got {_show(completion)}")
        return _question(turns, "prompt", at, error), _text(completion), tuple(turns)
    return None


def other_columns(row: dict, fields) -> dict | None:
    """The row's fields that are not the question, CoT, answer, id or conversation."""
    used = {fields.question, fields.cot, fields.answer, fields.id, *CONVERSATION_KEYS}
    extra = {k: v for k, v in row.items() if k not in used}
    return extra or None


def _turns(value: list, key: str, at: str, error) -> list[dict]:
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise error(f"{at}: {key}[{i}] must be {{\"role\": ..., \"content\": \"text\"}}, got {_show(m)}")
        if m["role"] not in ROLES:
            raise error(f"{at}: {key}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def _question(turns: list[dict], key: str, at: str, error) -> str:
    users = [t["content"] for t in turns if t["role"] == "user"]
    if not users or not users[-1].strip():
        raise error(f"{at}: {key} has no user turn with the question")
    return users[-1].strip()


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _show(value) -> str:
    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return repr(value)[:60]
