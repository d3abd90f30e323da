"""The built-in task: seeded grade-school word problems with one gold CoT in each style.

A problem introduces 2-4 people who own some items. One person's count is given; every other
count is stated relative to someone already known ("3 more than", "twice as many as", ...).
The question asks for one count, a total or a difference. The number of arithmetic steps is the
number of relations plus the final operation (if any).

Why it suits ReFT: the sentences are shuffled in a fraction of the problems, totals can be summed
in any order and independent people can be computed in any order, so many different CoTs reach
the right answer while the annotation shows exactly one (dependency order, then the final
step). SFT imitates that one CoT; RL can find and reinforce whatever works.

Splits are disjoint by construction: a problem's text decides its split (a hash), so the same
question can never sit in two splits, whatever the seed and sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass

from reftune.rewards.formats import answer_line, find_answer
from reftune.tasks.base import NL_ANSWER_PREFIX, DataConfig, Example, Task

NAMES = [
    "Tom", "Mary", "Sam", "Lily", "Ben", "Anna", "Jack", "Emma", "Leo", "Mia", "Noah", "Zoe",
    "Omar", "Ivy", "Ryan", "Nina", "Paul", "Rosa", "Hugo", "Kate", "Luke", "Alice", "Owen", "Ella",
]
ITEMS = [
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "shells", "coins",
    "stamps", "balloons", "toys", "candies", "flowers", "rocks", "buttons",
]


@dataclass(frozen=True)
class Relation:
    """`person` has a count derived from `source`'s: op is one of + - * /."""

    person: str
    source: str
    op: str
    amount: int


def _relation_sentence(r: Relation, item: str) -> str:
    if r.op == "+":
        return f"{r.person} has {r.amount} more {item} than {r.source}."
    if r.op == "-":
        return f"{r.person} has {r.amount} fewer {item} than {r.source}."
    if r.op == "*":
        times = "twice" if r.amount == 2 else f"{r.amount} times"
        return f"{r.person} has {times} as many {item} as {r.source}."
    return f"{r.person} has half as many {item} as {r.source}."


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def random_topological_order(rng: random.Random, first: str, relations: list[Relation]) -> list[Relation]:
    """A random order of `relations` in which every person comes after the person they depend on."""
    known, pending, order = {first}, list(relations), []
    while pending:
        ready = [r for r in pending if r.source in known]
        pick = rng.choice(ready)
        order.append(pick)
        known.add(pick.person)
        pending.remove(pick)
    return order


def make_problem(rng: random.Random, n_steps: int, max_number: int, gold_order: str = "random") -> tuple[Example, str] | None:
    """One problem with exactly `n_steps` operations: (example with the program CoT, the N-CoT),
    or None if the draw failed."""
    item = rng.choice(ITEMS)
    kind = rng.choice(["single", "total", "difference"])
    n_relations = n_steps if kind == "single" else n_steps - 1
    if n_relations < 1:
        return None
    people = rng.sample(NAMES, n_relations + 1)
    counts, relations = _draw_relations(rng, people, max_number)

    # Question and final step.
    if kind == "single":
        target = people[-1]
        question_line = f"How many {item} does {target} have?"
        answer = counts[target]
        final_expr = None
    elif kind == "total":
        question_line = f"How many {item} do they have in total?"
        answer = sum(counts.values())
        final_expr = ""  # written below, in the gold CoT's order
    else:
        a, b = rng.sample(people, 2)
        if counts[a] == counts[b]:
            return None
        if counts[a] < counts[b]:
            a, b = b, a
        question_line = f"How many more {item} does {a} have than {b}?"
        answer = counts[a] - counts[b]

    facts = [f"{people[0]} has {counts[people[0]]} {item}."] + [_relation_sentence(r, item) for r in relations]
    # Shuffled facts keep the problem solvable but break "compute in reading order".
    if rng.random() < 0.5:
        rng.shuffle(facts)
    question = " ".join(facts + [question_line])

    # The one gold CoT: people in a dependency order, then the final step. With gold_order="random"
    # that order (and the order of a total's terms) is drawn at random among the valid ones, so
    # the annotation is one of many equally right CoTs, as in real data; "built" keeps the order
    # in which the generator introduced the people.
    if gold_order == "random":
        relations = random_topological_order(rng, people[0], relations)
    elif gold_order != "built":
        raise ValueError(f"data.gold_order must be random or built, got {gold_order!r}")
    summands = [people[0]] + [r.person for r in relations]
    if gold_order == "random":
        rng.shuffle(summands)
    if kind == "total":
        final_expr = " + ".join(p.lower() for p in summands)
    elif kind == "difference":
        final_expr = f"{a.lower()} - {b.lower()}"
    program = _program(people[0], counts, relations, final_expr if final_expr else people[-1].lower())
    # Gold natural-language CoT: the same steps with the arithmetic written out.
    steps = [f"{people[0]} has {counts[people[0]]} {item}."]
    steps += [f"{r.person} has {_fmt(counts[r.source])} {r.op} {r.amount} = {_fmt(counts[r.person])} {item}."
              for r in relations]
    if kind == "total":
        steps.append(f"In total they have {' + '.join(_fmt(counts[p]) for p in summands)} = {_fmt(answer)} {item}.")
    elif kind == "difference":
        steps.append(f"{a} has {_fmt(counts[a])} - {_fmt(counts[b])} = {_fmt(answer)} more {item} than {b}.")
    nl = "\n".join(steps) + f"\n{NL_ANSWER_PREFIX} {_fmt(answer)}"
    return Example(id="", question=question, answer=_fmt(answer), cot=program, options=None), nl


def _draw_relations(rng: random.Random, people: list[str], max_number: int) -> tuple[dict[str, int], list[Relation]]:
    """The first person's count, then each other person's as an operation on someone already
    counted (ops that would leave small whole numbers are turned into +)."""
    counts = {people[0]: rng.randint(2, max_number)}
    relations: list[Relation] = []
    for person in people[1:]:
        source = rng.choice(list(counts))
        base = counts[source]
        op = rng.choice("+-*/")
        if op == "/" and base % 2:
            op = "+"
        if op == "-" and base < 3:
            op = "+"
        if op == "*" and base * 2 > 5 * max_number:
            op = "+"
        amount = {"+": rng.randint(1, max_number), "-": rng.randint(1, max(1, min(base - 1, max_number))),
                  "*": rng.randint(2, 3), "/": 2}[op]
        counts[person] = {"+": base + amount, "-": base - amount, "*": base * amount, "/": base // 2}[op]
        relations.append(Relation(person, source, op, amount))
    return counts, relations


def _program(first: str, counts: dict[str, int], relations: list[Relation], result_expr: str) -> str:
    """The gold P-CoT: one assignment per person in the relations' order, then the result."""
    lines = ["def solution():", f"    {first.lower()} = {counts[first]}"]
    lines += [f"    {r.person.lower()} = {r.source.lower()} {r.op} {r.amount}" for r in relations]
    return "\n".join(lines + [f"    result = {result_expr}", "    return result"])


def _split_of(question: str) -> str:
    """Hash-based split: ~80% train, 10% validation, 10% test, fixed by the text alone."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def generate_examples(cfg: DataConfig, style: str) -> dict[str, list[Example]]:
    """Draw problems until each split is full. Deterministic in (cfg.seed, sizes, difficulty)."""
    if not 1 <= cfg.min_steps <= cfg.max_steps:
        raise ValueError(f"data.min_steps/max_steps must satisfy 1 <= min <= max, got {cfg.min_steps}/{cfg.max_steps}")
    if cfg.max_number < 4:
        raise ValueError(f"data.max_number must be at least 4, got {cfg.max_number}")
    if cfg.validation_size > cfg.n_train:
        # The validation split is drawn like the others (about 1 problem in 10 lands in it), so an
        # oversized one would spend minutes generating problems before failing or training.
        raise ValueError(f"data.validation_size={cfg.validation_size}: must be at most data.n_train "
                         f"({cfg.n_train}) on the built-in task")
    want = {"train": cfg.n_train, "validation": cfg.validation_size, "test": cfg.n_test}
    out: dict[str, list[Example]] = {k: [] for k in want}
    seen: set[str] = set()
    rng = random.Random(cfg.seed)
    attempts = 0
    while any(len(out[k]) < n for k, n in want.items()):
        attempts += 1
        if attempts > 50 * sum(want.values()) + 10_000:
            raise ValueError("data: could not draw enough distinct problems; raise max_number or max_steps")
        drawn = make_problem(rng, rng.randint(cfg.min_steps, cfg.max_steps), cfg.max_number, cfg.gold_order)
        if drawn is None:
            continue
        ex, nl = drawn
        if ex.question in seen:
            continue
        seen.add(ex.question)
        split = _split_of(ex.question)
        if len(out[split]) >= want[split]:
            continue
        cot = ex.cot if style == "program" else nl
        out[split].append(Example(f"arith-{split}-{len(out[split])}", ex.question, ex.answer, cot))
    return out


def load_arithmetic_task(cfg: DataConfig) -> Task:
    splits = generate_examples(cfg, cfg.style)
    test = splits["test"][: cfg.max_test or None]
    validation = splits["validation"][: cfg.max_test or None]
    task = Task(
        name="arithmetic", style=cfg.style, answer_type="number",
        train=splits["train"][: cfg.max_train or None], validation=validation, test=test,
        prompt_format=cfg.prompt_format, system_prompt=cfg.system_prompt, answer_format=cfg.answer_format,
    )
    if cfg.style == "nl" and find_answer(f"{NL_ANSWER_PREFIX} 1", task.answer_format) is None:
        for split in ("train", "validation", "test"):  # gold CoTs state the answer the way it is read
            setattr(task, split, [_restate(ex, task.answer_format) for ex in getattr(task, split)])
    return task


def _restate(ex: Example, answer_format: str) -> Example:
    """`ex` with its gold N-CoT's answer line written in `answer_format`."""
    body = ex.cot.rsplit(NL_ANSWER_PREFIX, 1)[0].rstrip()
    return dataclasses.replace(ex, cot=f"{body}\n{answer_line(ex.answer, answer_format)}")
