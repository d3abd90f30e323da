"""Chat templates: one prompt builder for every command (`Task.prompt`, tasks/prompts.py).

A tiny instruct-style model (tests/instruct_model.py: ChatML template, `<|im_end|>` as end of turn,
listed in its generation_config) runs sft, train, eval, sample and compare with
data.prompt_format=chat and a system prompt; every prompt each command gave its engine is recorded
and must be the same text for the same question, the one the files record, and SFT's loss falls
on the assistant turn only."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import small_data
from instruct_model import IM_END, IM_START, RecordingEngine, build_instruct_model, chatml_texts

from reftune.models import load_tokenizer
from reftune.tasks import PromptFormatError, load_task
from reftune.tasks.base import PROMPT_TEMPLATE
from reftune.trainers.supervised import IGNORE, collate, encode_task_example, sft_loss

SYSTEM = "Solve the problem step by step."
CHAT = dict(style="nl", prompt_format="chat", system_prompt=SYSTEM)
ENGINE = "instruct_model:RecordingEngine"


@pytest.fixture(scope="module")
def chat_task():
    return load_task(small_data(**CHAT))


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory, chat_task) -> str:
    return build_instruct_model(tmp_path_factory.mktemp("instruct") / "model", chatml_texts(chat_task, SYSTEM))


def test_auto_uses_the_chat_template_when_there_is_one(instruct_model, tiny_model, chat_task):
    ex = chat_task.test[0]
    auto = load_task(small_data(style="nl", system_prompt=SYSTEM))
    assert auto.with_tokenizer(load_tokenizer(instruct_model)).prompt(ex) == chat_task.with_tokenizer(
        load_tokenizer(instruct_model)).prompt(ex)
    # The home-made Llama's tokenizer has no template: auto keeps the paper's plain prompt.
    plain = load_task(small_data(style="nl")).with_tokenizer(load_tokenizer(tiny_model))
    assert not plain.uses_chat and plain.prompt(ex) == PROMPT_TEMPLATE.format(question=ex.question)
    assert auto.with_tokenizer(load_tokenizer(tiny_model)).prompt(ex) == f"{SYSTEM}\n\n" + plain.prompt(ex)


def test_chat_prompt_is_the_template_with_its_generation_prompt(instruct_model, chat_task):
    task = chat_task.with_tokenizer(load_tokenizer(instruct_model))
    ex = task.test[0]
    assert task.prompt(ex) == (f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{ex.question}{IM_END}\n"
                               f"{IM_START}assistant\n")
    assert task.prompt(ex, for_generation=True) == task.prompt(ex)


def test_chat_needs_a_template_and_a_tokenizer(tiny_model, chat_task):
    with pytest.raises(PromptFormatError, match="no chat template.*prompt_format=plain"):
        chat_task.with_tokenizer(load_tokenizer(tiny_model))
    with pytest.raises(PromptFormatError, match="with_tokenizer"):
        chat_task.prompt(chat_task.test[0])


def test_sft_loss_covers_only_the_assistant_turn(instruct_model, chat_task):
    tok = load_tokenizer(instruct_model)
    task = chat_task.with_tokenizer(tok)
    ex = task.train[0]
    ids, labels = encode_task_example(tok, task, ex, 1024)
    prompt_part = [i for i, lab in zip(ids, labels) if lab == IGNORE]
    target_part = [lab for lab in labels if lab != IGNORE]
    assert tok.decode(prompt_part) == task.prompt(ex)  # system + user turns + "<|im_start|>assistant\n"
    # The answer and the template's end-of-turn token, nothing after it, no second EOS.
    assert tok.decode(target_part) == ex.cot + IM_END
    assert target_part[-1] == tok.convert_tokens_to_ids(IM_END) and target_part.count(tok.eos_token_id) == 1
    assert labels == [IGNORE] * len(prompt_part) + target_part  # masked positions are a prefix

    # The loss is the cross-entropy of exactly those tokens, each predicted from the one before.
    import torch

    from reftune.models import load_causal_lm

    model = load_causal_lm(instruct_model, "cpu", None)
    loss, n_tokens = sft_loss(model, collate([(ids, labels)], tok.pad_token_id))
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(prompt_part)
    by_hand = -sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids)))
    assert n_tokens == len(target_part) and loss.item() == pytest.approx(by_hand, rel=1e-4)


def test_a_template_that_does_not_close_the_turn_gets_eos(instruct_model, chat_task):
    tok = copy.deepcopy(load_tokenizer(instruct_model))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    task = chat_task.with_tokenizer(tok)
    ex = task.train[0]
    prompt, target, append_eos = task.training_pair(ex)
    assert prompt.endswith("assistant: ") and target == ex.cot and append_eos
    ids, labels = encode_task_example(tok, task, ex, 1024)
    assert labels[-1] == tok.eos_token_id


def test_a_row_with_its_own_messages_keeps_them(instruct_model, chat_task):
    from reftune.types import Example

    task = chat_task.with_tokenizer(load_tokenizer(instruct_model))
    turns = ({"role": "system", "content": "Be terse."}, {"role": "user", "content": "1+1?"},
             {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"})
    ex = Example("r0", "2+2?", "4", "2 + 2 = 4", messages=turns)
    assert task.prompt(ex) == (f"{IM_START}system\nBe terse.{IM_END}\n{IM_START}user\n1+1?{IM_END}\n"
                               f"{IM_START}assistant\n2{IM_END}\n{IM_START}user\n2+2?{IM_END}\n{IM_START}assistant\n")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_command_sees_the_same_prompts(tmp_path, instruct_model, chat_task):
    """sft -> train -> eval -> sample -> compare on the validation questions, chat format + system prompt."""
    from reftune.compare.compare import CompareConfig, run_compare
    from reftune.inference.evaluate import EvalConfig, run_eval
    from reftune.inference.sample import SampleConfig, run_sample
    from reftune.trainers.reft import ReFTConfig, run_reft
    from reftune.trainers.sft import SFTConfig, run_sft

    tok = load_tokenizer(instruct_model)
    task = chat_task.with_tokenizer(tok)
    expected = {ex.question: task.prompt(ex, for_generation=True) for ex in task.validation + task.train}
    common = dict(device="cpu", progress=False, engine=ENGINE)
    seen: dict[str, list[str]] = {}

    def record(command: str, run) -> object:
        RecordingEngine.prompts = []
        result = run()
        seen[command] = list(RecordingEngine.prompts)
        return result

    sft = record("sft", lambda: run_sft(SFTConfig(
        model=instruct_model, data=small_data(**CHAT), out_dir=str(tmp_path / "sft"), epochs=2, batch_size=16, lr=3e-3,
        eval_split="validation", eval_max_new_tokens=24, tensorboard=False, **common)))
    warm = sft["checkpoints"][2]
    reft = record("train", lambda: run_reft(ReFTConfig(
        model=warm, data=small_data(**CHAT), out_dir=str(tmp_path / "reft"), steps=2, questions_per_step=4,
        samples_per_prompt=2, mini_batch_size=4, ppo_epochs=1, lr=1e-3, max_new_tokens=24, eval_max_new_tokens=24,
        eval_split="validation", eval_every=0, save_every=0, tensorboard=False, **common)))
    record("eval", lambda: run_eval(EvalConfig(model=warm, data=small_data(**CHAT), split="validation",
                                               out_dir=str(tmp_path / "eval"), max_new_tokens=24, **common)))
    record("sample", lambda: run_sample(SampleConfig(model=warm, data=small_data(**CHAT), split="validation", k=2,
                                                     out_dir=str(tmp_path / "sample"), max_new_tokens=24, **common)))
    record("compare", lambda: run_compare(CompareConfig(
        data=small_data(**CHAT), sft=warm, reft=reft["best_checkpoint"], split="validation", k=2, rerank=False,
        out_dir=str(tmp_path / "compare"), max_new_tokens=24, **common)))

    # Every prompt any engine got is the one prompt builder's text for that question...
    by_question = {p: q for q, p in expected.items()}
    for command, prompts in seen.items():
        assert prompts, command
        assert all(p in by_question for p in prompts), (command, next(p for p in prompts if p not in by_question))
        assert all(p.startswith(f"{IM_START}system\n{SYSTEM}{IM_END}\n") and p.endswith(f"{IM_START}assistant\n")
                   for p in prompts), command
    # ...the evaluation prompts of the five commands are identical, question for question...
    validation = [expected[ex.question] for ex in task.validation]
    for command in ("sft", "train", "eval", "sample", "compare"):
        assert set(validation) <= set(seen[command]), command
    # ...and SFT's training prompts are the ones ReFT sampled the same questions from.
    rollout_prompts = set(seen["train"]) - set(validation)
    sampled = [ex for ex in task.train if expected[ex.question] in rollout_prompts]
    assert sampled and all(task.training_pair(ex)[0] == expected[ex.question] for ex in sampled)
    # ...and the files record the prompt each row was given.
    files = [tmp_path / "eval" / "validation_predictions.jsonl", tmp_path / "sample" / "validation_samples.jsonl",
             tmp_path / "compare" / "eval" / "sft" / "validation_predictions.jsonl",
             tmp_path / "compare" / "samples" / "reft_validation.jsonl"]
    for path in files:
        rows = _read_jsonl(path)
        assert [r["prompt"] for r in rows] == validation, path
        texts = [r["completion"] for r in rows] if "completion" in rows[0] else \
            [s["completion"] for r in rows for s in r["samples"]]
        assert not any(IM_END in t or IM_START in t for t in texts), path  # stopped at end of turn, stripped
