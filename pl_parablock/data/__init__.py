"""Data: offline generators, file formats, partitioning and the client data module."""

from __future__ import annotations

from typing import Any

import numpy as np

from pl_parablock.config import Recipe
from pl_parablock.data.formats import load_records, make_record
from pl_parablock.data.module import ClientDataModule, collate, encode_example
from pl_parablock.data.partition import dirichlet_partition, iid_partition
from pl_parablock.data.synthetic import MATH_CATEGORIES, synthetic_records

__all__ = [
    "MATH_CATEGORIES",
    "ClientDataModule",
    "client_shares",
    "collate",
    "dirichlet_partition",
    "encode_example",
    "iid_partition",
    "load_records",
    "make_record",
    "recipe_data",
    "synthetic_records",
]

EVAL_SEED_OFFSET = 1_000_003


def recipe_data(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training records and evaluation records of a recipe.

    Synthetic data draws a separate evaluation set (prompts seen in training
    excluded). File data uses ``eval.path`` or holds out up to
    ``eval.max_samples`` records (at most a tenth) before partitioning.
    """
    d, e = recipe.data, recipe.eval
    if d.format == "synthetic":
        train = synthetic_records(d.num_samples, recipe.seed)
        seen = {r["prompt"] for r in train}
        pool = synthetic_records(e.max_samples * 3, recipe.seed + EVAL_SEED_OFFSET)
        evals = [r for r in pool if r["prompt"] not in seen][: e.max_samples]
        return train, evals
    assert d.path is not None
    records = load_records(d.format, d.path)
    if e.path is not None:
        return records, load_records(d.format, e.path)[: e.max_samples]
    hold = min(e.max_samples, len(records) // 10)
    if hold == 0:
        return records, []
    perm = np.random.default_rng(recipe.seed + EVAL_SEED_OFFSET).permutation(len(records))
    held = set(int(i) for i in perm[:hold])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def client_shares(recipe: Recipe, records: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of each client's records under the recipe's partition."""
    p = recipe.data.partition
    n = recipe.federation.clients
    if p.kind == "dirichlet":
        assert p.alpha is not None
        return dirichlet_partition([str(r.get(p.label, "")) for r in records], n, p.alpha, recipe.seed)
    return iid_partition(len(records), n, recipe.seed)
