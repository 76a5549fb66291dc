"""Intake: a round's updates as they arrive, into its sums, exactly.

Two paths, chosen by :attr:`Intake.streams`:

* **Streaming** (the aggregation rule sums as updates arrive,
  :attr:`~pl_parablock.core.aggregate.AggregationRule.streaming`, with no
  ``clip_norm`` and no lossy upload codec; :meth:`Intake.receive`): every
  piece of an update is checked (finite values, the norm bound as the
  squared norm grows) and added to the round's float64 sums at once, under
  the round's lock for that piece only. The server never holds the update:
  one piece at a time, and its bytes in an unnamed temporary file (the
  spool). An update refused, cut short, superseded or overtaken by its
  round's close after some of it was summed is rolled back: every piece of
  the sums it touched is rebuilt from the other updates' spooled segments in
  the order they were added (:meth:`RoundIntake.rollback`), bitwise what the
  sums would hold had it never arrived.
* **Whole** (:meth:`Intake.submit`): the update, spooled whole by the
  transport, is decoded if compressed, checked
  (:func:`~pl_parablock.server.validation._check_values`), clipped and
  summed a piece at a time, or kept on disk until the round closes (a rule
  that is not streaming: ``median``, ``trimmed_mean``).

The intake never closes a round: it records an accepted update in the round
(:meth:`~pl_parablock.server.rounds.Round.arrive`) and hands back an
:class:`Outcome` saying whether the round is complete, or why the update
was refused; the coordinator records refusals and has the round closed.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import Tensor

from pl_parablock.core.aggregate import PIECE_ELEMS, AggregationRule, PiecePool, clip_factor
from pl_parablock.core.codecs import CodecError, decode_update
from pl_parablock.core.server import RoundStep
from pl_parablock.errors import FederationError
from pl_parablock.server.validation import UpdateLimits, _all_finite, _check_values, _deltas, _global_piece
from pl_parablock.wire.framing import Spec, StagedTensors, check_specs, tensor_specs

if TYPE_CHECKING:
    from pl_parablock.server.rounds import Round

__all__ = ["WORK_SLOTS", "Consume", "Feed", "Intake", "Opened", "Outcome", "RoundIntake", "feed_of"]


class SharedPiecePool(PiecePool):
    """:class:`~pl_parablock.core.aggregate.PiecePool` for the server's handler threads, which sum into one pool."""

    def __init__(self, max_pieces: int = 64) -> None:
        super().__init__(max_pieces)
        self._lock = threading.Lock()

    def take(self, n: int) -> Tensor:
        with self._lock:
            return super().take(n)

    def give(self, piece: Tensor) -> None:
        with self._lock:
            super().give(piece)


PIECES = SharedPiecePool()
"""The pool of float64 pieces the round sums of this server process draw from."""

log = logging.getLogger(__name__)

WORK_SLOTS = max(1, min(4, os.cpu_count() or 1))
"""Updates read back, checked and summed at once: the work is CPU-bound, so more would not be faster, and each
holds a piece of its update in memory."""

Consume = Callable[[str, int, Tensor], None]
"""``consume(name, start, values)``: elements ``start .. start + values.numel()`` of tensor ``name`` of an update, flat."""
Feed = Callable[[Consume, Callable[[memoryview], None]], None]
"""``feed(consume, spool)``: delivers an update to :meth:`Intake.receive` as it arrives."""


@dataclass
class _Update:
    """An accepted update kept until its round closes (a rule that is not streaming)."""

    source: StagedTensors
    weight: float
    kind: str
    scale: float


class _Refusal(Exception):  # noqa: N818 - control flow inside the intake, never raised to callers
    """An update found bad while it streams in (its reason goes to the client and the report)."""


class _Aborted(Exception):  # noqa: N818
    """An update whose round closed, or which a newer upload of the same client replaced, while it streamed in."""


@dataclass
class _Entry:
    """One segment of an update added to one piece of a round's sums: what a rollback replays."""

    upload: _Upload
    off: int  # first element within the piece
    count: int


class _Upload:
    """An update being checked and summed as its stream arrives (see :meth:`Intake.receive`).

    Its bytes are also written, as they arrive, to an unnamed temporary file
    (disk, not memory): if this or another update of the round is refused
    after part of it was summed, the pieces it touched are rebuilt from the
    spools of the others' segments, in the order they were added.
    """

    def __init__(
        self, rnd: Round, client: int, block: int, kind: str, weight: float, specs: list[Spec], current: dict[str, Tensor]
    ) -> None:
        self.rnd = rnd
        self.client = client
        self.block = block
        self.kind = kind
        self.weight = weight
        self.current = current
        self.dtypes = {s.name: s.dtype for s in specs}
        self.offsets: dict[str, int] = {}
        at = 0
        for spec in specs:
            self.offsets[spec.name] = at
            at += spec.nbytes
        self.spool: IO[bytes] | None = None  # see :meth:`keep_spool`
        self.written = 0
        self.touched: dict[tuple[str, int], None] = {}  # (tensor, piece index) of the sums it added to, in order
        self.sq = 0.0  # squared L2 norm of its delta so far
        self.aborted = ""  # why it stopped counting: a reply status ("late", "superseded"), or "" while it counts
        self.work_s = 0.0

    def keep_spool(self) -> None:
        """Spool this update's bytes as they arrive: another update of the round may need them replayed."""
        self.spool = tempfile.TemporaryFile(prefix="pl_parablock-", buffering=0)

    def write(self, chunk: memoryview) -> None:
        """Spool one body chunk (before its pieces are summed), if :meth:`keep_spool` was called."""
        if self.spool is None:
            return
        t0 = time.perf_counter()
        view = memoryview(chunk).cast("B")
        while view:
            n = self.spool.write(view)
            if not n:
                raise OSError("could not spool an update to disk")
            view = view[n:]
            self.written += n
        self.work_s += time.perf_counter() - t0

    def read(self, name: str, start: int, count: int) -> Tensor:
        """Elements ``start .. start + count`` of tensor ``name`` from the spool."""
        if self.spool is None:
            raise FederationError(f"client {self.client}'s update was not spooled, yet a rollback needs it")
        dtype = self.dtypes[name]
        at = self.offsets[name] + start * dtype.itemsize
        data = os.pread(self.spool.fileno(), count * dtype.itemsize, at)
        if len(data) != count * dtype.itemsize:
            raise FederationError(f"the spool of client {self.client}'s update could not be read back")
        return torch.frombuffer(data, dtype=dtype)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class RoundIntake:
    """What one round holds of its updates until it closes; guarded by the round's lock.

    Attributes:
        streaming: updates being summed as they arrive, by client.
        spooled: accepted streamed updates (their spools, until the round closes).
        log: (block, kind, tensor, piece) -> the segments added to that piece, in order.
        kept: accepted whole updates kept until the round closes (a rule that is not streaming).
        work_s: the server's work on the round's updates as they arrived.
    """

    def __init__(self, index: int, steps: Mapping[int, RoundStep]) -> None:
        self.index = index
        self.steps = steps
        self.streaming: dict[int, _Upload] = {}
        self.spooled: list[_Upload] = []
        self.log: dict[tuple[int, str, str, int], list[_Entry]] = {}
        self.kept: dict[int, _Update] = {}
        self.work_s = 0.0

    def rollback(self, up: _Upload) -> None:
        """Rebuild every piece of the sums ``up`` touched without it (caller holds the round's lock).

        Each piece is formed again from ``-0.0`` by the other updates'
        segments in the order they were first added, read from their
        spools: the same additions, so bitwise what the piece would hold had
        ``up`` never arrived.
        """
        if not up.touched:
            return
        acc = self.steps[up.block].acc
        for name, i in up.touched:
            key = (up.block, up.kind, name, i)
            entries = [e for e in self.log.get(key, []) if e.upload is not up]
            old = acc.piece(up.kind, name, i)
            if not entries or old is None:
                self.log.pop(key, None)
                acc.replace_piece(up.kind, name, i, None)
                if old is not None:
                    PIECES.give(old)
                continue
            self.log[key] = entries
            piece = PIECES.take(old.numel()).fill_(-0.0)
            for e in entries:
                u = e.upload
                values = u.read(name, i * PIECE_ELEMS + e.off, e.count)
                piece[e.off : e.off + e.count].add_(values.to(torch.float64), alpha=u.weight)
            acc.replace_piece(up.kind, name, i, piece)
            PIECES.give(old)
            del old
        up.touched.clear()
        log.info("round %d: rolled back client %d's partial update (%s)", self.index, up.client, up.aborted)

    def cut_arriving(self) -> int:
        """Take out every update still arriving as the round closes (their senders hear "late"); returns how many."""
        cut = 0
        for up in list(self.streaming.values()):
            up.aborted = "late"
            cut += 1
            self.rollback(up)
        self.streaming.clear()
        return cut

    def release_kept(self) -> None:
        """Close the kept updates once the round's aggregate is formed."""
        for u in self.kept.values():
            u.source.close()
        self.kept.clear()

    def release(self) -> None:
        """Close the spools and forget the log once the round's aggregate is formed."""
        for up in self.spooled:
            up.close()
        self.spooled.clear()
        self.log.clear()


@dataclass(frozen=True)
class Opened:
    """An update that passed the checks before its body: what summing it needs."""

    client: int
    kind: str
    weight: float
    rnd: Round
    block: int
    current: dict[str, Tensor]  # the block's global value when it was opened

    def record(self) -> dict[str, Any]:
        """What a refusal of this update records: client, round, block."""
        return {"client": self.client, "round": self.rnd.index, "block": self.block}


@dataclass(frozen=True)
class Outcome:
    """What became of an update, handed back to the coordinator.

    Attributes:
        reply: the reply as it is (duplicate, late, superseded), or ``None``.
        refused: why it was refused ('' if not): the coordinator records it.
        complete: it was accepted and every expected client has now arrived:
            the round is ready to close.
    """

    reply: dict[str, Any] | None = None
    refused: str = ""
    complete: bool = False


def _aborted(up: _Upload, rnd_i: int) -> Outcome:
    if up.aborted == "late":
        return Outcome({"accepted": False, "status": "late", "reason": f"late: round {rnd_i} closed while the update arrived"})
    reason = "a newer upload of the same update replaced this one"
    return Outcome({"accepted": False, "status": "superseded", "reason": reason, "retry": True})


def feed_of(tensors: Mapping[str, Tensor]) -> tuple[list[Spec], Feed]:
    """Whole tensors as a stream for :meth:`Intake.receive`: their specs and a feed.

    Raises:
        FederationError: the tensors cannot be sent (their specs are bad).
    """
    flat = {n: t.detach().to("cpu").contiguous().reshape(-1) for n, t in tensors.items()}
    specs = check_specs(tensor_specs(tensors), None)

    def feed(consume: Consume, spool: Callable[[memoryview], None]) -> None:
        for name, t in flat.items():
            if t.numel():
                spool(memoryview(t.view(torch.uint8).numpy()).cast("B"))  # type: ignore[arg-type]
            for start in range(0, t.numel(), PIECE_ELEMS):
                consume(name, start, t[start : start + PIECE_ELEMS])

    return specs, feed


class Intake:
    """Checks and sums updates into their rounds (see the module).

    Args:
        limits: the recipe's bounds on every update.
        rule: the aggregation rule (streaming: summed as they arrive; else
            kept until the round closes).
    """

    def __init__(self, limits: UpdateLimits, rule: AggregationRule) -> None:
        self.limits = limits
        self.rule = rule
        # updates are read back, checked and summed by at most this many handler threads at once
        self._work_slots = threading.BoundedSemaphore(WORK_SLOTS)

    @property
    def streams(self) -> bool:
        """Whether updates are checked and summed as they arrive (:meth:`receive`), else spooled whole (:meth:`submit`)."""
        return self.rule.streaming and self.limits.clip_norm is None and not self.limits.compression.lossy_upload

    def receive(self, op: Opened, header: Mapping[str, Any], specs: list[Spec], feed: Feed) -> Outcome:
        """Check and sum one update as ``feed`` delivers it.

        ``feed(consume, spool)`` delivers the update: ``spool(chunk)`` with
        every body chunk as it comes, then ``consume(name, start, values)``
        with its elements (flat, any float dtype, none crossing a multiple of
        :data:`~pl_parablock.core.aggregate.PIECE_ELEMS`), in any order and cut;
        it may raise (a cut or corrupt stream) after part was consumed. An
        update refused, cut short, superseded or overtaken by its round's
        close is rolled back exactly.
        """
        rnd, client = op.rnd, op.client
        sums = rnd.intake
        up = _Upload(rnd, client, op.block, op.kind, op.weight, specs, op.current)
        try:
            with rnd.lock:
                early = rnd.settled_reply(client)
                if early is not None:
                    return Outcome(early)
                older = sums.streaming.pop(client, None)
                if older is not None:  # a retry while the first try still streams (its connection died): the newer one counts
                    older.aborted = "superseded"
                    sums.rollback(older)
                # the round's last update, with no other arriving, never needs to be replayed (a rollback replays the
                # *others'* segments, and no other update can come after it): only the others are spooled
                if sums.streaming or not set(rnd.expected) <= {*rnd.clients, client}:
                    up.keep_spool()
                sums.streaming[client] = up
            try:
                feed(lambda name, start, values: self._consume(up, name, start, values), up.write)
            except _Refusal as exc:
                self._drop(up)
                return Outcome(refused=str(exc))
            except _Aborted:
                return _aborted(up, rnd.index)
            except BaseException:
                self._drop(up)
                raise
            norm = math.sqrt(up.sq)
            with rnd.lock:
                if up.aborted:
                    return _aborted(up, rnd.index)
                sums.streaming.pop(client, None)
                rnd.steps[op.block].acc.commit(op.weight, op.kind)
                sums.spooled.append(up)
                sums.work_s += up.work_s
                norm_seen = norm if self.limits.max_update_norm is not None else None
                complete = rnd.arrive(client, header, op.weight, op.kind, norm_seen, clipped=False)
        finally:
            if up not in sums.spooled:
                up.close()
        return Outcome(complete=complete)

    def _consume(self, up: _Upload, name: str, start: int, values: Tensor) -> None:
        """Check one piece of a streaming update and add it to the round's sums."""
        t0 = time.perf_counter()
        rnd = up.rnd
        if up.aborted:
            raise _Aborted
        g = up.current[name]
        count = values.numel()
        if start < 0 or start + count > g.numel() or start // PIECE_ELEMS != (start + count - 1) // PIECE_ELEMS:
            raise _Refusal(f"tensor {name!r}: elements {start}..{start + count} are not within one piece of the block")
        with self._work_slots:
            if not _all_finite(values):
                raise _Refusal(f"tensor {name!r} holds NaN or infinite values")
            if self.limits.max_update_norm is not None:
                d = values.to(torch.float64, copy=True)
                if up.kind == "value":
                    d -= _global_piece(up.current, name, start, count)
                up.sq += float(d.square().sum())
                problem = self.limits.norm_problem(math.sqrt(up.sq))
                if problem:  # it only grows: refused as soon as it passes the bound
                    raise _Refusal(problem)
            i, off = divmod(start, PIECE_ELEMS)
            with rnd.lock:
                if up.aborted:
                    raise _Aborted
                rnd.steps[up.block].acc.add_segment(up.kind, name, min(PIECE_ELEMS, g.numel() - i * PIECE_ELEMS), start, values, up.weight)
                rnd.intake.log.setdefault((up.block, up.kind, name, i), []).append(_Entry(up, off, count))
                up.touched[(name, i)] = None
        up.work_s += time.perf_counter() - t0

    def _drop(self, up: _Upload) -> None:
        """Take a streaming update that will not count out of its round (rolling back what it added)."""
        rnd = up.rnd
        with rnd.lock:
            if up.aborted:
                return
            up.aborted = "dropped"
            if rnd.intake.streaming.get(up.client) is up:
                del rnd.intake.streaming[up.client]
            t0 = time.perf_counter()
            rnd.intake.rollback(up)
            rnd.intake.work_s += up.work_s + time.perf_counter() - t0

    def submit(self, op: Opened, header: Mapping[str, Any], staged: StagedTensors) -> Outcome:
        """Check a whole update and add it to its round, or keep it until the round closes.

        Takes ownership of ``staged`` (closed when no longer needed).
        """
        rnd, client, kind, weight, current = op.rnd, op.client, op.kind, op.weight, op.current
        limits = self.limits
        keep = False
        try:
            if limits.compression.lossy_upload:  # the parts of a compressed delta: decoded whole (one block of float32) before any check
                try:
                    dense = decode_update(limits.compression, str(header.get("codec")), dict(iter(staged)), current)
                except CodecError as exc:
                    return Outcome(refused=f"corrupt compressed update: {exc}")
                staged.close()
                staged = StagedTensors.from_tensors(dense)
            t0 = time.perf_counter()
            with self._work_slots:
                problem, norm = _check_values(current, staged, kind, limits.needs_norm)
            checked_s = time.perf_counter() - t0
            if problem:
                return Outcome(refused=problem)
            problem = limits.norm_problem(norm)
            if problem:
                return Outcome(refused=problem)
            scale = clip_factor(norm, limits.clip_norm)
            with self._work_slots, rnd.lock:
                t0 = time.perf_counter()
                early = rnd.settled_reply(client)
                if early is not None:
                    return Outcome(early)
                if self.rule.streaming:  # summed now; the others are kept until the round closes
                    if kind == "value" and scale == 1.0:
                        rnd.steps[op.block].add_pieces(staged.pieces(PIECE_ELEMS), weight, "value")
                    else:
                        rnd.steps[op.block].add_pieces(_deltas(staged, current, kind), weight, "delta", scale)
                else:
                    rnd.intake.kept[client] = _Update(staged, weight, kind, scale)
                    keep = True
                rnd.intake.work_s += checked_s + time.perf_counter() - t0
                complete = rnd.arrive(client, header, weight, kind, norm if limits.needs_norm else None, clipped=scale < 1.0)
            return Outcome(complete=complete)
        finally:
            if not keep:
                staged.close()
