"""The arithmetic of a round: weighted aggregation, robust aggregation, clipping (used by :mod:`pl_parablock.core`).

Pure functions and a small accumulator, no threads and no I/O, so that the
exactness the design relies on can be tested on tensors alone.

Exactness. Client weights are sample or token counts (integers). Each weighted
update ``w_i * x_i`` is formed in float64, where the product of an integer
below 2**29 and a float32 (or bfloat16/float16) value is exact, and the sum is
divided by the total weight only when the round closes. So a single update, or
several identical ones, come out bitwise equal to the update itself, which is
what makes one-client federated block coordinate descent bitwise equal to the
centralized run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AGGREGATIONS",
    "AGGREGATION_RULES",
    "PIECE_ELEMS",
    "ROBUST_METHODS",
    "AggregationRule",
    "PiecePool",
    "RoundAccumulator",
    "assemble",
    "clip_factor",
    "median",
    "pieces_of",
    "robust_mean",
    "rule_of",
    "trimmed_mean",
]


def median(deltas: Sequence[Tensor], trim_fraction: float = 0.1) -> Tensor:
    """Coordinate-wise median of the clients' deltas of one tensor (unweighted; the mean of the middle two for an even count).

    Example::

        >>> median([torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([100.0])])
        tensor([2.], dtype=torch.float64)
    """
    stacked = _stacked(deltas)
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(deltas: Sequence[Tensor], trim_fraction: float = 0.1) -> Tensor:
    """Coordinate-wise trimmed mean: drop the ``trim_fraction`` largest and smallest values of every coordinate, average the rest.

    Example::

        >>> trimmed_mean([torch.tensor([v]) for v in (1.0, 2.0, 3.0, 100.0)], 0.25)
        tensor([2.5000], dtype=torch.float64)
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), not {trim_fraction}")
    stacked = _stacked(deltas)
    n = stacked.shape[0]
    k = math.floor(trim_fraction * n)
    ordered = stacked.sort(dim=0).values
    return ordered[k : n - k].mean(dim=0)


def _stacked(deltas: Sequence[Tensor]) -> Tensor:
    if not deltas:
        raise ValueError("no deltas to aggregate")
    return torch.stack([d.to(torch.float64) for d in deltas])


@dataclass(frozen=True)
class AggregationRule:
    """One way of forming a round's aggregate (``federation.aggregation``), with what it supports, stated once.

    Args:
        name: the recipe's ``federation.aggregation``.
        summary: one line for the recipe reference.
        combine: the coordinate-wise rule over the kept deltas of one tensor piece (unweighted), ``None`` for the
            weighted mean, which :class:`RoundAccumulator` sums as updates arrive.
        server_optimizer: a server optimizer (FedOpt) can follow it (it forms ``g + mean Δ``, not the global directly).
        staggered: it aggregates each block over the clients that trained it (``blocks.assignment: staggered``).
        everywhere: every driver runs it (the reference and the simulator too); else only the server does.
    """

    name: str
    summary: str
    combine: Callable[[Sequence[Tensor], float], Tensor] | None = None
    server_optimizer: bool = False
    staggered: bool = False
    everywhere: bool = False

    @property
    def streaming(self) -> bool:
        """Whether updates are summed as they arrive (the weighted mean), rather than kept until the round closes."""
        return self.combine is None


AGGREGATION_RULES: dict[str, AggregationRule] = {
    r.name: r
    for r in (
        AggregationRule("mean", "the weighted mean of the updates (FedAvg)", server_optimizer=True, staggered=True, everywhere=True),
        AggregationRule("trimmed_mean", "coordinate-wise trimmed mean (federation.trim_fraction at each end), unweighted",
                        combine=trimmed_mean),
        AggregationRule("median", "coordinate-wise median, unweighted", combine=median),
    )
}  # fmt: skip
"""Every aggregation rule, by name."""

AGGREGATIONS = tuple(AGGREGATION_RULES)
ROBUST_METHODS = tuple(n for n, r in AGGREGATION_RULES.items() if not r.streaming)


def rule_of(name: str) -> AggregationRule:
    """The :class:`AggregationRule` called ``name``.

    Raises:
        ValueError: no rule has that name (the message lists them).
    """
    try:
        return AGGREGATION_RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown aggregation {name!r}; use {', '.join(AGGREGATIONS)}") from None


def clip_factor(norm: float, max_norm: float | None) -> float:
    """Scale that brings an update of L2 ``norm`` within ``max_norm`` (1.0 if it already is)."""
    if max_norm is None or norm <= max_norm or norm == 0.0:
        return 1.0
    return max_norm / norm


def robust_mean(deltas: Sequence[Tensor], method: str, trim_fraction: float = 0.1) -> Tensor:
    """Coordinate-wise robust aggregate of the clients' deltas of one tensor (unweighted): ``method``'s rule.

    Example::

        >>> robust_mean([torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([100.0])], "median")
        tensor([2.], dtype=torch.float64)
    """
    rule = rule_of(method)
    if rule.combine is None:
        raise ValueError(f"unknown robust method {method!r}; use {', '.join(ROBUST_METHODS)}")
    return rule.combine(deltas, trim_fraction)


ServerStep = Callable[[str, int, Tensor, Tensor], Tensor]
"""``step(name, start, g, mean_delta) -> new g``: a server optimizer's update of one float64 piece of a tensor."""

PIECE_ELEMS = 1 << 20
"""Elements per piece: the server reads, checks and sums updates a piece at a time (8 MiB of float64)."""


def pieces_of(tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, int, Tensor]]:
    """Cut whole tensors into the ``(name, start, flat piece)`` triples :meth:`RoundAccumulator.add_pieces` takes."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, t in items:
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), PIECE_ELEMS):
            yield name, start, flat[start : start + PIECE_ELEMS]


def assemble(like: Tensor, pieces: Iterable[Tensor]) -> Tensor:
    """A new CPU tensor with the shape and dtype of ``like``, filled in order from ``pieces`` (any dtype, cast).

    With :func:`pieces_of` this forms a new value a piece at a time, so that
    the float64 work of a large tensor never exists whole.
    """
    out = torch.empty(like.shape, dtype=like.dtype)
    flat = out.view(-1)
    at = 0
    for values in pieces:
        flat[at : at + values.numel()].copy_(values)
        at += values.numel()
    if at != flat.numel():
        raise ValueError(f"pieces filled {at} of {flat.numel()} elements")
    return out


class PiecePool:
    """Float64 buffers of :data:`PIECE_ELEMS` elements kept for the next round's sums (one thread's).

    A round's sums are two float64 copies of its block, freed when it
    closes; allocating them afresh every round costs a page fault per 4 KiB
    (more than the arithmetic on them). Released pieces wait here, at most
    ``max_pieces`` of them, for the next round: idle memory no larger than
    the largest round's sums, which every round needs anyway. Not
    thread-safe: a server whose handler threads share one pool locks it
    (:class:`~pl_parablock.server.intake.SharedPiecePool`).
    """

    def __init__(self, max_pieces: int = 64) -> None:
        self.max_pieces = max_pieces
        self._free: dict[int, list[Tensor]] = {}  # by length (a tensor's last piece is shorter)
        self._count = 0

    def take(self, n: int) -> Tensor:
        """A float64 buffer of ``n`` elements, contents undefined."""
        free = self._free.get(n)
        if free:
            self._count -= 1
            return free.pop()
        return torch.empty(n, dtype=torch.float64)

    def give(self, piece: Tensor) -> None:
        """Return a buffer from :meth:`take` (the caller no longer uses it)."""
        if piece.dtype == torch.float64 and piece.dim() == 1 and piece._base is None and 0 < piece.numel() <= PIECE_ELEMS:
            if self._count < self.max_pieces:
                self._free.setdefault(piece.numel(), []).append(piece)
                self._count += 1


class _Fresh(PiecePool):
    """No pool: every piece is allocated, none kept (the default of one-off sums)."""

    def give(self, piece: Tensor) -> None:
        return None


class RoundAccumulator:
    """Running weighted sums of one round's updates for one block.

    Updates come in two kinds. A ``value`` update carries the client's end
    value ``e_i`` of the block and is sent when the client started the round
    from the current global value. A ``delta`` update carries ``e_i - s_i``
    (a client whose start differs from the global, e.g. a one-round-stale
    FedAvg client).

    Memory is two float64 copies of the block at most, whatever the number
    of clients. The sums are kept in pieces of :data:`PIECE_ELEMS` elements,
    so an update can be added a piece at a time, in any cut, as it arrives,
    and :meth:`finish` hands each piece of the sums back to ``pool`` as
    soon as it has written the new value's piece; the pool keeps them for
    the next round's sums (no page faults), so the round's peak is the sums
    plus the new value. Without a pool every piece is allocated afresh.
    """

    def __init__(self, pool: PiecePool | None = None) -> None:
        self.pool = pool if pool is not None else _Fresh(0)
        self._values: dict[str, dict[int, Tensor]] = {}
        self._deltas: dict[str, dict[int, Tensor]] = {}
        self.weight_values = 0.0
        self.weight_deltas = 0.0
        self.count = 0
        self._filled: dict[tuple[str, str, int], int] = {}  # pieces whose elements are set only up to an index

    @property
    def total_weight(self) -> float:
        return self.weight_values + self.weight_deltas

    def add(self, tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], weight: float, kind: str, scale: float = 1.0) -> None:
        """Add one client's update with its weight (> 0); ``scale`` multiplies a delta (clipping)."""
        self.add_pieces(pieces_of(tensors), weight, kind, scale)

    def add_pieces(self, pieces: Iterable[tuple[str, int, Tensor]], weight: float, kind: str, scale: float = 1.0) -> None:
        """:meth:`add` for an update given as ``(name, start, flat piece)`` triples.

        Pieces start at multiples of :data:`PIECE_ELEMS` and hold at most
        that many elements (as :func:`pieces_of` and
        :meth:`~pl_parablock.wire.framing.StagedTensors.pieces` cut them).
        """
        if kind not in ("value", "delta"):
            raise ValueError(f"update kind must be 'value' or 'delta', not {kind!r}")
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"update weight must be a positive finite number, not {weight!r}")
        if kind == "value" and scale != 1.0:
            raise ValueError("only deltas can be scaled")
        alpha = weight * scale
        for name, start, piece in pieces:
            if start % PIECE_ELEMS or piece.numel() > PIECE_ELEMS:
                raise ValueError(f"piece of {name!r} at {start} is not aligned to {PIECE_ELEMS} elements")
            self.add_segment(kind, name, piece.numel(), start, piece.detach().to("cpu").reshape(-1), alpha)
        self.commit(weight, kind)

    def sums(self, kind: str) -> dict[str, dict[int, Tensor]]:
        """The running sums of ``kind`` updates: tensor name -> piece index -> float64 piece."""
        return self._values if kind == "value" else self._deltas

    def add_segment(self, kind: str, name: str, piece_len: int, start: int, values: Tensor, alpha: float) -> None:
        """Add ``alpha * values`` to elements ``start ..`` of tensor ``name``'s sums, within one piece.

        ``piece_len`` is the length of the piece that holds ``start`` (used
        when the piece is created). Exactness: every element of the sums
        starts as ``-0.0``, the identity of IEEE addition (``-0.0 + x == x``
        bitwise, signed zeros included), and ``alpha * x`` is exact in
        float64 for an integer weight and a float32 (or narrower) ``x``, so
        adding an update a segment at a time, in any cut, gives bitwise what
        adding it whole gives. Elements met for the first time in order (the
        first update of a piece, as it streams in) are written as
        ``alpha * x`` directly, bitwise ``-0.0 + alpha * x``, without
        filling them first. Does not count the update: call :meth:`commit`
        when all of it is in.
        """
        i, off = divmod(start, PIECE_ELEMS)
        sums = self.sums(kind).setdefault(name, {})
        piece = sums.get(i)
        if piece is None:
            piece = sums[i] = self.pool.take(piece_len)
            self._filled[(kind, name, i)] = 0
        n = values.numel()
        if off + n > piece.numel():
            raise ValueError(f"segment of {name!r} at {start} crosses a piece boundary")
        key = (kind, name, i)
        filled = self._filled.get(key)
        if filled is not None and off == filled:  # new elements, in order: their sum is alpha * x
            target = piece[off : off + n]
            target.copy_(values)
            if alpha != 1.0:
                target.mul_(alpha)
            if filled + n < piece.numel():
                self._filled[key] = filled + n
            else:
                del self._filled[key]
            return
        if filled is not None:  # out of order (updates streaming in at once): start every remaining element at -0.0
            piece[filled:].fill_(-0.0)
            del self._filled[key]
        # float64 + float64 is much faster than a mixed-dtype add, and the same arithmetic
        piece[off : off + n].add_(values.to(torch.float64), alpha=alpha)

    def piece(self, kind: str, name: str, index: int) -> Tensor | None:
        """Piece ``index`` of tensor ``name``'s sums of ``kind`` updates (every element set), or ``None``."""
        piece = self.sums(kind).get(name, {}).get(index)
        if piece is not None:
            self._complete(kind, name, index, piece)
        return piece

    def replace_piece(self, kind: str, name: str, index: int, piece: Tensor | None) -> None:
        """Set (or, with ``None``, drop) a piece of the sums: a rollback's rebuilt piece (every element set)."""
        sums = self.sums(kind)
        self._filled.pop((kind, name, index), None)
        if piece is not None:
            sums.setdefault(name, {})[index] = piece
            return
        sums.get(name, {}).pop(index, None)
        if name in sums and not sums[name]:
            del sums[name]

    def _complete(self, kind: str, name: str, index: int, piece: Tensor) -> None:
        filled = self._filled.pop((kind, name, index), None)
        if filled is not None:
            piece[filled:].fill_(-0.0)

    def commit(self, weight: float, kind: str) -> None:
        """Count one update whose values were added with :meth:`add_segment`."""
        if kind == "value":
            self.weight_values += weight
        else:
            self.weight_deltas += weight
        self.count += 1

    def export(self) -> dict[str, Any]:
        """The running sums and totals, to go on adding elsewhere (:meth:`resume`): plain data and float64 pieces.

        Every piece is completed first (elements not yet set become ``-0.0``,
        the identity of the sums), so adding the next update to the resumed
        sums is bitwise what adding it here would give. The pieces are this
        accumulator's own (no copies); drop it once they are sent.
        """
        for kind in ("value", "delta"):
            for name, pieces in self.sums(kind).items():
                for i, piece in pieces.items():
                    self._complete(kind, name, i, piece)
        return {
            "values": self._values,
            "deltas": self._deltas,
            "weight_values": self.weight_values,
            "weight_deltas": self.weight_deltas,
            "count": self.count,
        }

    def resume(self, state: Mapping[str, Any]) -> None:
        """Go on from another accumulator's :meth:`export` (its sums become this one's)."""
        self._values = {n: dict(p) for n, p in state["values"].items()}
        self._deltas = {n: dict(p) for n, p in state["deltas"].items()}
        self.weight_values = float(state["weight_values"])
        self.weight_deltas = float(state["weight_deltas"])
        self.count = int(state["count"])
        self._filled = {}

    def finish(self, current: Mapping[str, Tensor], server_lr: float = 1.0, step: ServerStep | None = None) -> dict[str, Tensor]:
        """The new global value of the block.

        With ``server_lr == 1``, no ``step`` and only value updates, the
        weighted mean of the end values; otherwise ``g + server_lr * mean(delta)``
        where value updates count as ``e_i - g``, or, with ``step``,
        ``step(name, start, g, mean_delta)`` piece by piece (a server
        optimizer). Each result keeps the dtype of ``current``. The sums are
        consumed: call once.
        """
        total = self.total_weight
        if self.count == 0 or total <= 0:
            raise ValueError("cannot aggregate a round without updates")
        out: dict[str, Tensor] = {}
        for name, g in current.items():
            out[name] = assemble(g, self._new_pieces(name, g, server_lr, step))
        return out

    def _new_pieces(self, name: str, g: Tensor, server_lr: float, step: ServerStep | None) -> Iterator[Tensor]:
        """The new value of ``name`` in float64 pieces; each piece of the sums is freed once it is used."""
        total = self.total_weight
        values = self._values.pop(name, {})
        deltas = self._deltas.pop(name, {})
        for _, start, g_piece in pieces_of({name: g.detach().to("cpu")}):
            i = start // PIECE_ELEMS
            if step is None and server_lr == 1.0 and self.weight_deltas == 0.0:  # the weighted mean of the end values
                if i not in values:
                    raise ValueError(f"no update covered {name!r} at element {start}")
                piece = values.pop(i)
                self._complete("value", name, i, piece)
                yield piece if total == 1.0 else piece.div_(total)  # x / 1 == x: one pass less
                self.pool.give(piece)  # the caller is done with it once it asks for the next
                continue
            piece = g_piece.to(torch.float64, copy=True)
            s = torch.zeros_like(piece)
            if i in deltas:
                self._complete("delta", name, i, deltas[i])
                s.add_(deltas[i])
                self.pool.give(deltas.pop(i))
            if i in values:
                self._complete("value", name, i, values[i])
                s.add_(values[i]).sub_(piece, alpha=self.weight_values)
                self.pool.give(values.pop(i))
            if step is None:
                yield piece.add_(s, alpha=server_lr / total)
            else:
                yield step(name, start, piece, s.div_(total))
