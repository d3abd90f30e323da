"""The one prompt builder: how a question becomes the text the model reads, for every command.

Two formats (`data.prompt_format`):

- `plain`: the paper's template, `Question:\\n{question}\\nAnswer reasoning:\\n`, after
  `data.system_prompt` and a blank line when one is set. Rows given as messages use their last user
  turn as the question.
- `chat`: the tokenizer's chat template over [system, user] (a row's own messages when it has
  them; `data.system_prompt` as the system turn unless the row has one), rendered with the
  template's generation prompt (`add_generation_prompt=True`): the model answers in the assistant
  turn it was instruction-tuned on.
- `auto` (the default): `chat` when the tokenizer has a chat template, else `plain`.

Training on an answer (`ChatTemplate.answer_turn`): the conversation is rendered once without and
once with the assistant turn; the text after the generation prompt is the target, so the loss
covers the answer and the template's end-of-turn token(s), never the system or user turns.
A template that writes nothing after the answer gets EOS appended instead. Generation stops at
the tokenizer's EOS and at the model's `generation_config.eos_token_id` list, where instruct
models list their end-of-turn token (Qwen2.5-Instruct: `<|im_end|>`).

Chat templates that write the BOS token themselves (Llama-3's) render it into the text: prompts
are tokenised without adding special tokens, so it is not doubled.
"""

from __future__ import annotations

PROMPT_FORMATS = ("auto", "plain", "chat")
PROMPT_TEMPLATE = "Question:\n{question}\nAnswer reasoning:\n"


class PromptFormatError(ValueError):
    """A prompt format that cannot be used with this tokenizer or this data."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(prompt_format: str, tokenizer) -> str:
    """`plain` or `chat` for this tokenizer (see the module doc); refuses `chat` without a template."""
    if prompt_format not in PROMPT_FORMATS:
        raise PromptFormatError(f"data.prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if prompt_format == "chat" and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise PromptFormatError(f"data.prompt_format=chat: the tokenizer of {name} has no chat template "
                                f"(tokenizer_config.json has no `chat_template`); use data.prompt_format=plain "
                                f"or a model that ships one")
    return prompt_format


def plain_prompt(question: str, system_prompt: str = "") -> str:
    """The paper's template, after the system prompt and a blank line when there is one."""
    text = PROMPT_TEMPLATE.format(question=question)
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def conversation(question: str, system_prompt: str = "", messages: tuple | list | None = None) -> list[dict]:
    """The messages before the answer: the row's own (a system turn added from `system_prompt`
    when they have none), or [system, user: question]."""
    turns = [dict(m) for m in messages] if messages else [{"role": "user", "content": question}]
    if system_prompt and not any(m.get("role") == "system" for m in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


class ChatTemplate:
    """A tokenizer's chat template, rendered to text (tokenised later, like every prompt)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors of the template itself (e.g. "roles must alternate")
            raise PromptFormatError(f"the chat template cannot render {[m.get('role') for m in messages]} "
                                    f"({type(e).__name__}: {e}); use data.prompt_format=plain") from None
        return text if isinstance(text, str) else str(text)

    def prompt(self, messages: list[dict]) -> str:
        """The conversation up to the assistant turn's start (the generation prompt)."""
        return self.render(messages, generation_prompt=True)

    def answer_turn(self, messages: list[dict], answer: str) -> tuple[str, str, bool]:
        """(prompt, target, append_eos) for training on `answer` as the assistant turn (module doc)."""
        prompt = self.prompt(messages)
        full = self.render(messages + [{"role": "assistant", "content": answer}], generation_prompt=False)
        if not full.startswith(prompt):
            at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            raise PromptFormatError(
                f"the chat template renders the conversation with its answer differently from its generation "
                f"prompt (they part at character {at}: {prompt[at:at + 30]!r} vs {full[at:at + 30]!r}), so the "
                f"answer turn cannot be cut out for training; use data.prompt_format=plain")
        target = full[len(prompt):].rstrip()
        if target == answer.rstrip():  # the template closes the turn with nothing: EOS ends it
            return prompt, target, True
        return prompt, target, False
