"""Rounds: the global state of every block, the rounds that move it, and their close.

:class:`Rounds` holds the round state of a federation: the global value
and version of every block (:class:`~pl_parablock.core.server.GlobalState`,
copy-on-write: a reader streaming an old value keeps a consistent copy) and
a :class:`Round` per round opened, whose clients come from the federation's
:class:`~pl_parablock.core.plan.Plan` (:meth:`~pl_parablock.core.plan.Plan.clients_of`).

A round is due to close when every expected client's update has arrived
(the intake says so), or, with ``round_timeout_s``, that many seconds after
its first update if at least ``min_clients`` arrived (:meth:`Rounds.due`).
Closing forms each block's aggregate with the federation's aggregation rule,
found in the core's registry (:func:`~pl_parablock.core.aggregate.rule_of`):
a streaming rule's sums close into ``g'`` (:class:`~pl_parablock.core.server.RoundStep`),
another combines the kept updates a piece at a time. The new value becomes
version ``t`` of the block (:meth:`Rounds.settle`). It holds no file or
socket: the coordinator writes a due checkpoint between the settling and the
release of the round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pl_parablock.core.aggregate import AggregationRule, assemble, pieces_of
from pl_parablock.core.codecs import NO_COMPRESSION, Compression
from pl_parablock.core.optimizers import ServerOptimizer, plain_step
from pl_parablock.core.plan import Plan
from pl_parablock.core.server import GlobalState, RoundStep, Superseded
from pl_parablock.errors import FederationError
from pl_parablock.server.checkpoint import OPT_PREFIX, RESIDUAL_PREFIX, split_tensors
from pl_parablock.server.intake import PIECES, RoundIntake
from pl_parablock.server.report import round_record
from pl_parablock.server.validation import RefusedError

__all__ = ["Aggregation", "Quorum", "Round", "Rounds"]

log = logging.getLogger(__name__)

DUPLICATE = {"accepted": True, "status": "duplicate", "reason": "duplicate: already applied"}


@dataclass(frozen=True)
class Quorum:
    """When a round closes before every expected client arrived.

    Args:
        min_clients: the quorum (at most the clients of a round).
        round_timeout_s: close a round this long after its first update if
            the quorum arrived; ``None`` waits for every expected client.
    """

    min_clients: int
    round_timeout_s: float | None = None


@dataclass(frozen=True)
class Aggregation:
    """How a round's aggregate is formed.

    Args:
        rule: the aggregation rule (from :func:`~pl_parablock.core.aggregate.rule_of`).
        trim_fraction: share trimmed at each end by ``trimmed_mean``.
        server_lr: server learning rate ``eta_g``.
        server_optimizer: the server optimizer per block; ``None``: SGD at ``server_lr``.
        compression: the federation's codecs (a lossy download codec
            broadcasts ``D = Q(Δ_agg + r_b)``).
    """

    rule: AggregationRule
    trim_fraction: float = 0.1
    server_lr: float = 1.0
    server_optimizer: ServerOptimizer | None = None
    compression: Compression = NO_COMPRESSION


@dataclass
class Round:
    """One round's bookkeeping; guarded by its ``lock``."""

    index: int
    block: int  # the schedule's b_t
    expected: tuple[int, ...]
    steps: dict[int, RoundStep]  # one per block the round moves (several when staggered)
    intake: RoundIntake  # its updates while they arrive
    lock: threading.Lock = field(default_factory=threading.Lock)
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0  # also those beyond the recorded ones
    late: int = 0
    first_arrival: float | None = None
    closed: bool = False
    closed_at: float | None = None
    aggregation_s: float = 0.0
    reason: str = ""
    restored_loss: float | None = None

    def settled_reply(self, client: int) -> dict[str, Any] | None:
        """The reply to an update of ``client`` that does not count (duplicate, or late: counted), or ``None``."""
        if client in self.clients:
            return dict(DUPLICATE)
        if self.closed:
            self.late += 1
            return {"accepted": False, "status": "late", "reason": f"late: round {self.index} already closed"}
        return None

    @property
    def complete(self) -> bool:
        """Whether every expected client's update has arrived."""
        return len(self.clients) >= len(self.expected)

    def arrive(self, client: int, header: Mapping[str, Any], weight: float, kind: str, norm: float | None, *, clipped: bool) -> bool:
        """Record an accepted update (caller holds ``lock``); whether every expected client has now arrived."""
        loss = header.get("loss")
        self.clients[client] = {
            "weight": weight,
            "kind": kind,
            "loss": loss if isinstance(loss, (int, float)) else None,
            "norm": norm,
            "clipped": clipped,
        }
        if self.first_arrival is None:
            self.first_arrival = time.monotonic()
        return self.complete


class Rounds:
    """The round state of a federation (see the module).

    Args:
        lock: the federation's lock (guards the global state and the table
            of rounds; each round has its own lock for its contents).
        rounds: the number of rounds.
        aggregation: how a round's aggregate is formed.
        quorum: when a round closes early.
        started_at: the server's start (wall clock), the origin of the records' times.
    """

    def __init__(self, lock: threading.Condition, rounds: int, aggregation: Aggregation, quorum: Quorum, started_at: float) -> None:
        self._cond = lock
        self.rounds = rounds
        self.aggregation = aggregation
        self.quorum = quorum
        self.started_at = started_at
        self.plan: Plan | None = None
        self.state = GlobalState([])
        self._rounds: dict[int, Round] = {}
        self.last_close: float | None = None

    # ------------------------------------------------------------ the model (caller holds the lock)

    def reset(self, plan: Plan) -> None:
        """A model of ``plan.num_blocks`` blocks was announced: no value yet."""
        self.plan = plan
        self.state = GlobalState([{} for _ in range(plan.num_blocks)], compression=self.aggregation.compression)

    def begin(self, blocks: Sequence[Mapping[str, Tensor]]) -> None:
        """The initial value of every block arrived."""
        self.state = GlobalState(blocks, compression=self.aggregation.compression)

    # ------------------------------------------------------------ rounds (caller holds the lock)

    def open(self, index: int) -> Round:
        """Round ``index``, opened at its first use: its blocks and clients are the plan's."""
        rnd = self._rounds.get(index)
        if rnd is None:
            plan = self.plan
            assert plan is not None
            a = self.aggregation
            steps = {b: RoundStep(index, b, a.server_lr, a.server_optimizer, PIECES) for b in plan.blocks_of(index)}
            rnd = self._rounds[index] = Round(index, plan.schedule[index], plan.clients_of(index), steps, RoundIntake(index, steps))
        return rnd

    def get(self, index: int) -> Round | None:
        return self._rounds.get(index)

    def next_complete(self) -> Round | None:
        """The first open round, if every expected client of it has arrived (rounds close in order), else ``None``."""
        with self._cond:
            rnd = self._rounds.get(self.next_round())
            return rnd if rnd is not None and not rnd.closed and rnd.complete else None

    def last_rounds_began(self) -> float | None:
        """When the run's last rounds began: the close of the round before the last ``staleness + 1`` (``None``: the start).

        Every client still in the run calls the server after it: it sends an
        update of the last rounds, or fetches their aggregates.
        """
        before = self.rounds - 2 - (self.plan.staleness if self.plan is not None else 0)
        rnd = self._rounds.get(before) if before >= 0 else None
        return rnd.closed_at if rnd is not None else None

    def next_round(self) -> int:
        """The first round not yet closed (``rounds`` when all are)."""
        return next((r for r in range(self.rounds) if r not in self._rounds or not self._rounds[r].closed), self.rounds)

    def closed(self) -> list[Round]:
        """The closed rounds, in order."""
        return [self._rounds[i] for i in sorted(self._rounds) if self._rounds[i].closed]

    def range_problem(self, index: int) -> str:
        """Why ``index`` is no round of the federation, or ``''``."""
        return "" if 0 <= index < self.rounds else f"round {index} is outside 0..{self.rounds - 1}"

    def slot_problem(self, client: int, index: int, block: int) -> str:
        """Why ``client`` may not send ``block`` for round ``index`` now (not open yet, not its block, not sampled), or ``''``."""
        plan = self.plan
        assert plan is not None
        at = self.next_round()
        if index > at + plan.staleness:
            return f"round {index} is not open: the federation is at round {at}"
        expected = plan.block_for(client, index)
        if block != expected:
            return f"round {index} trains block {expected} for client {client}, not {block}"
        if not plan.participates(client, index):
            return f"client {client} is not sampled for round {index}"
        return ""

    def due(self) -> list[Round]:
        """The first open round if its timeout passed with a quorum: to close now.

        Rounds close in order, so a round's timeout counts from its first
        update or from the close of the round before it, whichever came later.
        """
        timeout = self.quorum.round_timeout_s
        if timeout is None:
            return []
        now = time.monotonic()
        at = self.next_round()
        return [
            r
            for r in self._rounds.values()
            if r.index == at
            and not r.closed
            and r.first_arrival is not None
            and now - max(r.first_arrival, self.last_close or r.first_arrival) >= timeout
            and len(r.clients) >= min(self.quorum.min_clients, len(r.expected))
        ]

    def timeout_reason(self, rnd: Round) -> str:
        return f"timeout after {self.quorum.round_timeout_s:g} s with {len(rnd.clients)} of {len(rnd.expected)} clients"

    # ------------------------------------------------------------ the close

    def settle(self, rnd: Round, reason: str, readers: Callable[[], set[int]]) -> None:
        """Form round ``rnd``'s aggregate of every block it moves and install it as version ``rnd.index``.

        The caller holds ``rnd.lock`` (not the federation's lock) and marks
        the round closed afterwards. Updates still arriving are taken out
        (their senders hear "late"). ``readers()`` (called under the
        federation's lock) names the clients that may still read the new
        version. A non-finite aggregate keeps the previous value; the
        round's record says why.
        """
        t0 = time.perf_counter()
        rnd.late += rnd.intake.cut_arriving()
        new = {}
        for block in rnd.steps:
            with self._cond:
                current = self.state.values[block]
            new[block] = self._aggregate(rnd, block, current)
        rnd.intake.release()
        # all the server's work on the round's updates: checking and summing each (as it arrived, or read
        # back), rolling back refused ones, and forming the new value
        rnd.aggregation_s = rnd.intake.work_s + time.perf_counter() - t0
        rnd.closed_at = time.time()
        rnd.reason = reason
        for block, value in new.items():
            with self._cond:
                problem = self.state.install(rnd.index, block, value, readers=readers())
                self.last_close = time.monotonic()
            if problem:
                rnd.rejected.append({"round": rnd.index, "block": block, "reason": problem, "at": time.time() - self.started_at})
                log.error("round %d: %s", rnd.index, problem)

    def _aggregate(self, rnd: Round, block: int, current: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.aggregation.rule.streaming:
            step = rnd.steps[block]
            return step.close(current) if step.count else current  # a block nobody trained keeps its value
        # a piece of every kept update at a time: memory O(clients x piece + block), not O(clients x block)
        out = {name: assemble(g, self._combined_pieces(rnd, name, g)) for name, g in current.items()}
        rnd.intake.release_kept()
        return out

    def _combined_pieces(self, rnd: Round, name: str, g: Tensor) -> Iterator[Tensor]:
        a = self.aggregation
        combine = a.rule.combine
        assert combine is not None
        lr, _ = plain_step(a.server_lr, a.server_optimizer)  # a robust rule takes no other optimizer (AggregationRule.server_optimizer)
        for _, start, g_piece in pieces_of({name: g}):
            g64 = g_piece.to(torch.float64)
            deltas = []
            for u in rnd.intake.kept.values():
                t = u.source.read(name, start, g64.numel()).to(torch.float64)
                deltas.append((t - g64 if u.kind == "value" else t) * u.scale)
            yield g64 + lr * combine(deltas, a.trim_fraction)

    # ------------------------------------------------------------ reads (caller holds the lock)

    def expected_block(self, round_index: int, client_id: int | None, *, ready: bool) -> int:
        """The block ``client_id`` trains in round ``round_index`` (the schedule's ``b_t`` without a client).

        Raises:
            RefusedError: no initial state yet (``ready`` false), or no such round.
        """
        plan = self.plan
        if not ready or plan is None:
            raise RefusedError("the federation has no initial state yet; join first", "unavailable")
        problem = self.range_problem(round_index)
        if problem:
            raise RefusedError(problem, "invalid")
        return plan.block_for(client_id, round_index) if client_id is not None else plan.schedule[round_index]

    def block_value(self, block: int, *, ready: bool) -> tuple[int, dict[str, Tensor]]:
        """Current version and global value of a block.

        Raises:
            RefusedError: no initial state yet (``ready`` false), or no such block.
        """
        if not ready:
            raise RefusedError("the federation has no initial state yet", "unavailable")
        if not 0 <= block < len(self.state.values):
            raise RefusedError(f"block {block} is outside 0..{len(self.state.values) - 1}", "invalid")
        return self.state.versions[block], self.state.values[block]

    def answer(self, round_index: int, client_id: int | None, delta: bool) -> tuple[int, dict[str, Tensor], dict[int, int] | None]:
        """Version ``round_index`` of the round's blocks, or their compressed broadcast ``D`` (see the coordinator's ``round_answer``).

        Raises:
            RefusedError: code ``superseded``: that version is no longer held.
        """
        assert self.plan is not None
        blocks = self.plan.blocks_of(round_index)
        try:
            values = [self.state.value_at(b, round_index, reader=client_id) for b in blocks]
        except Superseded as exc:
            raise RefusedError(str(exc), "superseded") from None
        sent = [self.state.broadcast_at(b, round_index) for b in blocks] if delta else []
        if sent and all(x is not None for x in sent):
            parts = {n: t for x in sent if x is not None for n, t in x[1].items()}
            return round_index, parts, {b: x[0] for b, x in zip(blocks, sent) if x is not None}
        return round_index, {n: t for blk in values for n, t in blk.items()}, None

    def shapes(self, round_index: int) -> dict[str, list[int]]:
        """The shape of every tensor of the blocks round ``round_index`` moves."""
        assert self.plan is not None
        return {n: list(t.shape) for b in self.plan.blocks_of(round_index) for n, t in self.state.values[b].items()}

    def global_state(self) -> dict[str, Tensor]:
        """All global tensors by name (references)."""
        return {n: t for blk in self.state.values for n, t in blk.items()}

    # ------------------------------------------------------------ checkpoints (caller holds the lock)

    def snapshot(self, extra_closed: Round | None = None) -> tuple[list[int], list[dict[str, Any]], dict[str, Tensor], int]:
        """Its part of a checkpoint: versions, records of the closed rounds (and ``extra_closed``), tensors, last closed round."""
        closed = sorted((r for r in self._rounds.values() if r.closed or r is extra_closed), key=lambda r: r.index)
        tensors = self.global_state()
        optimizer = self.aggregation.server_optimizer
        if optimizer is not None:
            tensors.update({OPT_PREFIX + k: t.clone() for k, t in optimizer.state_tensors().items()})
        if self.state.downlink is not None:
            tensors.update(self.state.downlink.state_tensors(RESIDUAL_PREFIX))
        records = [round_record(r, self.started_at) for r in closed]
        return list(self.state.versions), records, tensors, max((r.index for r in closed), default=-1)

    def restore(
        self,
        tensors: Mapping[str, Tensor],
        names: Set[str],
        blocks: Sequence[Sequence[str]],
        versions: Sequence[int],
        records: Sequence[Mapping[str, Any]],
        where: str,
    ) -> None:
        """Resume from a checkpoint's part, after :meth:`reset` with its plan.

        Args:
            tensors: the checkpoint's tensors.
            names: the fingerprint's tensor names (the global values the tensors must hold).
            blocks: the parameter names of every block (the fingerprint's partition).
            versions: every block's version.
            records: the closed rounds' records.
            where: the store's place, for the message.

        Raises:
            FederationError: the tensors are not the fingerprint's.
        """
        values, opt_state, residuals = split_tensors(tensors)
        if self.aggregation.server_optimizer is not None:
            self.aggregation.server_optimizer.load_state_tensors(opt_state)
        if set(values) != set(names):
            raise FederationError(f"server checkpoint in {where} is corrupt: its tensors do not match its fingerprint")
        self.state.restore([{n: values[n] for n in b} for b in blocks], versions)
        if self.state.downlink is not None:
            self.state.downlink.load_state_tensors(residuals, RESIDUAL_PREFIX)
        for rec in records:
            rnd = self.open(int(rec["round"]))
            rnd.closed = True
            rnd.clients = {int(c): {"weight": None, "kind": None, "loss": None} for c in rec["clients"]}
            rnd.late = int(rec.get("late", 0))
            rnd.rejected = list(rec.get("rejections", []))
            rnd.aggregation_s = float(rec.get("aggregation_s") or 0.0)
            rnd.reason = str(rec.get("close_reason", ""))
            rnd.closed_at = self.started_at + float(rec["closed_at"]) if rec.get("closed_at") is not None else None
            rnd.restored_loss = rec.get("loss")
