"""Loaders for the data formats people have, into one record shape.

A record is a dict ``{prompt, response, category, answer}``: the prompt the
model sees (its tokens are masked out of the loss), the response it learns,
a label for skewed partitions, and, for math, the exact final answer.

* ``alpaca``: JSON array or JSONL of ``{instruction, input, output}``.
* ``gsm8k``: JSONL of ``{question, answer}`` with the final ``#### N``.

A malformed line or a missing field stops with one error naming the file and
line; an empty file too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from pl_parablock.errors import DataError

__all__ = ["PROMPT", "PROMPT_WITH_INPUT", "load_records", "make_record"]

PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"


def make_record(instruction: str, inp: str, response: str, category: str, answer: str | None) -> dict[str, Any]:
    prompt = PROMPT_WITH_INPUT.format(instruction=instruction, input=inp) if inp else PROMPT.format(instruction=instruction)
    return {"prompt": prompt, "response": response, "category": category, "answer": answer}


def _rows(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, object) of a JSON array file or a JSONL file."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        for i, row in enumerate(rows):
            yield i + 1, row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None


def _field(path: str, lineno: int, row: Any, key: str, required: bool = True) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{path}:{lineno}: missing field {key!r} (have: {', '.join(sorted(row)) or 'none'})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def gsm8k_answer(text: str) -> str | None:
    """The final answer after ``####``, with thousands separators removed."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "") or None


def load_records(fmt: str, path: str) -> list[dict[str, Any]]:
    """Records of a data file in format ``fmt`` (``alpaca`` or ``gsm8k``).

    Raises:
        DataError: missing file, malformed line or field, or no record.
    """
    out: list[dict[str, Any]] = []
    if fmt == "alpaca":
        for lineno, row in _rows(path):
            instruction = _field(path, lineno, row, "instruction")
            inp = _field(path, lineno, row, "input", required=False)
            output = _field(path, lineno, row, "output")
            category = str(row.get("category", "alpaca"))
            out.append(make_record(instruction, inp, output, category, None))
    elif fmt == "gsm8k":
        for lineno, row in _rows(path):
            question = _field(path, lineno, row, "question")
            answer = _field(path, lineno, row, "answer")
            final = gsm8k_answer(answer)
            if final is None:
                raise DataError(f"{path}:{lineno}: the answer has no final '#### N' line (GSM8K format)")
            out.append(make_record(question, "", answer, "math", final))
    else:
        raise DataError(f"unknown data format {fmt!r}; use alpaca or gsm8k")
    if not out:
        raise DataError(f"data file {path!r} holds no record")
    return out
