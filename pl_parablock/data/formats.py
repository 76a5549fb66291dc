"""Loaders for the data formats people have, into one record shape.

A record is a dict. Single-turn records hold ``prompt`` (the text the model
sees; its tokens are masked out of the loss) and ``response`` (what it
learns); chat records hold ``messages`` instead (every assistant turn is
learned, the rest is masked). Every record also holds ``category`` (a label
for skewed partitions), ``answer`` (the exact final answer of a math
problem, or ``None``), ``source`` (``file:line`` for error messages) and the
row's other scalar fields (e.g. ``source_name``), so a Dirichlet partition can
be drawn over any column.

* ``alpaca``: JSON array or JSONL of ``{instruction, input, output}``.
* ``gsm8k``: JSONL of ``{question, answer}`` with the final ``#### N``.
* ``chat``: JSONL of ``{messages: [{role, content}, ...]}`` with at least one
  ``assistant`` turn (an optional ``answer`` field, or a final ``#### N`` in
  the last assistant turn, makes it a math record).
* ``hf``: a Hugging Face ``datasets`` data set from local files (JSON, JSONL,
  CSV, Parquet, Arrow) or a ``save_to_disk`` directory, whose rows read as one
  of the three above (``row_format``, detected from the columns by default).

``columns`` renames fields: ``{"question": "problem"}`` reads the question
from a ``problem`` column. A malformed line, a missing field or a field of
the wrong type stops with one error naming the file and line, or, with
``on_error="skip"``, drops the row and counts it. A file with no valid
record is always an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pl_parablock.errors import DataError

__all__ = [
    "DATA_FORMATS",
    "FILE_FORMATS",
    "PROMPT",
    "PROMPT_WITH_INPUT",
    "ROW_FORMATS",
    "ROW_FORMAT_CHOICES",
    "WHERE",
    "LoadedRecords",
    "gsm8k_answer",
    "load_records",
    "make_record",
    "read_records",
]

PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"

FILE_FORMATS = ("alpaca", "gsm8k", "chat", "hf")
"""The formats :func:`read_records` reads from a file (or, for ``hf``, a data set directory)."""
DATA_FORMATS = ("synthetic", *FILE_FORMATS)
"""``data.format``: the generated ``synthetic`` data (:mod:`pl_parablock.data.synthetic`) or a file format."""
ROW_FORMATS = ("alpaca", "gsm8k", "chat")
"""How the rows of an ``hf`` data set read."""
ROW_FORMAT_CHOICES = ("auto", *ROW_FORMATS)
"""``data.row_format``: a row format, or ``auto`` to detect it from the columns."""
# record keys a row's extra fields may not overwrite
WHERE = "_where"  # record key: the file and line (or data set row) it came from, for messages
RESERVED = frozenset({"prompt", "response", "category", "answer", "messages", WHERE})


def make_record(instruction: str, inp: str, response: str, category: str, answer: str | None) -> dict[str, Any]:
    prompt = PROMPT_WITH_INPUT.format(instruction=instruction, input=inp) if inp else PROMPT.format(instruction=instruction)
    return {"prompt": prompt, "response": response, "category": category, "answer": answer}


def gsm8k_answer(text: str) -> str | None:
    """The final answer after ``####``, with thousands separators removed."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "") or None


@dataclass
class LoadedRecords:
    """Records read from one file, and the rows skipped (``on_error="skip"``), one message each."""

    records: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)


class _BadRowError(DataError):
    """A row that can be skipped (as opposed to a file that cannot be read at all)."""


# ---------------------------------------------------------------------------
# rows


def _field(where: str, row: Any, key: str, columns: Mapping[str, str], *, required: bool = True) -> str:
    if not isinstance(row, dict):
        raise _BadRowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    name = columns.get(key, key)
    value = row.get(name)
    if value is None:
        if required:
            renamed = f" (data.columns.{key})" if name != key else ""
            raise _BadRowError(f"{where}: missing field {name!r}{renamed} (have: {', '.join(sorted(map(str, row))) or 'none'})")
        return ""
    if not isinstance(value, str):
        raise _BadRowError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _messages(where: str, row: Any, columns: Mapping[str, str]) -> list[dict[str, Any]]:
    if not isinstance(row, dict):
        raise _BadRowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    name = columns.get("messages", "messages")
    msgs = row.get(name)
    if msgs is None:
        raise _BadRowError(f"{where}: missing field {name!r} (have: {', '.join(sorted(map(str, row))) or 'none'})")
    if not isinstance(msgs, list) or not msgs:
        raise _BadRowError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRowError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content', got {m!r:.80}")
        out.append(dict(m))
    if not any(m["role"] == "assistant" for m in out):
        raise _BadRowError(f"{where}: the conversation has no 'assistant' turn, so nothing to learn from it")
    return out


def _extras(row: dict[str, Any], used: set[str]) -> dict[str, Any]:
    return {
        str(k): v
        for k, v in row.items()
        if k not in used and str(k) not in RESERVED and (v is None or isinstance(v, (str, int, float, bool)))
    }


def parse_row(fmt: str, row: Any, where: str, columns: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One row of format ``fmt`` (``alpaca``, ``gsm8k`` or ``chat``) as a record.

    Raises:
        DataError: naming ``where`` and the missing or malformed field.
    """
    cols = dict(columns or {})
    if fmt == "alpaca":
        instruction = _field(where, row, "instruction", cols)
        inp = _field(where, row, "input", cols, required=False)
        output = _field(where, row, "output", cols)
        rec = make_record(instruction, inp, output, "alpaca", None)
        used = {cols.get(k, k) for k in ("instruction", "input", "output")}
    elif fmt == "gsm8k":
        question = _field(where, row, "question", cols)
        answer = _field(where, row, "answer", cols)
        final = gsm8k_answer(answer)
        if final is None:
            raise _BadRowError(f"{where}: the answer has no final '#### N' line (GSM8K format)")
        rec = make_record(question, "", answer, "math", final)
        used = {cols.get(k, k) for k in ("question", "answer")}
    elif fmt == "chat":
        msgs = _messages(where, row, cols)
        answer_name = cols.get("answer", "answer")
        given = row.get(answer_name)
        last = next(m["content"] for m in reversed(msgs) if m["role"] == "assistant")
        if given is not None and not isinstance(given, (str, int, float)):
            raise _BadRowError(f"{where}: field {answer_name!r} must be a number or a string, got {type(given).__name__}")
        chat_answer = str(given) if given is not None else gsm8k_answer(last)
        rec = {"messages": msgs, "category": "chat", "answer": chat_answer}
        used = {cols.get("messages", "messages"), answer_name}
    else:
        raise DataError(f"unknown row format {fmt!r}; use one of {', '.join(ROW_FORMATS)}")
    assert isinstance(row, dict)
    cat_name = cols.get("category", "category")
    if row.get(cat_name) is not None:
        rec["category"] = str(row[cat_name])
    rec.update(_extras(row, used | {cat_name}))
    rec[WHERE] = where
    return rec


# ---------------------------------------------------------------------------
# files


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(``file:line``, object) of a JSON array file or a JSONL file; a bad JSONL line yields a _BadRowError."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); is it a JSON/JSONL file?") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        # walk the (valid) array again to give each item its line
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        for row in rows:
            while text[pos] in " \t\r\n,":
                pos += 1
            _, end = decoder.raw_decode(text, pos)
            yield f"{path}:{_line_of(text, pos)}", row
            pos = end
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{lineno}", _BadRowError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object")


HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _load_hf(path: str, split: str) -> tuple[Any, str]:
    """A ``datasets.Dataset`` from local files or a ``save_to_disk`` directory, and its label for messages."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("data.format=hf needs the `datasets` package: pip install datasets") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(
                f"{path}: not a data set saved with save_to_disk ({str(exc).splitlines()[0]}); "
                "give such a directory or a JSON/JSONL/CSV/Parquet/Arrow file"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} has no split {split!r} (splits: {', '.join(loaded)}); set data.split or eval.split")
            return loaded[split], f"{path}[{split}]"
        return loaded, path
    ext = os.path.splitext(path)[1].lower()
    builder = HF_BUILDERS.get(ext)
    if builder is None:
        raise DataError(f"{path}: data.format=hf reads {', '.join(HF_BUILDERS)} files or a save_to_disk directory")
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} not found")
    with tempfile.TemporaryDirectory(prefix="pl_parablock-hf-") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, ...)
            raise DataError(f"{path}: datasets could not read it as {builder} ({str(exc).splitlines()[0]})") from None
    return ds, path


def _detect_row_format(columns: list[str], mapping: Mapping[str, str], where: str) -> str:
    have = set(columns)

    def has(*keys: str) -> bool:
        return all(mapping.get(k, k) in have for k in keys)

    if has("messages"):
        return "chat"
    if has("question", "answer"):
        return "gsm8k"
    if has("instruction", "output"):
        return "alpaca"
    raise DataError(
        f"{where}: cannot tell how to read rows with columns {', '.join(columns)}; set data.row_format "
        "(alpaca, gsm8k or chat) and map your columns with data.columns, e.g. data.columns={question: problem, answer: solution}"
    )


def _hf_rows(path: str, split: str, row_format: str, columns: Mapping[str, str]) -> tuple[str, Iterator[tuple[str, Any]]]:
    ds, label = _load_hf(path, split)
    fmt = _detect_row_format(list(ds.column_names), columns, label) if row_format == "auto" else row_format
    return fmt, ((f"{label} row {i}", row) for i, row in enumerate(ds))


def read_records(
    fmt: str,
    path: str,
    *,
    on_error: str = "raise",
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    row_format: str = "auto",
) -> LoadedRecords:
    """Records of a data file (or, for ``hf``, a data set directory) in format ``fmt``.

    Args:
        fmt: ``alpaca``, ``gsm8k``, ``chat`` or ``hf``.
        path: the file, or for ``hf`` a file or a ``save_to_disk`` directory.
        on_error: ``raise`` on the first bad row, or ``skip`` it and count it.
        columns: ``{format field: column}`` for rows whose fields are named otherwise.
        split: ``hf``: the split of a saved ``DatasetDict``.
        row_format: ``hf``: ``auto``, ``alpaca``, ``gsm8k`` or ``chat``.

    Raises:
        DataError: missing or unreadable file, a bad row (unless skipped), or no valid record.
    """
    if fmt not in FILE_FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FILE_FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error={on_error!r}; use raise or skip")
    cols = dict(columns or {})
    if fmt == "hf":
        row_fmt, rows = _hf_rows(path, split, row_format, cols)
    else:
        row_fmt, rows = fmt, _json_rows(path)
    out = LoadedRecords([])
    for where, row in rows:
        try:
            if isinstance(row, _BadRowError):
                raise row
            out.records.append(parse_row(row_fmt, row, where, cols))
        except _BadRowError as exc:
            if on_error == "raise":
                raise DataError(str(exc)) from None
            out.skipped.append(str(exc))
    if not out.records and out.skipped:
        raise DataError(f"data file {path!r} holds no valid record: all {len(out.skipped)} rows are bad, the first: {out.skipped[0]}")
    if not out.records:
        raise DataError(f"data file {path!r} holds no record")
    return out


def load_records(fmt: str, path: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Records of a data file in format ``fmt``; see :func:`read_records` for the options.

    Raises:
        DataError: missing file, malformed line or field, or no record.
    """
    return read_records(fmt, path, **kwargs).records
