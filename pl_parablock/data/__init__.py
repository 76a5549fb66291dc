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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pl_parablock.data.chat import chat_prompt, chat_segments
from pl_parablock.data.formats import WHERE, LoadedRecords, load_records, make_record, read_records
from pl_parablock.data.module import ClientDataModule, collate, encode_example, encode_prompt, encode_record, pack_examples
from pl_parablock.data.partition import dirichlet_partition, iid_partition
from pl_parablock.data.synthetic import MATH_CATEGORIES, synthetic_records
from pl_parablock.errors import DataError

if TYPE_CHECKING:  # the recipe's schema imports the data formats from this package
    from pl_parablock.recipe.schema import Recipe

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


def _read(recipe: Recipe, path: str, split: str | None = None) -> LoadedRecords:
    d = recipe.data
    return read_records(d.format, path, on_error=d.on_error, columns=d.columns, split=split or d.split, row_format=d.row_format)


def _hold_out(recipe: Recipe, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    hold = min(recipe.eval.max_samples, len(records) // 10)
    if hold == 0:
        return records, []
    perm = np.random.default_rng(recipe.seed + EVAL_SEED_OFFSET).permutation(len(records))
    held = {int(i) for i in perm[:hold]}
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _eval_file(recipe: Recipe, default_path: str | None) -> LoadedRecords | None:
    """Evaluation records named by ``eval.path`` / ``eval.split``, or ``None`` to hold out."""
    e = recipe.eval
    if e.path is not None:
        return _read(recipe, e.path, e.split)
    if e.split is not None and default_path is not None:
        return _read(recipe, default_path, e.split)
    return None


def recipe_data(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training records and evaluation records of a recipe, all clients together.

    Synthetic data draws a separate evaluation set (prompts seen in training
    excluded). File data uses ``eval.path`` (or ``eval.split``) or holds out
    up to ``eval.max_samples`` records (at most a tenth) before partitioning.
    A natural partition concatenates the clients' files in client order.
    """
    if recipe.data.partition.kind == "natural":
        paths = _natural_paths(recipe)
        parts = [client_data(recipe, i, evaluate=i == 0) for i in range(len(paths))]
        return [r for p in parts for r in p.train], parts[0].evals
    return _pooled(recipe)[:2]


def _pooled(recipe: Recipe, evaluate: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    d, e = recipe.data, recipe.eval
    if d.format == "synthetic":
        train = synthetic_records(d.num_samples, recipe.seed)
        seen = {r["prompt"] for r in train}
        pool = synthetic_records(e.max_samples * 3, recipe.seed + EVAL_SEED_OFFSET)
        return train, [r for r in pool if r["prompt"] not in seen][: e.max_samples], []
    assert d.path is not None
    loaded = _read(recipe, d.path)
    if _names_eval(recipe):
        named = _eval_file(recipe, d.path) if evaluate else None
        if named is None:
            return loaded.records, [], loaded.skipped
        return loaded.records, named.records[: e.max_samples], loaded.skipped + named.skipped
    train, evals = _hold_out(recipe, loaded.records)
    return train, evals, loaded.skipped


def _natural_paths(recipe: Recipe) -> list[str]:
    d = recipe.data
    if d.client_paths is not None:
        return list(d.client_paths)
    if d.path is None:
        raise DataError("a natural partition needs data.client_paths (one file per client) or this client's data.path")
    return [d.path] * recipe.federation.clients


def client_shares(recipe: Recipe, records: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of each client's records under the recipe's ``iid`` or ``dirichlet`` partition.

    Raises:
        DataError: a record without the Dirichlet label field, a label with one value only, or too few records.
    """
    p = recipe.data.partition
    n = recipe.federation.clients
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
        return dirichlet_partition(labels, n, p.alpha, recipe.seed)
    if p.kind == "natural":
        raise DataError("a natural partition has no shares to compute: each client reads its own file (see client_data)")
    return iid_partition(len(records), n, recipe.seed)


def client_data(recipe: Recipe, client_id: int | None, *, evaluate: bool = True) -> ClientData:
    """The records client ``client_id`` trains on (``None``: all clients' together) and the evaluation set.

    With a ``natural`` partition the client reads only its own file (plus
    ``eval.path`` when it evaluates, or, without one, client 0's file, from
    which the evaluation records are held out).

    Raises:
        DataError: a missing, malformed or empty file, or an empty share.
    """
    if recipe.data.partition.kind != "natural":
        train, evals, skipped = _pooled(recipe, evaluate)
        if client_id is None:
            return ClientData(train, evals if evaluate else [], skipped, [len(train)])
        shares = client_shares(recipe, train)
        if not shares[client_id]:
            raise DataError(f"client {client_id}'s share of the data is empty; use fewer clients or more data")
        return ClientData([train[i] for i in shares[client_id]], evals if evaluate else [], skipped, [len(s) for s in shares])

    paths = _natural_paths(recipe)
    if client_id is None:
        parts = [client_data(recipe, i, evaluate=evaluate and i == 0) for i in range(len(paths))]
        return ClientData(
            [r for p in parts for r in p.train], parts[0].evals, [s for p in parts for s in p.skipped], [len(p.train) for p in parts]
        )
    loaded = _read(recipe, paths[client_id])
    own, skipped = loaded.records, list(loaded.skipped)
    held: list[dict[str, Any]] = []
    if _names_eval(recipe):
        named = _eval_file(recipe, paths[client_id]) if evaluate else None
        if named is not None:
            held, skipped = named.records[: recipe.eval.max_samples], skipped + named.skipped
    elif client_id == 0:
        own, held = _hold_out(recipe, own)
    elif evaluate and recipe.data.client_paths is not None:
        held = _hold_out(recipe, _read(recipe, paths[0]).records)[1]
    return ClientData(own, held if evaluate else [], skipped)


def _names_eval(recipe: Recipe) -> bool:
    return recipe.eval.path is not None or (recipe.eval.split is not None and recipe.data.format == "hf")


def describe_data(recipe: Recipe) -> list[str]:
    """Lines for people: the data, every client's share (and its labels, for Dirichlet), the bad rows skipped."""
    d, p = recipe.data, recipe.data.partition
    kind = p.kind + (f"(alpha={p.alpha}, over {p.label})" if p.kind == "dirichlet" else "")
    if p.kind == "natural":
        if d.client_paths is None:
            raise DataError(
                "a natural partition on one machine needs data.client_paths, one file per client "
                "(data.path alone is each client's own file on its own machine)"
            )
        parts = [client_data(recipe, i, evaluate=i == 0) for i in range(recipe.federation.clients)]
        shards = [part.train for part in parts]
        evals, skipped = parts[0].evals, [s for part in parts for s in part.skipped]
        where = [f"  {path}" for path in d.client_paths]
    else:
        train, evals, skipped = _pooled(recipe)
        shards = [[train[i] for i in share] for share in client_shares(recipe, train)]
        where = [""] * len(shards)
    total = sum(len(s) for s in shards)
    lines = [f"data: {d.format}, {total} training records split {kind}; {len(evals)} eval records"]
    for i, (shard, src) in enumerate(zip(shards, where)):
        line = f"  client {i}: {len(shard):>6} records ({100 * len(shard) / max(total, 1):.1f} %)"
        if p.kind == "dirichlet":
            top = Counter(str(r.get(p.label)) for r in shard).most_common(3)
            line += "  " + ", ".join(f"{lab} {100 * c / len(shard):.0f}%" for lab, c in top)
        lines.append(line + src)
    if skipped:
        lines.append(f"  skipped {len(skipped)} bad rows (data.on_error=skip), the first: {skipped[0]}")
    return lines
