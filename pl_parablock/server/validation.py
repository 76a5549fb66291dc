"""Whole-update checks of the server: what an update must be before it touches a round.

Pure functions with no state, lock, file or socket; the intake
(:mod:`pl_parablock.server.intake`) and the
:class:`~pl_parablock.server.aggregator.Aggregator` call them and hand
their answer (a reason, or ``''``) to whoever records refusals.

* :func:`parse_update_header`: an update's header, field by field (strict
  integers, a string kind and codec, a number weight).
* :class:`UpdateLimits`: the bounds of the recipe on every update (weighting
  and weight bound, norm bound and clipping, the federation's codecs) and
  :meth:`UpdateLimits.problem`, the checks of an update's header and declared
  tensors against the block it trains.
* :func:`_check_specs`: declared tensors against the block (names, shapes,
  float dtypes); :func:`_check_values`: finite values and the L2 norm of a
  whole update, read a piece at a time; :func:`_all_finite`.

A refusal is a :class:`RefusedError`; its ``code`` says why to the transport.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pl_parablock.core.aggregate import PIECE_ELEMS
from pl_parablock.core.codecs import NO_COMPRESSION, Compression, block_problem
from pl_parablock.errors import FederationError
from pl_parablock.wire.framing import DTYPES, Spec, StagedTensors, short

__all__ = ["MAX_WEIGHT", "RefusedError", "StreamRefused", "UpdateHeader", "UpdateLimits", "parse_update_header"]

MAX_WEIGHT = float(2**53)
"""No update's weight may exceed this, whatever the bound of the recipe: every integer up to it is exact in
float64, and a weight times any float32 value stays far from float64's overflow."""


class RefusedError(FederationError):
    """A request the server refuses; ``code`` says why for the transport."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class StreamRefused(RefusedError):  # noqa: N818 - reads as what happened to the stream
    """A request stream refused while it is read, for its shape (an empty or undersized message of an upload).

    The call ends with it (code ``invalid``); it is never an update's
    refusal recorded in the report, since the update was never read.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "invalid")


@dataclass(frozen=True)
class UpdateHeader:
    """The fields of an update's header, checked for type (:func:`parse_update_header`)."""

    client: int
    round: int
    block: int
    kind: str
    base: int
    weight: float
    codec: str

    def record(self) -> dict[str, Any]:
        """What a refusal of this update records: client, round, block."""
        return {"client": self.client, "round": self.round, "block": self.block}


def parse_update_header(header: Mapping[str, Any]) -> UpdateHeader:
    """An update's header with every field of the right type.

    Raises:
        KeyError, TypeError, ValueError, OverflowError: a field is missing
            or of the wrong type (the caller refuses it as malformed).
    """
    client = _strict_int(header["client_id"])
    rnd = _strict_int(header["round"])
    block = _strict_int(header["block"])
    kind = header["kind"]
    base = _strict_int(header.get("base_version", -1))
    weight = header["weight"]
    codec = header.get("codec", "none")
    if not isinstance(kind, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)) or not isinstance(codec, str):
        raise TypeError("`kind` and `codec` must be strings and `weight` a number")
    return UpdateHeader(client, rnd, block, kind, base, float(weight), codec)


@dataclass(frozen=True)
class UpdateLimits:
    """The recipe's bounds on every update.

    Args:
        weighting: the clients' weighting (``uniform`` refuses any weight
            but 1); ``None``: any positive weight up to ``max_weight``.
        max_weight: the largest weight accepted (already :data:`MAX_WEIGHT`
            or less; 1 with ``uniform``).
        max_update_norm: refuse an update whose delta has a larger L2 norm.
        clip_norm: scale every delta down to this L2 norm.
        compression: the federation's codecs; an update compressed with
            another is refused.
    """

    weighting: str | None = None
    max_weight: float = MAX_WEIGHT
    max_update_norm: float | None = None
    clip_norm: float | None = None
    compression: Compression = NO_COMPRESSION

    @property
    def needs_norm(self) -> bool:
        """Whether an update's L2 norm must be known (a norm bound or clipping)."""
        return self.max_update_norm is not None or self.clip_norm is not None

    def weight_problem(self, weight: float) -> str:
        """Why ``weight`` is refused, or ``''``."""
        if not (weight > 0 and math.isfinite(weight)):
            return f"weight {weight!r} is not a positive number"
        if not (weight > self.max_weight or (self.weighting == "uniform" and weight != 1.0)):
            return ""
        if self.weighting == "uniform":
            return f"weight {weight:g} is not 1: this federation weighs clients uniformly (federation.weighting=uniform)"
        what = f"federation.weighting={self.weighting}" if self.weighting else "this federation"
        return (
            f"weight {weight:g} exceeds the bound {self.max_weight:g} of {what}: more than a client can have seen in a round "
            "(raise federation.max_weight if a client legitimately sees more, e.g. one spanning several devices)"
        )

    def norm_problem(self, norm: float) -> str:
        """Why an update of L2 ``norm`` is refused (:attr:`max_update_norm`), or ``''``."""
        if self.max_update_norm is not None and norm > self.max_update_norm:
            return f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:g}"
        return ""

    def problem(self, h: UpdateHeader, version: int, current: Mapping[str, Tensor], specs: list[Spec] | None) -> str:
        """Why an update is refused before its body is read, or ``''``.

        Checks its kind, its codec (the federation's; a lossy one carries a
        delta), its weight, a value's base version against the block's
        ``version``, and (given) its declared tensors against the block's
        global value ``current``.
        """
        if h.kind not in ("value", "delta"):
            return f"unknown update kind {short(h.kind)}"
        accepted = self.compression.upload.name
        if h.codec != accepted:
            return f"the update is compressed with {short(h.codec)}; this federation accepts {accepted!r} (federation.compression.codec)"
        if self.compression.lossy_upload and h.kind != "delta":
            return f"a {accepted} update must be a delta, not a {short(h.kind)}"
        weight = self.weight_problem(h.weight)
        if weight:
            return weight
        if h.kind == "value" and h.base != version:
            return f"stale base: the client started from version {h.base} of block {h.block}, the server holds {version}"
        if specs is None:
            return ""
        if self.compression.lossy_upload:
            shapes = {n: tuple(t.shape) for n, t in current.items()}
            return block_problem(self.compression.upload, [(s.name, s.dtype, s.shape) for s in specs], shapes)
        return _check_specs(current, specs, exact_dtype=(h.kind == "value"))


def _strict_int(value: Any) -> int:
    """An integer of a header (JSON integer, not a bool, a float or a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise TypeError(f"{short(value, 40)} is not a 64-bit integer")
    return value


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def _check_specs(current: Mapping[str, Tensor], specs: list[Spec], *, exact_dtype: bool) -> str:
    """Why an update's declared tensors do not fit the block, or ``''``."""
    names = [s.name for s in specs]
    if sorted(names) != sorted(current) or len(set(names)) != len(names):
        missing = sorted(set(current) - set(names))[:3]
        extra = sorted(set(names) - set(current))[:3]
        return f"tensor names do not match the block (missing {missing}, unexpected {extra})"
    for s in specs:
        g = current[s.name]
        if s.shape != tuple(g.shape):
            return f"tensor {s.name!r} has shape {list(s.shape)}, the block holds {list(g.shape)}"
        if exact_dtype and s.dtype != g.dtype:
            return f"tensor {s.name!r} is {s.dtype}, the block holds {g.dtype} (send a delta to use another wire dtype)"
        if not s.dtype.is_floating_point:
            return f"tensor {s.name!r} is {s.dtype}, not a floating-point tensor"
    return ""


def _check_values(current: Mapping[str, Tensor], staged: StagedTensors, kind: str, need_norm: bool) -> tuple[str, float]:
    """Finite values and (when needed) the L2 norm of the update's delta; reads the update once, a piece at a time."""
    sq = 0.0
    for name, start, t in staged.pieces(PIECE_ELEMS):
        if not _all_finite(t):
            return f"tensor {name!r} holds NaN or infinite values", math.inf
        if need_norm:
            d = t.to(torch.float64, copy=True)
            if kind == "value":
                d -= _global_piece(current, name, start, t.numel())
            sq += float(d.square().sum())
    return "", math.sqrt(sq)


def _all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite.

    A sum is NaN or infinite when any value is, so a finite sum decides at
    once (a sum in the values' own dtype: several times faster than in
    float64); only one that overflows is checked value by value.
    """
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _global_piece(current: Mapping[str, Tensor], name: str, start: int, count: int) -> Tensor:
    """Elements ``start .. start + count`` of the global tensor ``name``, flattened, in float64."""
    return current[name].detach().reshape(-1)[start : start + count].to(torch.float64)


def _deltas(staged: StagedTensors, current: Mapping[str, Tensor], kind: str) -> Iterator[tuple[str, int, Tensor]]:
    """The pieces of an update's delta (a value's minus the global, in float64; a delta as it is)."""
    for name, start, t in staged.pieces(PIECE_ELEMS):
        yield name, start, (t.to(torch.float64) - _global_piece(current, name, start, t.numel())) if kind == "value" else t
