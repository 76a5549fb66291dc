"""Each virtual client's compute speed and link, from the recipe's ``simulation.profile`` (pure).

This lives with the recipe, not in :mod:`pl_parablock.simulation`: a
profile is checked by resolving it (a list per client, a CSV file, a seeded
distribution whose median must be valid), so its vocabulary, its checks and
its resolution are one piece of code, and the recipe's validation needs it
without importing the simulator. The simulator imports
:func:`resolve_profiles` and :class:`ClientProfile` from here.

Every key of the profile (``compute_factor``, ``uplink_mbps``,
``downlink_mbps``, ``latency_ms``) takes one of:

* a number: every client;
* ``null``: the recipe's ``link`` section (``compute_factor``: 1);
* a list: one value per client, in client order (``null`` in a rate
  list: unlimited);
* a seeded distribution: ``{distribution: lognormal, median: M, spread: S}``
  (``log(value) ~ Normal(log M, S)``; drawn from the recipe's seed, one
  stream per key).

``csv`` names a file with one row per client, in client order, and a
header naming some of the four keys (and optionally ``client``, which must
then count 0, 1, 2, ...); its columns win over the keys. An empty cell of a
rate column is an unlimited rate.

A client's compute time in the simulated clock is its measured step time
times its ``compute_factor``; its transfers take ``latency_ms`` once plus
the bytes at its rate, as the emulated link paces them
(:class:`~pl_parablock.wire.link.Link`).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DISTRIBUTIONS", "PROFILE_KEYS", "ClientProfile", "profile_problems", "resolve_profiles"]

PROFILE_KEYS = ("compute_factor", "uplink_mbps", "downlink_mbps", "latency_ms")
"""The per-client quantities a profile gives."""
DISTRIBUTIONS = ("lognormal",)
"""Seeded distributions a profile key may be drawn from."""
_RATES = ("uplink_mbps", "downlink_mbps")
_SEED_OFFSET = {"compute_factor": 101, "uplink_mbps": 211, "downlink_mbps": 307, "latency_ms": 401}


@dataclass(frozen=True)
class ClientProfile:
    """One virtual client: compute factor (on the measured step time), link rates (Mbit/s, ``None``: unlimited) and latency."""

    compute_factor: float = 1.0
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    latency_ms: float = 0.0


def _check_value(problems: list[str], where: str, key: str, v: Any) -> float | None:
    if v is None:
        if key in _RATES:
            return None
        problems.append(f"`{where}` is empty; give a number")
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        problems.append(f"`{where}` is {v!r}; give a number")
        return None
    v = float(v)
    if key == "latency_ms":
        if v < 0:
            problems.append(f"`{where}` is {v:g}; it must be >= 0")
            return None
    elif v <= 0:
        what = "speed factor" if key == "compute_factor" else "rate"
        problems.append(f"`{where}` is {v:g}; a {what} must be > 0")
        return None
    return v


def _values(problems: list[str], prefix: str, key: str, spec: Any, default: Any, clients: int, seed: int) -> list[Any]:
    where = f"{prefix}.{key}"
    if spec is None:
        return [default] * clients
    if isinstance(spec, dict):
        dist = spec.get("distribution")
        if dist not in DISTRIBUTIONS:
            problems.append(f"`{where}.distribution` is {dist!r}; allowed: {', '.join(DISTRIBUTIONS)}")
            return [default] * clients
        unknown = sorted(set(spec) - {"distribution", "median", "spread"})
        if unknown:
            problems.append(f"`{where}` has unknown keys {unknown}; a lognormal takes median and spread")
        median = _check_value(problems, f"{where}.median", "compute_factor", spec.get("median"))
        spread = spec.get("spread", 0.0)
        if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not spread >= 0:
            problems.append(f"`{where}.spread` is {spread!r}; give a number >= 0 (the sigma of log(value))")
            return [default] * clients
        if median is None:
            return [default] * clients
        rng = np.random.default_rng(seed + _SEED_OFFSET[key])
        return [float(x) for x in rng.lognormal(math.log(median), float(spread), size=clients)]
    if isinstance(spec, (list, tuple)):
        if len(spec) != clients:
            problems.append(f"`{where}` lists {len(spec)} values for {clients} clients; give one per client")
            return [default] * clients
        return [_check_value(problems, f"{where}[{i}]", key, v) for i, v in enumerate(spec)]
    return [_check_value(problems, where, key, spec)] * clients


def _read_csv(problems: list[str], prefix: str, path: str, clients: int) -> dict[str, list[Any]]:
    where = f"{prefix}.csv"
    if not os.path.isfile(path):
        problems.append(f"`{where}` {path!r} is not a file")
        return {}
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        problems.append(f"`{where}` {path!r} is empty; give a header and one row per client")
        return {}
    header = [h.strip() for h in rows[0]]
    unknown = [h for h in header if h not in (*PROFILE_KEYS, "client")]
    if unknown:
        problems.append(f"`{where}` {path!r}: unknown columns {unknown}; use client, {', '.join(PROFILE_KEYS)}")
        return {}
    body = rows[1:]
    if len(body) != clients:
        problems.append(f"`{where}` {path!r} has {len(body)} rows for {clients} clients (federation.clients); give one row per client")
        return {}
    out: dict[str, list[Any]] = {h: [] for h in header if h != "client"}
    for i, row in enumerate(body):
        line = i + 2
        if len(row) != len(header):
            problems.append(f"`{where}` {path}:{line} has {len(row)} cells, the header {len(header)}")
            return {}
        for h, cell in zip(header, row):
            cell = cell.strip()
            if h == "client":
                if cell != str(i):
                    problems.append(f"`{where}` {path}:{line}: client is {cell!r}, expected {i} (rows in client order)")
                    return {}
                continue
            if cell == "" and h in _RATES:
                out[h].append(None)
                continue
            try:
                value: Any = float(cell)
            except ValueError:
                value = cell
            out[h].append(_check_value(problems, f"{where}` {path}:{line} `{h}", h, value))
    return out


def _resolve(section: Any, clients: int, link: Any, seed: int, prefix: str) -> tuple[list[ClientProfile], list[str]]:
    problems: list[str] = []
    defaults = {
        "compute_factor": 1.0,
        "uplink_mbps": getattr(link, "uplink_mbps", None),
        "downlink_mbps": getattr(link, "downlink_mbps", None),
        "latency_ms": float(getattr(link, "latency_ms", 0.0) or 0.0),
    }
    columns = {k: _values(problems, prefix, k, getattr(section, k, None), defaults[k], clients, seed) for k in PROFILE_KEYS}
    path = getattr(section, "csv", None)
    if path:
        columns.update(_read_csv(problems, prefix, str(path), clients))
    if problems:
        return [], problems
    profiles = [
        ClientProfile(
            compute_factor=float(columns["compute_factor"][i]),
            uplink_mbps=columns["uplink_mbps"][i],
            downlink_mbps=columns["downlink_mbps"][i],
            latency_ms=float(columns["latency_ms"][i] or 0.0),
        )
        for i in range(clients)
    ]
    return profiles, []


def profile_problems(section: Any, clients: int, link: Any = None, seed: int = 0, prefix: str = "simulation.profile") -> list[str]:
    """What is wrong with a ``simulation.profile`` section for ``clients`` clients: one line per problem, naming the key."""
    return _resolve(section, clients, link, seed, prefix)[1]


def resolve_profiles(section: Any, clients: int, link: Any = None, seed: int = 0) -> list[ClientProfile]:
    """Every client's :class:`ClientProfile` (``link``: the recipe's ``link`` section, the default of the link keys).

    Raises:
        ValueError: the section has problems (:func:`profile_problems` lists them).
    """
    profiles, problems = _resolve(section, clients, link, seed, "simulation.profile")
    if problems:
        raise ValueError("; ".join(problems))
    return profiles
