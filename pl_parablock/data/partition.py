"""Splitting a data set among clients: IID or Dirichlet-skewed over a label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pl_parablock.errors import DataError

__all__ = ["dirichlet_partition", "iid_partition"]


def iid_partition(n: int, clients: int, seed: int = 0) -> list[list[int]]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into ``clients`` near-equal shares."""
    if clients < 1 or n < clients:
        raise DataError(f"cannot give {clients} clients at least one of {n} records each")
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, clients)]


def dirichlet_partition(labels: Sequence[str], clients: int, alpha: float, seed: int = 0, *, tries: int = 100) -> list[list[int]]:
    """Per label, split its records among clients with proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives each client few labels; large ``alpha`` approaches
    IID. Redrawn until every client has at least one record.

    Raises:
        DataError: no draw within ``tries`` gives every client a record.
    """
    if clients < 1 or len(labels) < clients:
        raise DataError(f"cannot give {clients} clients at least one of {len(labels)} records each")
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, not {alpha}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(str(lab), []).append(i)
    for _ in range(tries):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for lab in sorted(by_label):
            idx = np.array(by_label[lab])
            rng.shuffle(idx)
            p = rng.dirichlet([alpha] * clients)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for c, part in enumerate(np.split(idx, cuts)):
                shares[c].extend(int(i) for i in part)
        if all(shares):
            return [sorted(s) for s in shares]
    raise DataError(f"dirichlet partition with alpha={alpha} left a client without data in {tries} draws; raise alpha or use fewer clients")
