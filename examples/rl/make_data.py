"""Write the files of examples/rl/: train.jsonl, valid.jsonl, format.jsonl, grader.json and
grader_strict.json.

    python examples/rl/make_data.py

Deterministic (fixed seed, standard library only). Every kind of question has its own pool of keys
(an unordered pair for sums, a pair for differences, a value for doubles, a conversion and a value for
units, an operation and a pair for stories); a fifth of each pool is held out for validation, so no
validation question repeats the numbers of a training question of its kind, let alone its text.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
VALID_FRACTION = 0.2
# prompts per kind in train.jsonl; valid.jsonl gets a fifth as many of each
FORMAT_EXAMPLES = 32  # training questions answered in format.jsonl
TRAIN_COUNTS = {"sum": 180, "difference": 150, "double": 90, "units": 120, "story": 60}

# The model is asked for the bare number; the instruction is worded a few ways so it is not one string.
INSTRUCTIONS = [
    "Reply with the number only.",
    "Answer with the number only.",
    "Give only the number.",
    "Reply with just the number.",
]

SUM = [
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} + {b}.",
    "What do you get when you add {b} to {a}?",
]
DIFFERENCE = [
    "What is {a} minus {b}?",
    "What is {a} - {b}?",
    "Subtract {b} from {a}.",
    "What is {b} less than {a}?",
    "Calculate {a} - {b}.",
    "What is the difference between {a} and {b}?",
]
DOUBLE = [
    "What is double {n}?",
    "What is twice {n}?",
    "What is {n} times 2?",
    "What is 2 times {n}?",
    "What is {n} doubled?",
]
# (larger unit, smaller unit, how many of the smaller make one of the larger)
UNITS = [
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("metres", "centimetres", 100),
    ("kilometres", "metres", 1000),
    ("kilograms", "grams", 1000),
    ("weeks", "days", 7),
]
UNIT_TEMPLATES = [
    "How many {small} are in {n} {big}?",
    "How many {small} is {n} {big}?",
    "Convert {n} {big} to {small}.",
    "{n} {big} is how many {small}?",
]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Ella", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Leo"]
THINGS = ["apples", "marbles", "stickers", "pencils", "books", "stamps", "shells", "cards"]
STORY_ADD = [
    "{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?",
    "{name} had {a} {things}. A friend gave {name} {b} more. How many {things} does {name} have?",
    "There are {a} {things} in one box and {b} in another. How many {things} are there in total?",
]
STORY_SUB = [
    "{name} has {a} {things} and gives away {b}. How many {things} are left?",
    "{name} had {a} {things} and lost {b}. How many {things} does {name} have now?",
    "A box holds {a} {things}. {name} takes out {b}. How many {things} are still in the box?",
]

# Python grader sources (OpenAI `python` grader: `grade(sample, item) -> float`, standard library only).
# `correct` reads the last number of the reply, so "3 + 4 = 7." counts; `bare` also wants nothing else.
NUMBER_PARSING = r"""import re

# 7, -3, 1,200, 7.0; a trailing full stop is not a decimal point ("= 42." is 42)
NUMBER = re.compile(r"[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?")


def value(text):
    return float(text.replace(",", "").replace("\u2212", "-"))
"""
CORRECT_SOURCE = (
    NUMBER_PARSING
    + r"""

def grade(sample, item):
    # 1.0 when the last number in the reply equals the answer, else 0.0
    numbers = NUMBER.findall(sample.get("output_text") or "")
    return float(bool(numbers) and abs(value(numbers[-1]) - value(str(item["answer"]))) < 1e-9)
"""
)
BARE_SOURCE = (
    NUMBER_PARSING
    + r"""

def grade(sample, item):
    # 1.0 when the whole reply is the answer ("7", "7.", " 1,200 "), else 0.0
    text = (sample.get("output_text") or "").strip().removesuffix(".").strip()
    if NUMBER.fullmatch(text) is None:
        return 0.0
    return float(abs(value(text) - value(str(item["answer"]))) < 1e-9)
"""
)
GRADER = {
    "type": "multi",
    "name": "arithmetic",
    "graders": {
        "correct": {"type": "python", "name": "correct", "source": CORRECT_SOURCE},
        "bare": {"type": "python", "name": "bare", "source": BARE_SOURCE},
    },
    "calculate_output": "0.8 * correct + 0.2 * bare",
}
GRADER_STRICT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


# --- number pools: each key fixes the numbers of a question; keys are split between train and valid


def sum_keys() -> list[tuple[int, int]]:
    # unordered pairs, so that "3 + 5" in valid never meets "5 + 3" in train
    return [(a, b) for a in range(2, 41) for b in range(a, 41)]


def difference_keys() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 51) for b in range(2, a)]


def double_keys() -> list[int]:
    return list(range(2, 51))


def units_keys() -> list[tuple[int, int]]:
    return [(u, n) for u in range(len(UNITS)) for n in range(2, 13)]


def story_keys() -> list[tuple[str, int, int]]:
    adds = [("add", a, b) for a in range(2, 16) for b in range(a, 16)]  # unordered, like sums
    subs = [("sub", a, b) for a in range(5, 21) for b in range(2, a)]
    return adds + subs


# --- one question from a key


def make_sum(rng: random.Random, key: tuple[int, int]) -> tuple[str, int]:
    a, b = key if rng.random() < 0.5 else key[::-1]
    return rng.choice(SUM).format(a=a, b=b), a + b


def make_difference(rng: random.Random, key: tuple[int, int]) -> tuple[str, int]:
    a, b = key
    return rng.choice(DIFFERENCE).format(a=a, b=b), a - b


def make_double(rng: random.Random, key: int) -> tuple[str, int]:
    return rng.choice(DOUBLE).format(n=key), 2 * key


def make_units(rng: random.Random, key: tuple[int, int]) -> tuple[str, int]:
    unit, n = key
    big, small, factor = UNITS[unit]
    return rng.choice(UNIT_TEMPLATES).format(n=n, big=big, small=small), factor * n


def make_story(rng: random.Random, key: tuple[str, int, int]) -> tuple[str, int]:
    op, a, b = key
    if op == "add" and rng.random() < 0.5:
        a, b = b, a
    template = rng.choice(STORY_ADD if op == "add" else STORY_SUB)
    question = template.format(name=rng.choice(NAMES), things=rng.choice(THINGS), a=a, b=b)
    return question, a + b if op == "add" else a - b


KINDS: dict[str, tuple[Callable[[], list], Callable[[random.Random, object], tuple[str, int]]]] = {
    "sum": (sum_keys, make_sum),
    "difference": (difference_keys, make_difference),
    "double": (double_keys, make_double),
    "units": (units_keys, make_units),
    "story": (story_keys, make_story),
}


def build(rng: random.Random, kind: str, keys: list, count: int) -> list[dict]:
    """`count` prompts of one kind with distinct question texts, drawn from `keys`."""
    _, make = KINDS[kind]
    rows, seen = [], set()
    for _ in range(100 * count):
        if len(rows) == count:
            break
        question, answer = make(rng, rng.choice(keys))
        if question in seen:
            continue
        seen.add(question)
        content = f"{question} {rng.choice(INSTRUCTIONS)}"
        rows.append({"messages": [{"role": "user", "content": content}], "answer": str(answer), "kind": kind})
    if len(rows) < count:
        raise SystemExit(f"make_data.py: only {len(rows)} distinct {kind} questions, wanted {count}")
    return rows


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    rng = random.Random(SEED)
    train, valid = [], []
    for kind, count in TRAIN_COUNTS.items():
        keys = KINDS[kind][0]()
        rng.shuffle(keys)
        n_valid = round(len(keys) * VALID_FRACTION)
        valid += build(rng, kind, keys[:n_valid], count // 5)
        train += build(rng, kind, keys[n_valid:], count)
    rng.shuffle(train)
    rng.shuffle(valid)

    def question(row: dict) -> str:
        content = row["messages"][0]["content"]
        return next(content.removesuffix(" " + i) for i in INSTRUCTIONS if content.endswith(i))

    if {question(row) for row in train} & {question(row) for row in valid}:
        raise SystemExit("make_data.py: a validation question is also a training question")
    write_atomic(HERE / "train.jsonl", jsonl(train))
    write_atomic(HERE / "valid.jsonl", jsonl(valid))
    # a few worked answers in the format asked for, for GRPO's warm start (--warm-start-data): the
    # first training questions of each kind, answered with the bare number
    shown = [next(row for row in train if row["kind"] == kind) for kind in TRAIN_COUNTS]
    shown += [row for row in train if row not in shown][: FORMAT_EXAMPLES - len(shown)]
    warm = [
        {"messages": [*row["messages"], {"role": "assistant", "content": row["answer"]}]} for row in shown
    ]
    write_atomic(HERE / "format.jsonl", jsonl(warm))
    write_atomic(HERE / "grader.json", json.dumps(GRADER, indent=2) + "\n")
    write_atomic(HERE / "grader_strict.json", json.dumps(GRADER_STRICT, indent=2) + "\n")
    print(f"wrote {len(train)} training and {len(valid)} validation prompts and the graders to {HERE}")


if __name__ == "__main__":
    main()
