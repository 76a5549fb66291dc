"""Offline, seeded data sets the quickstart and the tests train on.

Two kinds of records, each with an exactly checkable answer:

* arithmetic word problems (``add``, ``sub``, ``mul``) whose response ends
  with the GSM8K convention ``#### N``;
* small verifiable instruction tasks (``reverse``, ``upper``, ``count``,
  ``sort``).

The same ``(n, seed)`` always gives the same records.
"""

from __future__ import annotations

import random
from typing import Any

from pl_parablock.data.formats import make_record

__all__ = ["CATEGORIES", "MATH_CATEGORIES", "synthetic_records"]

NAMES = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jo",
    "Kai",
    "Lea",
    "Max",
    "Nia",
    "Omar",
    "Pia",
    "Raj",
    "Sam",
    "Tom",
    "Uma",
]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "eggs", "cups", "plums", "keys", "beads"]
WORDS = [
    "river",
    "planet",
    "garden",
    "window",
    "yellow",
    "summer",
    "bridge",
    "forest",
    "silver",
    "rocket",
    "pencil",
    "market",
    "orange",
    "island",
    "castle",
    "winter",
    "button",
    "candle",
    "dragon",
    "mirror",
    "basket",
    "letter",
    "school",
    "flower",
    "ticket",
    "engine",
    "pocket",
    "travel",
    "cotton",
    "harbor",
    "bottle",
    "tunnel",
    "marble",
    "violet",
    "copper",
    "lemon",
    "tiger",
    "cloud",
    "stone",
    "music",
]
MATH_CATEGORIES = ("add", "sub", "mul")
CATEGORIES = (*MATH_CATEGORIES, "reverse", "upper", "count", "sort")


def _math(rng: random.Random, kind: str) -> tuple[str, str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return q, f"{a} + {b} = {a + b}\n#### {a + b}", str(a + b)
    if kind == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return q, f"{a} - {b} = {a - b}\n#### {a - b}", str(a - b)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    q = f"{name} buys {a} bags with {b} {item} each. How many {item} is that?"
    return q, f"{a} * {b} = {a * b}\n#### {a * b}", str(a * b)


def _task(rng: random.Random, kind: str) -> tuple[str, str, str]:
    if kind == "sort":
        nums = rng.sample(range(1, 60), rng.randint(3, 5))
        return "Sort the numbers from smallest to largest.", ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))
    word = rng.choice(WORDS)
    if kind == "reverse":
        return "Write the word backwards.", word, word[::-1]
    if kind == "upper":
        return "Write the word in capital letters.", word, word.upper()
    return "How many letters does the word have?", word, str(len(word))


def synthetic_records(n: int, seed: int = 0, *, math_fraction: float = 0.5) -> list[dict[str, Any]]:
    """``n`` records, about ``math_fraction`` of them arithmetic problems.

    Example::

        >>> rec = synthetic_records(1, seed=3)[0]
        >>> sorted(rec)
        ['answer', 'category', 'prompt', 'response']
    """
    rng = random.Random(seed)
    out = []
    tasks = [c for c in CATEGORIES if c not in MATH_CATEGORIES]
    for _ in range(n):
        if rng.random() < math_fraction:
            kind = rng.choice(MATH_CATEGORIES)
            question, response, answer = _math(rng, kind)
            out.append(make_record(question, "", response, kind, answer))
        else:
            kind = rng.choice(tasks)
            instruction, inp, response = _task(rng, kind)
            out.append(make_record(instruction, inp, response, kind, None))
    return out
