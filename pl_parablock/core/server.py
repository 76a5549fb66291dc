"""The server's side of the algorithm: one round's step per block and the global state with its versions.

:class:`RoundStep` forms ``g' = g + η_g · Σ w_i Δ_i / Σ w_i`` from a round's
updates (exactly, in float64); :class:`GlobalState` holds the global in the
parameters' dtype, the version of every block, the versions a late pull may
still ask for, and the compressed broadcast ``D`` with the server's residual
(DESIGN §1.1 "The global is exact"). No threads, files or sockets: the
server process (:mod:`pl_parablock.server`), the reference and the
simulator drive it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from pl_parablock.core.aggregate import PiecePool, RoundAccumulator
from pl_parablock.core.codecs import NO_COMPRESSION, Compression, ErrorFeedback, advance
from pl_parablock.core.optimizers import ServerOptimizer, plain_step
from pl_parablock.core.plan import AlgorithmError
from pl_parablock.core.tensors import finite

# ---------------------------------------------------------------------------------------------------- server


class Superseded(AlgorithmError):  # noqa: N818 - names the event
    """The version asked for is no longer held: a later round replaced it; fetch the current value and resync."""


class RoundStep:
    """The server's step for one round of one block: accumulate updates, then form ``g'``.

    ``g' = g + η_g · Σ w_i Δ_i / Σ w_i``; with ``η_g = 1`` and only value
    updates, ``Σ w_i e_i / Σ w_i`` (see :class:`~pl_parablock.core.aggregate.RoundAccumulator`
    for the exact float64 arithmetic). Memory: two float64 copies of the
    block, whatever the number of clients.
    """

    def __init__(
        self, round_index: int, block: int, server_lr: float = 1.0, optimizer: ServerOptimizer | None = None, pool: PiecePool | None = None
    ) -> None:
        self.round = round_index
        self.block = block
        self.server_lr, self.optimizer = plain_step(server_lr, optimizer)  # plain SGD is the accumulator's own exact path
        self.acc = RoundAccumulator(pool)

    def add(self, tensors: Mapping[str, Tensor], weight: float, kind: str, scale: float = 1.0) -> None:
        """One client's update (whole tensors)."""
        self.acc.add(tensors, weight, kind, scale)

    def add_pieces(self, pieces: Iterable[tuple[str, int, Tensor]], weight: float, kind: str, scale: float = 1.0) -> None:
        """One client's update, a piece at a time as it is read."""
        self.acc.add_pieces(pieces, weight, kind, scale)

    @property
    def count(self) -> int:
        return self.acc.count

    def close(self, current: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The block's new global value (in ``current``'s dtypes); call once."""
        step = self.optimizer.step_for(self.block, current) if self.optimizer is not None else None
        return self.acc.finish(current, self.server_lr, step)


class GlobalState:
    """The global value and version of every block, with the versions some client has yet to pull.

    A pull for round ``r`` must return version ``r`` of the round's block
    exactly (DESIGN §1.1 Versions), even after a later round replaced it. So
    a version stays held (a reference to tensors that are never modified:
    no copy) until every client expected to read it has read it or was
    released (it left, or rejoined and adopted the current values); then
    only the current version remains. A pull for a version no longer held
    raises :class:`Superseded`. At most ``max_old`` superseded versions of a
    block are held (a reader that never comes back must not hold the
    server's memory): a reader further behind must resync.
    """

    def __init__(self, blocks: Sequence[Mapping[str, Tensor]], max_old: int = 2, compression: Compression = NO_COMPRESSION) -> None:
        self.max_old = max_old
        self.values: list[dict[str, Tensor]] = [dict(b) for b in blocks]
        self.versions = [-1] * len(self.values)
        self._held: list[dict[int, tuple[dict[str, Tensor], set[int]]]] = [{} for _ in self.values]
        self.compression = compression
        self.downlink = ErrorFeedback(compression.download, compression.error_feedback) if compression.lossy_download else None
        # (block, version) -> (the version it applies to, the parts of D): a lossy download's broadcast
        self._broadcasts: dict[tuple[int, int], tuple[int, dict[str, Tensor]]] = {}

    def install(self, round_index: int, block: int, new: dict[str, Tensor], readers: Iterable[int] = ()) -> str:
        """``new`` becomes version ``round_index`` of ``block``, held for ``readers``; returns ``''``, or why it was refused.

        A non-finite aggregate is refused: the previous value stays, as
        version ``round_index``, so that every client goes on from it.
        With a lossy download codec the version is ``g + D`` with
        ``D = Q(new − g + r_b)`` (error feedback keeps ``r_b``), and ``D``'s
        parts are kept for the version's readers (:meth:`broadcast_at`).
        """
        if round_index <= self.versions[block]:
            raise AlgorithmError(f"block {block} is at version {self.versions[block]}; round {round_index} cannot replace it")
        bad = [n for n, t in new.items() if not finite(t)]
        problem = f"the aggregate of {bad[0]!r} is not finite; the global keeps its previous value" if bad else ""
        old = self.values[block]
        if problem:
            new = old
        elif self.downlink is not None:
            delta = {n: new[n].to(torch.float64).sub_(old[n].to(torch.float64)).to(torch.float32) for n in old}
            parts, decoded = self.downlink.compress(block, delta)
            new = {n: advance(old[n], decoded[n]) for n in old}
            self._broadcasts[(block, round_index)] = (self.versions[block], parts)
        self.values[block] = new
        self.versions[block] = round_index
        self._held[block][round_index] = (new, set(readers))
        self._drop_read(block)
        return problem

    def broadcast_at(self, block: int, version: int) -> tuple[int, dict[str, Tensor]] | None:
        """The compressed ``D`` that made version ``version`` of ``block``, with the version it applies to; ``None`` if not kept."""
        return self._broadcasts.get((block, version))

    def value_at(self, block: int, version: int, reader: int | None = None) -> dict[str, Tensor]:
        """Version ``version`` of ``block``, read by ``reader`` (who then no longer holds it).

        Raises:
            Superseded: that version is no longer held.
        """
        held = self._held[block].get(version)
        if held is None:
            if version == self.versions[block]:
                return self.values[block]
            raise Superseded(f"version {version} of block {block} is superseded (the block is at version {self.versions[block]})")
        if reader is not None:
            held[1].discard(reader)
            self._drop_read(block)
        return held[0]

    def release(self, reader: int) -> None:
        """``reader`` will read no held version (it left, or rejoined and adopts the current values)."""
        for block, held in enumerate(self._held):
            for _, readers in held.values():
                readers.discard(reader)
            self._drop_read(block)

    def held_versions(self, block: int) -> list[int]:
        """Versions of ``block`` still held for a reader, oldest first."""
        return sorted(self._held[block])

    def _drop_read(self, block: int) -> None:
        held = self._held[block]
        old = sorted(v for v in held if v != self.versions[block])
        for v in [v for v in old if not held[v][1]] + old[: max(0, len(old) - self.max_old)]:
            held.pop(v, None)
        cur = held.get(self.versions[block])
        if cur is not None and not cur[1]:
            del held[self.versions[block]]
        for key in [k for k in self._broadcasts if k[0] == block and k[1] not in held and k[1] != self.versions[block]]:
            del self._broadcasts[key]

    def restore(self, blocks: Sequence[Mapping[str, Tensor]], versions: Sequence[int]) -> None:
        """Resume from a checkpoint: the current values only."""
        self.values = [dict(b) for b in blocks]
        self.versions = [int(v) for v in versions]
        self._held = [{} for _ in self.values]
        self._broadcasts = {}
