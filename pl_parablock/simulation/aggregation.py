"""The server's work on one simulated round: check each update that arrived in time and form the round's aggregates.

It does what the server's intake and close do (:class:`~pl_parablock.server.intake.Intake`,
:meth:`~pl_parablock.server.rounds.Rounds.settle`), with the same functions,
so that the simulator's global is the process federation's bitwise:

* a compressed update is decoded (``federation.compression``);
* every update is checked: finite values, its weight within
  ``federation.max_weight``, and, with ``federation.max_update_norm`` or
  ``federation.clip_norm``, the L2 norm of its delta. An update the server
  refuses makes the real client stop (its transmitter raises "the server
  rejected the update"), so the simulation stops there too, with the
  server's reason (:class:`~pl_parablock.errors.FederationError`);
* ``federation.clip_norm`` scales a delta down to that norm (a value update
  becomes its delta ``e − g``, scaled);
* the weighted mean sums each update as it is added (a
  :class:`~pl_parablock.core.server.RoundStep` per block the round moves); a
  robust rule (``median``, ``trimmed_mean``) keeps the round's updates and
  combines their deltas a piece at a time when the round closes, as the
  server does.

Updates are added in client-id order (the order the reference and the
server's sums use; the robust rules sort per coordinate, so their order does
not matter).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pl_parablock.core.aggregate import AggregationRule, PiecePool, assemble, clip_factor, pieces_of
from pl_parablock.core.codecs import CodecError, decode_update
from pl_parablock.core.optimizers import ServerOptimizer, plain_step
from pl_parablock.core.server import RoundStep
from pl_parablock.errors import FederationError
from pl_parablock.server.validation import UpdateLimits, _check_values, _deltas
from pl_parablock.wire.framing import StagedTensors

__all__ = ["ServerRound"]


@dataclass
class _Kept:
    tensors: StagedTensors
    kind: str
    scale: float


class ServerRound:
    """One round's updates as the server takes them, and the new value of each block it moves.

    Args:
        round_index: the round.
        blocks: the blocks the round moves (one, or several when staggered).
        rule: ``federation.aggregation``'s rule.
        limits: the server's bounds on an update (weight, norm, clipping, the codecs).
        server_lr: ``federation.server_lr``.
        optimizer: the server optimizer (its state per block lives with the caller, across rounds).
        trim_fraction: ``federation.trim_fraction``.
        pool: float64 buffers for the sums, reused round after round.
    """

    def __init__(
        self,
        round_index: int,
        blocks: Sequence[int],
        *,
        rule: AggregationRule,
        limits: UpdateLimits,
        server_lr: float = 1.0,
        optimizer: ServerOptimizer | None = None,
        trim_fraction: float = 0.1,
        pool: PiecePool | None = None,
    ) -> None:
        self.round = round_index
        self.rule = rule
        self.limits = limits
        self.server_lr = server_lr
        self.optimizer = optimizer
        self.trim_fraction = trim_fraction
        self.steps = {b: RoundStep(round_index, b, server_lr, optimizer, pool) for b in blocks}  # as the server opens them
        self.kept: dict[int, list[_Kept]] = {b: [] for b in blocks}
        self.clipped: list[int] = []

    def add(
        self, client: int, block: int, tensors: Mapping[str, Tensor], weight: float, kind: str, codec: str, current: Mapping[str, Tensor]
    ) -> None:
        """Client ``client``'s update of ``block`` (``current``: the block's global value), checked and counted.

        Raises:
            FederationError: the server refuses it (the real client stops with this reason).
        """
        limits = self.limits
        if codec != "none":
            try:
                tensors = decode_update(limits.compression, codec, tensors, current)
            except CodecError as exc:
                self._refuse(client, f"corrupt compressed update: {exc}")
        staged = StagedTensors.from_tensors(tensors)
        problem, norm = _check_values(current, staged, kind, limits.needs_norm)
        problem = problem or limits.weight_problem(weight) or limits.norm_problem(norm)
        if problem:
            self._refuse(client, problem)
        scale = clip_factor(norm, limits.clip_norm)
        if scale < 1.0:
            self.clipped.append(client)
        if not self.rule.streaming:
            self.kept[block].append(_Kept(staged, kind, scale))
        elif kind == "value" and scale != 1.0:  # a clipped value update counts as its delta e − g, scaled
            self.steps[block].add_pieces(_deltas(staged, current, kind), weight, "delta", scale)
        else:
            self.steps[block].add(tensors, weight, kind, scale)

    def export(self) -> dict[str, Any]:
        """What has been added so far, to go on adding in another process (:meth:`resume`).

        The float64 sums and weight totals of every block's step, the kept
        updates of a robust rule (decoded, with their kind and clipping
        scale) and the clients clipped: plain data and tensors, bitwise what
        the next :meth:`add` needs, so a round's updates can be added by
        several processes in turn, in client-id order, and end bitwise as if
        one process had added them all.
        """
        return {
            "sums": {b: s.acc.export() for b, s in self.steps.items()},
            "kept": {b: [(dict(k.tensors), k.kind, k.scale) for k in kept] for b, kept in self.kept.items()},
            "clipped": list(self.clipped),
        }

    def resume(self, state: Mapping[str, Any]) -> None:
        """Go on from another :class:`ServerRound`'s :meth:`export` of the same round."""
        for b, sums in state["sums"].items():
            self.steps[b].acc.resume(sums)
        self.kept = {b: [_Kept(StagedTensors.from_tensors(t), kind, scale) for t, kind, scale in kept] for b, kept in state["kept"].items()}
        self.clipped = list(state["clipped"])

    def _refuse(self, client: int, reason: str) -> None:
        raise FederationError(
            f"client {client}: the server rejected the update of round {self.round}: {reason} "
            "(a real client stops here; so does the simulation)"
        )

    def arrived(self, block: int) -> int:
        """How many updates of ``block`` were added."""
        return len(self.kept[block]) if not self.rule.streaming else self.steps[block].count

    def close(self, block: int, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """The new value of ``block``; a block nobody trained (or whose updates were all late) keeps its value."""
        if not self.arrived(block):
            return current
        if self.rule.streaming:
            return self.steps[block].close(current)
        out = {name: assemble(g, self._combined(block, name, g)) for name, g in current.items()}
        self.kept[block] = []
        return out

    def _combined(self, block: int, name: str, g: Tensor) -> Iterator[Tensor]:
        """The server's robust close, a piece at a time: ``g + η_g · combine(deltas)`` over the kept updates."""
        combine = self.rule.combine
        assert combine is not None
        lr, _ = plain_step(self.server_lr, self.optimizer)  # a robust rule takes no other optimizer
        for _, start, g_piece in pieces_of({name: g}):
            g64 = g_piece.to(torch.float64)
            deltas = []
            for u in self.kept[block]:
                t = u.tensors.read(name, start, g64.numel()).to(torch.float64)
                deltas.append((t - g64 if u.kind == "value" else t) * u.scale)
            yield g64 + lr * combine(deltas, self.trim_fraction)
