"""The built-in arithmetic task (reftune.tasks.arithmetic): determinism, disjoint splits, gold CoTs
that really reach the gold answer, difficulty, and the several valid reasoning orders ReFT needs."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest

from reftune.rewards import extract_answer, grade_batch, is_correct
from reftune.tasks import DataConfig, load_task
from reftune.tasks.arithmetic import _split_of, generate_examples, make_problem
from reftune.tasks.base import NL_ANSWER_PREFIX, PROMPT_TEMPLATE

ASSIGN_RE = re.compile(r"^    (\w+) = (.+)$")
RELATION_RE = re.compile(r"^(\w+) ([-+*/]) (\d+)$")


def problems(steps: int, n: int = 500, style: str = "program", seed: int = 0, **kw):
    """`n` problems with exactly `steps` steps (all in the train split)."""
    cfg = DataConfig(n_train=n, n_test=0, validation_size=0, min_steps=steps, max_steps=steps, seed=seed, **kw)
    return generate_examples(cfg, style)["train"]


def parse_program(program: str):
    """Gold program -> (first person, its count, [(person, source, op, amount)], result expression)."""
    lines = program.splitlines()
    assert lines[0] == "def solution():" and lines[-1] == "    return result", program
    assigns = [ASSIGN_RE.match(line).groups() for line in lines[1:-1]]
    assert all(assigns), program
    (first, count), *middle, (result_name, result_expr) = assigns
    assert result_name == "result" and count.isdigit(), program
    relations = []
    for person, expr in middle:
        m = RELATION_RE.match(expr)
        assert m, f"not a relation line: {expr!r}\n{program}"
        relations.append((person, m[1], m[2], int(m[3])))
    return first, int(count), relations, result_expr


def build_program(first, count, relations, result_expr) -> str:
    body = [f"    {first} = {count}"] + [f"    {p} = {s} {op} {a}" for p, s, op, a in relations]
    return "\n".join(["def solution():", *body, f"    result = {result_expr}", "    return result"])


def alternative_program(program: str) -> str:
    """Another valid CoT for the same problem: the relations in another dependency-respecting order
    (whenever a later-listed person is already computable, compute it first) and a total summed in
    reverse order. Equal to the gold program when the problem admits no other order."""
    first, count, relations, result_expr = parse_program(program)
    known, pending, ordered = {first}, list(relations), []
    while pending:
        ready = [r for r in pending if r[1] in known]
        pick = ready[-1]  # the gold order always takes the first ready one
        ordered.append(pick)
        known.add(pick[0])
        pending.remove(pick)
    terms = result_expr.split(" + ")
    return build_program(first, count, ordered, " + ".join(reversed(terms)))


# ------------------------------------------------------------------------------- determinism

def test_same_config_gives_identical_examples():
    cfg = DataConfig(n_train=300, n_test=50, validation_size=30)
    a, b = generate_examples(cfg, "program"), generate_examples(cfg, "program")
    assert a == b
    assert load_task(cfg).train == load_task(replace(cfg)).train


def test_different_seed_gives_different_examples():
    a = generate_examples(DataConfig(n_train=100, n_test=20, validation_size=10, seed=0), "program")
    b = generate_examples(DataConfig(n_train=100, n_test=20, validation_size=10, seed=1), "program")
    qa, qb = {e.question for e in a["train"]}, {e.question for e in b["train"]}
    assert qa != qb
    assert len(qa & qb) < 10  # not just reordered: mostly different problems


def test_styles_share_the_problems():
    """data.style only changes the gold CoT: same ids, questions and answers in both styles."""
    cfg = DataConfig(n_train=100, n_test=20, validation_size=10)
    program, nl = generate_examples(cfg, "program"), generate_examples(cfg, "nl")
    for split in program:
        assert [(e.id, e.question, e.answer) for e in program[split]] == [(e.id, e.question, e.answer) for e in nl[split]]
        assert all(e.cot.startswith("def solution():") for e in program[split])
        assert all(NL_ANSWER_PREFIX in e.cot for e in nl[split])


# ------------------------------------------------------------------------------- splits

def _questions(splits):
    return {k: [e.question for e in v] for k, v in splits.items()}


@pytest.mark.parametrize("sizes", [dict(n_train=64, n_test=16, validation_size=8),
                                   dict(n_train=2000, n_test=400, validation_size=200)])
def test_splits_are_disjoint_and_full(sizes):
    qs = _questions(generate_examples(DataConfig(**sizes), "program"))
    assert [len(qs["train"]), len(qs["test"]), len(qs["validation"])] == \
        [sizes["n_train"], sizes["n_test"], sizes["validation_size"]]
    for name, q in qs.items():
        assert len(set(q)) == len(q), f"duplicate question inside {name}"
    assert not set(qs["train"]) & set(qs["test"])
    assert not set(qs["train"]) & set(qs["validation"])
    assert not set(qs["validation"]) & set(qs["test"])


def test_split_is_a_function_of_the_question_across_seeds_and_sizes():
    """The hash split: a question is in the same split whatever seed or sizes drew it, so e.g. a
    test question of one run is never a training question of another."""
    runs = [generate_examples(DataConfig(n_train=n, n_test=n // 4, validation_size=n // 8, seed=s), "program")
            for n, s in ((400, 0), (800, 1), (200, 2))]
    where: dict[str, str] = {}
    for splits in runs:
        for split, exs in splits.items():
            for ex in exs:
                assert _split_of(ex.question) == split
                assert where.setdefault(ex.question, split) == split


def test_ids_are_unique_and_name_the_split(small_task):
    for split in ("train", "validation", "test"):
        exs = getattr(small_task, split)
        assert [e.id for e in exs] == [f"arith-{split}-{i}" for i in range(len(exs))]


# ------------------------------------------------------------------------------- gold CoTs

@pytest.mark.parametrize("steps", [2, 3, 4])
def test_gold_programs_run_to_the_gold_answer(steps):
    exs = problems(steps)
    graded = grade_batch([e.cot for e in exs], exs, style="program", answer_type="number")
    wrong = [(e.question, e.cot, e.answer, g) for e, g in zip(exs, graded) if not g.correct]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_gold_nl_cots_state_the_gold_answer(steps):
    exs = problems(steps, style="nl")
    for ex in exs:
        answer = extract_answer(ex.cot, "nl")
        assert answer is not None and is_correct(answer, ex.answer, "number"), (ex.cot, ex.answer)
        assert ex.cot.endswith(f"{NL_ANSWER_PREFIX} {ex.answer}")
        # every "a op b = c" step in the N-CoT is true arithmetic
        steps_checked = 0
        for expr, value in re.findall(r"((?:\d+ [-+*/] )+\d+) = (\d+)", ex.cot):
            assert eval(expr) == float(value), ex.cot  # noqa: S307 - digits and operators only
            steps_checked += 1
        assert steps_checked == steps, ex.cot


def test_answers_are_positive_integers():
    for steps in (2, 3, 4):
        for ex in problems(steps, n=300):
            assert ex.answer.isdigit() and int(ex.answer) > 0, ex


# ------------------------------------------------------------------------------- difficulty

@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_number_of_steps_is_respected(steps):
    """Steps = relation lines + the final operation: a single count has no final operation
    (`result = name`), a total or difference has one (`result = a + b + c`, `result = a - b`)."""
    kinds = set()
    for ex in problems(steps, n=300):
        first, count, relations, result_expr = parse_program(ex.cot)
        final_op = 0 if re.fullmatch(r"\w+", result_expr) else 1
        assert len(relations) + final_op == steps, ex.cot
        # assignment lines = the given count + one per relation + `result = ...`
        assert sum(1 for line in ex.cot.splitlines() if ASSIGN_RE.match(line)) == len(relations) + 2
        # one sentence per fact plus the question
        assert ex.question.count(".") == len(relations) + 1
        kinds.add("single" if not final_op else "total" if "+" in result_expr else "difference")
    # one step can only be a single count (a total or difference needs a relation first)
    assert kinds == ({"single"} if steps == 1 else {"single", "total", "difference"})


def test_mixed_difficulty_covers_the_range():
    cfg = DataConfig(n_train=400, n_test=0, validation_size=0, min_steps=2, max_steps=4)
    seen = set()
    for ex in generate_examples(cfg, "program")["train"]:
        _, _, relations, result_expr = parse_program(ex.cot)
        seen.add(len(relations) + (0 if re.fullmatch(r"\w+", result_expr) else 1))
    assert seen == {2, 3, 4}


@pytest.mark.parametrize("max_number", [5, 20, 50])
def test_max_number_bounds_the_given_count_and_additions(max_number):
    """max_number bounds the one count the question gives outright and every "+ n" amount. (It does
    not bound "n fewer" amounts, which may reach the source's count - 1: see the report.)"""
    for ex in problems(3, n=300, max_number=max_number):
        _, count, relations, _ = parse_program(ex.cot)
        assert 2 <= count <= max_number
        for _, _, op, amount in relations:
            if op == "+":
                assert 1 <= amount <= max_number
            elif op in "*":
                assert amount in (2, 3)
            elif op == "/":
                assert amount == 2


@pytest.mark.parametrize("bad, keys", [
    (dict(min_steps=3, max_steps=2), ("min_steps", "max_steps")),
    (dict(min_steps=0, max_steps=2), ("min_steps", "max_steps")),
    (dict(max_number=3), ("max_number",)),
])
def test_bad_difficulty_raises_naming_the_keys(bad, keys):
    with pytest.raises(ValueError) as err:
        load_task(DataConfig(n_train=10, n_test=2, validation_size=2, **bad))
    for key in keys:
        assert key in str(err.value)


# ------------------------------------------------------------------------------- several valid CoTs

def test_many_problems_admit_another_valid_program():
    """ReFT needs room to explore: reordering independent people or summing a total in another
    order must still give the gold answer, and it must be possible for a decent share of problems."""
    exs = [ex for steps in (2, 3, 4) for ex in problems(steps, n=200)]
    alternatives = [alternative_program(ex.cot) for ex in exs]
    differing = [i for i, (ex, alt) in enumerate(zip(exs, alternatives)) if alt != ex.cot]
    assert len(differing) >= 0.3 * len(exs), f"only {len(differing)}/{len(exs)} problems have another order"
    picked = [exs[i] for i in differing]
    graded = grade_batch([alternatives[i] for i in differing], picked, style="program", answer_type="number")
    wrong = [(alternatives[i], exs[i].answer, g) for i, g in zip(differing, graded) if not g.correct]
    assert not wrong, wrong[:3]


def test_facts_are_shuffled_in_some_problems():
    """About half the questions state the facts out of dependency order (so reading order is not
    always a valid computation order)."""
    exs = problems(3, n=400)
    out_of_order = 0
    for ex in exs:
        first, count, relations, _ = parse_program(ex.cot)
        names = [first] + [p for p, _, _, _ in relations]
        facts = ex.question.split(". ")[: len(names)]
        stated = [fact.split()[0].lower() for fact in facts]
        out_of_order += stated != names
    assert 0.25 * len(exs) < out_of_order < 0.75 * len(exs)


# ------------------------------------------------------------------------------- the Task wrapper

def test_task_prompt_and_target(small_task):
    ex = small_task.train[0]
    assert small_task.prompt(ex) == PROMPT_TEMPLATE.format(question=ex.question)
    assert small_task.target(ex) == ex.cot
    assert small_task.prompt(ex, for_generation=True) == small_task.prompt(ex)  # no header by default
    header_task = replace(small_task, program_header_in_prompt=True)
    gen_prompt = header_task.prompt(ex, for_generation=True)
    assert gen_prompt.startswith(small_task.prompt(ex)) and gen_prompt.endswith('"""\n')
    # the header in the prompt + the rest of the gold program, generated, grades as correct
    rest = ex.cot.split("\n", 1)[1]
    assert header_task.grade([rest], [ex])[0].correct


def test_max_train_and_max_test_cut_the_splits():
    task = load_task(DataConfig(n_train=64, n_test=16, validation_size=8, max_train=10, max_test=5))
    assert (len(task.train), len(task.validation), len(task.test)) == (10, 5, 5)


def test_make_problem_with_a_fixed_rng_is_reproducible():
    a = make_problem(random.Random(7), 3, 20)
    b = make_problem(random.Random(7), 3, 20)
    assert a == b


def test_random_gold_order_shows_one_of_several_valid_orders():
    """gold_order=random: the annotated program is one valid dependency order among several, so
    across problems the same structure is annotated in different orders (ReFT's premise), and
    every annotation still computes the gold answer."""
    from reftune.sandbox import run_programs
    from reftune.tasks import DataConfig
    from reftune.tasks.arithmetic import generate_examples

    cfg = DataConfig(n_train=300, n_test=10, validation_size=10, min_steps=3, max_steps=4, seed=5)
    examples = generate_examples(cfg, "program")["train"]
    results = run_programs([ex.cot for ex in examples])
    assert all(abs(float(r.value) - float(ex.answer)) < 1e-6 for r, ex in zip(results, examples))
    # A total's terms appear in an order other than the definition order in some gold programs.
    def defined(ex):
        return [line.split(" = ")[0].strip() for line in ex.cot.splitlines()[1:-2]]

    totals = [ex for ex in examples if " + " in ex.cot.splitlines()[-2] and "in total" in ex.question]
    reordered = [ex for ex in totals
                 if ex.cot.splitlines()[-2].split(" = ")[1].split(" + ") != defined(ex)]
    assert totals and 0.2 < len(reordered) / len(totals) < 1.0
    # gold_order=built: a total always lists people in the order the program defined them.
    built = generate_examples(DataConfig(**{**cfg.__dict__, "gold_order": "built"}), "program")["train"]
    built_totals = [ex for ex in built if "in total" in ex.question]
    assert built_totals and all(ex.cot.splitlines()[-2].split(" = ")[1].split(" + ") == defined(ex) for ex in built_totals)
