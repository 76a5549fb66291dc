"""Data: offline generators, file formats, partitioning and the client data module.

Which records a client trains on follows the recipe's ``data.partition``:

* ``iid`` and ``dirichlet`` split one data set (``data.path``, or the
  synthetic generator) among the clients: every client reads the whole file
  and keeps its share, so every client must have the same file.
* ``natural``: client ``i`` reads only its own file, ``data.client_paths[i]``
  on one machine, or ``data.path`` given to that client on its own machine.

Evaluation records come from ``eval.path`` (or ``eval.split`` of a ``hf``
data set); otherwise up to ``eval.max_samples`` records (at most a tenth)
are held out before partitioning, from client 0's file for ``natural``.

The functions here take the recipe's ``data`` section and, by keyword, only
what else they read: the number of clients the data is split among, the
seed, and the ``eval`` section (which decides the held-out records, so the
training records too) — never the whole recipe.
"""

from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pl_parablock.data.formats import WHERE, LoadedRecords, load_records, make_record, read_records
from pl_parablock.data.partition import dirichlet_partition, iid_partition
from pl_parablock.data.synthetic import MATH_CATEGORIES, synthetic_records
from pl_parablock.errors import DataError

if TYPE_CHECKING:  # the recipe's schema imports the data formats from this package
    from pl_parablock.data.chat import chat_prompt, chat_segments
    from pl_parablock.data.module import ClientDataModule, collate, encode_example, encode_prompt, encode_record, pack_examples
    from pl_parablock.recipe.schema import DataSection, EvalSection

_LATE = {
    "chat_prompt": "pl_parablock.data.chat",
    "chat_segments": "pl_parablock.data.chat",
    "ClientDataModule": "pl_parablock.data.module",
    "collate": "pl_parablock.data.module",
    "encode_example": "pl_parablock.data.module",
    "encode_prompt": "pl_parablock.data.module",
    "encode_record": "pl_parablock.data.module",
    "pack_examples": "pl_parablock.data.module",
}
"""Names that need transformers or Lightning, imported on first use: reading and partitioning data (the recipe's
checks, the launcher, the server) needs neither."""


def __getattr__(name: str) -> Any:
    home = _LATE.get(name)
    if home is None:
        raise AttributeError(f"module 'pl_parablock.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "MATH_CATEGORIES",
    "ClientData",
    "ClientDataModule",
    "LoadedRecords",
    "chat_prompt",
    "chat_segments",
    "client_data",
    "client_shares",
    "collate",
    "describe_data",
    "dirichlet_partition",
    "encode_example",
    "encode_prompt",
    "encode_record",
    "iid_partition",
    "load_records",
    "make_record",
    "pack_examples",
    "read_records",
    "recipe_data",
    "synthetic_records",
]

EVAL_SEED_OFFSET = 1_000_003


@dataclass
class ClientData:
    """What one client trains on, what it evaluates on, and the bad rows dropped reading them.

    Attributes:
        train: this client's training records.
        evals: evaluation records (empty unless asked for).
        skipped: one message per bad row skipped while reading (``data.on_error=skip``).
        shares: the number of training records of every client, where this client knows them.
    """

    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    shares: list[int] | None = None


@dataclass(frozen=True)
class _Source:
    """The keys the functions below read: the ``data`` and ``eval`` sections, the clients and the seed."""

    data: DataSection
    evaluation: EvalSection
    clients: int
    seed: int


def _read(src: _Source, path: str, split: str | None = None) -> LoadedRecords:
    d = src.data
    return read_records(d.format, path, on_error=d.on_error, columns=d.columns, split=split or d.split, row_format=d.row_format)


def _hold_out(src: _Source, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    hold = min(src.evaluation.max_samples, len(records) // 10)
    if hold == 0:
        return records, []
    perm = np.random.default_rng(src.seed + EVAL_SEED_OFFSET).permutation(len(records))
    held = {int(i) for i in perm[:hold]}
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _eval_file(src: _Source, default_path: str | None) -> LoadedRecords | None:
    """Evaluation records named by ``eval.path`` / ``eval.split``, or ``None`` to hold out."""
    e = src.evaluation
    if e.path is not None:
        return _read(src, e.path, e.split)
    if e.split is not None and default_path is not None:
        return _read(src, default_path, e.split)
    return None


def recipe_data(
    data: DataSection, *, clients: int, seed: int, evaluation: EvalSection
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training records and evaluation records of a recipe, all clients together.

    Synthetic data draws a separate evaluation set (prompts seen in training
    excluded). File data uses ``eval.path`` (or ``eval.split``) or holds out
    up to ``eval.max_samples`` records (at most a tenth) before partitioning.
    A natural partition concatenates the clients' files in client order.

    Args:
        data: the recipe's ``data`` section.
        clients: ``federation.clients``.
        seed: the recipe's ``seed``.
        evaluation: the recipe's ``eval`` section.
    """
    src = _Source(data, evaluation, clients, seed)
    if data.partition.kind == "natural":
        paths = _natural_paths(src)
        parts = [_client_data(src, i, evaluate=i == 0) for i in range(len(paths))]
        return [r for p in parts for r in p.train], parts[0].evals
    return _pooled(src)[:2]


def _pooled(src: _Source, evaluate: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    d, e = src.data, src.evaluation
    if d.format == "synthetic":
        train = synthetic_records(d.num_samples, src.seed)
        seen = {r["prompt"] for r in train}
        pool = synthetic_records(e.max_samples * 3, src.seed + EVAL_SEED_OFFSET)
        return train, [r for r in pool if r["prompt"] not in seen][: e.max_samples], []
    assert d.path is not None
    loaded = _read(src, d.path)
    if _names_eval(src):
        named = _eval_file(src, d.path) if evaluate else None
        if named is None:
            return loaded.records, [], loaded.skipped
        return loaded.records, named.records[: e.max_samples], loaded.skipped + named.skipped
    train, evals = _hold_out(src, loaded.records)
    return train, evals, loaded.skipped


def _natural_paths(src: _Source) -> list[str]:
    d = src.data
    if d.client_paths is not None:
        return list(d.client_paths)
    if d.path is None:
        raise DataError("a natural partition needs data.client_paths (one file per client) or this client's data.path")
    return [d.path] * src.clients


def client_shares(data: DataSection, records: list[dict[str, Any]], *, clients: int, seed: int) -> list[list[int]]:
    """Indices of each of ``clients`` clients' records under ``data.partition`` (``iid`` or ``dirichlet``, drawn from ``seed``).

    Raises:
        DataError: a record without the Dirichlet label field, a label with one value only, or too few records.
    """
    p = data.partition
    if p.kind == "dirichlet":
        assert p.alpha is not None
        labels = []
        for r in records:
            if r.get(p.label) is None:
                fields = ", ".join(sorted(k for k in r if k not in ("prompt", "response", "messages")))
                raise DataError(
                    f"{r.get(WHERE, 'a record')}: no field {p.label!r} to draw the Dirichlet partition over "
                    f"(data.partition.label); fields: {fields}"
                )
            labels.append(str(r[p.label]))
        if len(set(labels)) < 2:
            raise DataError(
                f"the Dirichlet partition is drawn over {p.label!r} (data.partition.label), but every record has the "
                f"same value {labels[0]!r}: there is no label to skew; name a column with several values"
            )
        return dirichlet_partition(labels, clients, p.alpha, seed)
    if p.kind == "natural":
        raise DataError("a natural partition has no shares to compute: each client reads its own file (see client_data)")
    return iid_partition(len(records), clients, seed)


def client_data(
    data: DataSection, client_id: int | None, *, clients: int, seed: int, evaluation: EvalSection, evaluate: bool = True
) -> ClientData:
    """The records client ``client_id`` trains on (``None``: all clients' together) and the evaluation set.

    With a ``natural`` partition the client reads only its own file (plus
    ``eval.path`` when it evaluates, or, without one, client 0's file, from
    which the evaluation records are held out).

    Args:
        data: the recipe's ``data`` section.
        client_id: this client, or ``None`` for every client's records.
        clients: ``federation.clients``, the clients the data is split among.
        seed: the recipe's ``seed`` (the partition and the held-out records).
        evaluation: the recipe's ``eval`` section (``path``, ``split``, ``max_samples``).
        evaluate: also return the evaluation records.

    Raises:
        DataError: a missing, malformed or empty file, or an empty share.
    """
    return _client_data(_Source(data, evaluation, clients, seed), client_id, evaluate=evaluate)


def _client_data(src: _Source, client_id: int | None, *, evaluate: bool = True) -> ClientData:
    if src.data.partition.kind != "natural":
        train, evals, skipped = _pooled(src, evaluate)
        if client_id is None:
            return ClientData(train, evals if evaluate else [], skipped, [len(train)])
        shares = client_shares(src.data, train, clients=src.clients, seed=src.seed)
        if not shares[client_id]:
            raise DataError(f"client {client_id}'s share of the data is empty; use fewer clients or more data")
        return ClientData([train[i] for i in shares[client_id]], evals if evaluate else [], skipped, [len(s) for s in shares])

    paths = _natural_paths(src)
    if client_id is None:
        parts = [_client_data(src, i, evaluate=evaluate and i == 0) for i in range(len(paths))]
        return ClientData(
            [r for p in parts for r in p.train], parts[0].evals, [s for p in parts for s in p.skipped], [len(p.train) for p in parts]
        )
    loaded = _read(src, paths[client_id])
    own, skipped = loaded.records, list(loaded.skipped)
    held: list[dict[str, Any]] = []
    if _names_eval(src):
        named = _eval_file(src, paths[client_id]) if evaluate else None
        if named is not None:
            held, skipped = named.records[: src.evaluation.max_samples], skipped + named.skipped
    elif client_id == 0:
        own, held = _hold_out(src, own)
    elif evaluate and src.data.client_paths is not None:
        held = _hold_out(src, _read(src, paths[0]).records)[1]
    return ClientData(own, held if evaluate else [], skipped)


def _names_eval(src: _Source) -> bool:
    return src.evaluation.path is not None or (src.evaluation.split is not None and src.data.format == "hf")


def describe_data(data: DataSection, *, clients: int, seed: int, evaluation: EvalSection) -> list[str]:
    """Lines for people: the data, every client's share (and its labels, for Dirichlet), the bad rows skipped.

    Args: as :func:`client_data`'s.
    """
    src = _Source(data, evaluation, clients, seed)
    d, p = data, data.partition
    kind = p.kind + (f"(alpha={p.alpha}, over {p.label})" if p.kind == "dirichlet" else "")
    if p.kind == "natural":
        if d.client_paths is None:
            raise DataError(
                "a natural partition on one machine needs data.client_paths, one file per client "
                "(data.path alone is each client's own file on its own machine)"
            )
        parts = [_client_data(src, i, evaluate=i == 0) for i in range(clients)]
        shards = [part.train for part in parts]
        evals, skipped = parts[0].evals, [s for part in parts for s in part.skipped]
        where = [f"  {path}" for path in d.client_paths]
    else:
        train, evals, skipped = _pooled(src)
        shards = [[train[i] for i in share] for share in client_shares(d, train, clients=clients, seed=seed)]
        where = [""] * len(shards)
    total = sum(len(s) for s in shards)
    lines = [f"data: {d.format}, {total} training records split {kind}; {len(evals)} eval records"]
    for i, (shard, place) in enumerate(zip(shards, where)):
        line = f"  client {i}: {len(shard):>6} records ({100 * len(shard) / max(total, 1):.1f} %)"
        if p.kind == "dirichlet":
            top = Counter(str(r.get(p.label)) for r in shard).most_common(3)
            line += "  " + ", ".join(f"{lab} {100 * c / len(shard):.0f}%" for lab, c in top)
        lines.append(line + place)
    if skipped:
        lines.append(f"  skipped {len(skipped)} bad rows (data.on_error=skip), the first: {skipped[0]}")
    return lines
