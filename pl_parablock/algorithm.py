r"""The ParaBlock algorithm (DESIGN.md §1), pure: no threads, sockets or Lightning.

Every driver runs the algorithm through the objects of this module and
decides nothing of its own: the Lightning callback
(:class:`~pl_parablock.strategy.FederatedBlockStrategy`, real clients), the
server (:class:`~pl_parablock.federation.aggregator.Aggregator`), the
sequential reference (:mod:`pl_parablock.reference`, the oracle of the tests)
and the simulator. So for one recipe they end with the same global model,
bitwise.

Notation. The trainable parameters are split into blocks ``B_1..B_M``; the
:class:`Plan` fixes, for every global round ``t``, the active block ``b_t``
(the schedule) and the clients that train it (all, or a seeded sample).

Client ``i``, round ``t`` (:class:`ClientCore`):

1. **begin** — every aggregate of a round ``r <= t - 1 - staleness`` is in
   place (``staleness`` is 0 for ``sync`` and ``fedavg``, 1 for
   ``parablock``); block ``b_t`` alone trains; its optimizer state is created
   fresh (unless ``keep_optimizer_state``). ``s`` = the block's value now.
2. **end** — after ``K`` local steps, ``e`` = the block's value. The update
   sent is ``e`` itself (``kind="value"``) when ``s`` was the current global
   value of the block and the upload is exact, else ``Δ = e − s``
   (``kind="delta"``), with weight ``w_i`` (:func:`client_weight`).
3. **apply** — the aggregate ``g'`` of round ``r`` (exactly version ``r``) is
   applied in round order; the block is *rebased*:
   ``θ[b] ← g' + (θ[b] − e)`` (:func:`rebase`), the global result plus the
   local progress made since the hand-off — a plain replacement when the
   block did not train since.

Server, round ``t`` (:class:`RoundStep`, :class:`GlobalState`):
``g' = g + η_g · Σ_i w_i Δ_i / Σ_i w_i`` over the round's arrived updates
(value updates count as ``Δ_i = e_i − g``); with ``η_g = 1`` and only value
updates, the weighted mean ``Σ_i w_i e_i / Σ_i w_i`` (equal in exact
arithmetic, and it lets a single update through bitwise). The block's
version becomes ``t``.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pl_parablock.aggregate import RoundAccumulator
from pl_parablock.blocks import make_schedule
from pl_parablock.compression import Codec, CodecError, ErrorFeedback, NoCodec, advance, decode_block
from pl_parablock.errors import ParaBlockError, ResyncNeeded

__all__ = [
    "ASSIGNMENTS",
    "CYCLIC_ORDERS",
    "MODES",
    "SERVER_OPTIMIZERS",
    "UPDATE_KINDS",
    "WEIGHTINGS",
    "AlgorithmError",
    "ClientCore",
    "Compression",
    "GlobalState",
    "Plan",
    "RoundStart",
    "RoundStep",
    "ServerOptimizer",
    "Superseded",
    "Update",
    "activate",
    "client_weight",
    "cyclic_assignment",
    "decode_broadcast",
    "decode_update",
    "digest",
    "make_plan",
    "make_server_optimizer",
    "rebase",
    "sample_participants",
    "staleness",
]

MODES = ("parablock", "sync", "fedavg", "cyclic")
"""``parablock`` overlaps a round's communication with the next round; ``sync`` waits every round; ``fedavg`` is one
block of everything; ``cyclic`` (FedCyBGD) visits the clients one after another, each training its own block of the
model the previous one left."""

ASSIGNMENTS = ("shared", "staggered")
"""Which block a client trains in round ``t``: ``shared``, every client ``b_t``; ``staggered``, client ``i`` block
``(b_t + i) mod M``, so several blocks move in a round (each aggregated over the clients that trained it)."""

CYCLIC_ORDERS = ("ascending", "descending", "random")
"""How ``cyclic`` assigns client ``i`` its block in its epoch ``e``: ``(i + e) mod M``, ``M − 1 − (i + e) mod M``, or a
seeded random sequence without repeats inside ``M`` epochs."""

WEIGHTINGS = ("samples", "tokens", "shard", "uniform")
"""A client's weight ``w_i``: samples or tokens it saw in the round, its shard's size (FedAvg's usual weight), or 1."""

UPDATE_KINDS = ("value", "delta", "none")
"""What an update carries: the end value ``e``, the delta ``e − s``, or nothing (a round the client is not sampled for)."""


class AlgorithmError(ParaBlockError):
    """A driver asked the core for something the algorithm forbids (a bug in the driver, or a corrupt state)."""


def staleness(mode: str) -> int:
    """Rounds a client may run ahead of the last aggregate it applied: 1 for ``parablock``, else 0."""
    if mode not in MODES:
        raise AlgorithmError(f"unknown mode {mode!r}; use {', '.join(MODES)}")
    return 1 if mode == "parablock" else 0


def sample_participants(clients: int, rounds: int, per_round: int | None, seed: int) -> list[tuple[int, ...]]:
    """Clients expected in each round: all, or a seeded sample of ``per_round`` (sorted)."""
    if per_round is None or per_round >= clients:
        return [tuple(range(clients))] * rounds
    rng = random.Random(seed + 7919)
    return [tuple(sorted(rng.sample(range(clients), per_round))) for _ in range(rounds)]


@dataclass(frozen=True)
class Plan:
    """What every round does: its block, who trains it, and the mode's rules.

    Args:
        mode: one of :data:`MODES`.
        schedule: the active block ``b_t`` of every round.
        num_blocks: ``M``.
        participants: the clients of every round; ``None``: every client.
        keep_optimizer_state: keep a block's optimizer state across its
            rounds (default: created fresh every round the block trains).
        assignment: ``shared`` or ``staggered`` (:data:`ASSIGNMENTS`).
        clients: ``N`` (the blocks of a staggered round depend on it).
    """

    mode: str
    schedule: tuple[int, ...]
    num_blocks: int
    participants: tuple[tuple[int, ...], ...] | None = None
    keep_optimizer_state: bool = False
    assignment: str = "shared"
    clients: int = 1

    def __post_init__(self) -> None:
        staleness(self.mode)
        if any(not 0 <= b < self.num_blocks for b in self.schedule):
            raise AlgorithmError(f"schedule {list(self.schedule)} names a block outside 0..{self.num_blocks - 1}")
        if self.participants is not None and len(self.participants) != len(self.schedule):
            raise AlgorithmError("participants must name the clients of every round")
        if self.assignment not in ASSIGNMENTS:
            raise AlgorithmError(f"unknown assignment {self.assignment!r}; use {', '.join(ASSIGNMENTS)}")

    @property
    def rounds(self) -> int:
        return len(self.schedule)

    @property
    def staleness(self) -> int:
        return staleness(self.mode)

    def participates(self, client: int, t: int) -> bool:
        """Whether ``client`` trains round ``t`` (no round after the last)."""
        return t < self.rounds and (self.participants is None or client in self.participants[t])

    def block_for(self, client: int, t: int) -> int:
        """The block ``client`` trains in round ``t``: ``b_t``, or ``(b_t + i) mod M`` when staggered."""
        b = self.schedule[t]
        return (b + client) % self.num_blocks if self.assignment == "staggered" else b

    def blocks_of(self, t: int) -> tuple[int, ...]:
        """The blocks round ``t`` moves (each aggregated over the clients that trained it), in order."""
        if self.assignment == "shared":
            return (self.schedule[t],)
        members = self.participants[t] if self.participants is not None else range(self.clients)
        return tuple(sorted({self.block_for(c, t) for c in members}))

    def applied_before(self, t: int) -> int:
        """The last round whose aggregate must be in place before round ``t`` begins (``-1``: none).

        ``sync``/``fedavg``: round ``t − 1``; ``parablock``: round ``t − 2``
        (one round of staleness, at the same point of every run).
        """
        return min(t, self.rounds) - 1 - (self.staleness if t < self.rounds else 0)

    def trains_again_before_apply(self, t: int, block: int, client: int = 0) -> bool:
        """Whether ``client`` may train ``block`` between the hand-off of round ``t`` and the application of its aggregate.

        Only in ``parablock``, and only if round ``t + 1`` has the client
        train that block (a single block, or a block another client moved in
        a staggered round; schedules never repeat a block back to back
        otherwise). Then the hand-off value ``e`` must be kept for the rebase.
        """
        return self.staleness > 0 and t + 1 < self.rounds and self.block_for(client, t + 1) == block


def cyclic_assignment(order: str, clients: int, num_blocks: int, rounds: int, seed: int = 0) -> tuple[list[int], list[tuple[int, ...]]]:
    """FedCyBGD's relay (DESIGN §1.1 Cyclic): round ``t`` is client ``i = t mod N``'s turn in its epoch ``e = t // N``.

    Returns the block of every round and its one client.

    Raises:
        AlgorithmError: an order outside :data:`CYCLIC_ORDERS`.
    """
    if order not in CYCLIC_ORDERS:
        raise AlgorithmError(f"cyclic assigns blocks {', '.join(CYCLIC_ORDERS)}, not {order!r}")
    epochs = -(-rounds // clients)
    rng = random.Random(seed + 104729)
    sequences = []
    for i in range(clients):
        if order == "ascending":
            sequences.append([(i + e) % num_blocks for e in range(epochs)])
        elif order == "descending":
            sequences.append([num_blocks - 1 - (i + e) % num_blocks for e in range(epochs)])
        else:
            seq: list[int] = []
            while len(seq) < epochs:
                seq.extend(rng.sample(range(num_blocks), num_blocks))
            sequences.append(seq[:epochs])
    schedule = [sequences[t % clients][t // clients] for t in range(rounds)]
    return schedule, [(t % clients,) for t in range(rounds)]


def make_plan(
    mode: str,
    *,
    num_blocks: int,
    rounds: int,
    schedule: str | Sequence[int] = "ascending",
    seed: int = 0,
    clients: int = 1,
    clients_per_round: int | None = None,
    keep_optimizer_state: bool = False,
    assignment: str = "shared",
) -> Plan:
    """The plan of a federation (the server's) or of a centralized run (one client, every round)."""
    if mode == "cyclic":
        if clients_per_round is not None and clients_per_round < clients:
            raise AlgorithmError("cyclic visits every client in turn; it takes no clients_per_round")
        if not isinstance(schedule, str):
            raise AlgorithmError(f"cyclic assigns blocks {', '.join(CYCLIC_ORDERS)}, not an explicit list")
        if assignment != "shared":
            raise AlgorithmError("cyclic assigns each client its own block already; it takes assignment shared")
        order_, turns = cyclic_assignment(schedule, clients, num_blocks, rounds, seed)
        return Plan(mode, tuple(order_), num_blocks, tuple(turns), keep_optimizer_state, "shared", clients)
    kind: str | list[int] = schedule if isinstance(schedule, str) else list(schedule)
    order = make_schedule(kind, num_blocks, rounds, seed)
    sampled = clients_per_round is not None and clients_per_round < clients
    participants = tuple(sample_participants(clients, rounds, clients_per_round, seed)) if sampled else None
    return Plan(mode, tuple(order), num_blocks, participants, keep_optimizer_state, assignment, clients)


def client_weight(weighting: str, *, samples: int, tokens: int, shard: int) -> float:
    """``w_i`` of one client's update (DESIGN §1.1 Weights).

    ``tokens`` falls back to ``samples`` when the batches carry no token counts.
    """
    if weighting == "samples":
        return float(samples)
    if weighting == "tokens":
        return float(tokens or samples)
    if weighting == "shard":
        return float(shard)
    if weighting == "uniform":
        return 1.0
    raise AlgorithmError(f"unknown weighting {weighting!r}; use {', '.join(WEIGHTINGS)}")


def rebase(local: Tensor, end: Tensor, new_global: Tensor) -> Tensor:
    """Block-level correction: ``new_global + (local − end)``.

    ``end`` is the block's value when it was handed off, ``local`` its value
    now: the result is the aggregate plus the local progress made since the
    hand-off. Returns a new tensor on ``local``'s device and dtype.
    """
    g = new_global.to(device=local.device, dtype=local.dtype)
    e = end.to(device=local.device, dtype=local.dtype)
    return g + (local - e)


def digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order): equal digests, bitwise equal tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite (one sum in its own dtype decides unless it overflows)."""
    if not t.is_floating_point():
        return True
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _cpu_copy(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}


# ---------------------------------------------------------------------------------------------------- client


@dataclass
class Update:
    """What a client hands to the transmitter at the end of a round (or for a round it skips)."""

    round: int
    block: int
    kind: str
    base_version: int
    weight: float
    tensors: dict[str, Tensor] | None = field(repr=False)
    loss: float | None = None
    codec: str = "none"
    """The codec ``tensors`` are parts of (:mod:`pl_parablock.compression`); ``none``: the tensors themselves."""
    encoder: ErrorFeedback | None = field(default=None, repr=False)
    """Set while ``tensors`` is still the plain delta: :meth:`encode` compresses it (off the training thread)."""

    def encode(self) -> None:
        """Compress ``tensors`` into ``codec``'s parts, ``Q(Δ + r)``, updating the sender's residual; once, in hand-off order.

        The transmitter calls it before the upload, so the codec's work does
        not stall training; the reference and the simulator at once.
        """
        if self.encoder is not None and self.tensors is not None:
            self.tensors = self.encoder.compress(self.block, self.tensors)[0]
        self.encoder = None


@dataclass(frozen=True)
class Compression:
    """How updates and aggregates travel (``federation.compression``).

    ``upload``: each client's update, ``D_i = Q(Δ_i + r_i)`` with its own
    residual per block; ``download``: the server's broadcast of a round's
    aggregate, ``D = Q(Δ_agg + r_b)`` with the server's residual per block,
    applied by the server and every client as ``g ← g + D``
    (:func:`~pl_parablock.compression.advance`). ``error_feedback=False``
    drops the residuals (the compression error is lost).
    """

    upload: Codec = field(default_factory=NoCodec)
    download: Codec = field(default_factory=NoCodec)
    error_feedback: bool = True

    @property
    def lossy_upload(self) -> bool:
        return not self.upload.lossless

    @property
    def lossy_download(self) -> bool:
        return not self.download.lossless


NO_COMPRESSION = Compression()


def decode_update(compression: Compression, codec: str, tensors: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The delta a compressed update's parts (of codec ``codec``) encode, for a block shaped ``like`` (the server's side).

    Raises:
        CodecError: another codec than the federation's, or parts that do not decode.
    """
    if codec != compression.upload.name:
        raise CodecError(
            f"the update is compressed with {codec!r}; this federation accepts {compression.upload.name!r} (federation.compression.codec)"
        )
    return decode_block(compression.upload, tensors, {n: tuple(t.shape) for n, t in like.items()})


def decode_broadcast(compression: Compression, parts: Mapping[str, Tensor], like: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """The aggregate delta ``D`` a compressed broadcast's parts encode (a client's side); ``like``: each tensor's shape."""
    return decode_block(compression.download, parts, {n: tuple(v) for n, v in like.items()})


@dataclass(frozen=True)
class RoundStart:
    """Round ``round`` begins: train ``block`` alone; with ``fresh_optimizer_state``, drop its optimizer state first."""

    round: int
    block: int
    fresh_optimizer_state: bool


@dataclass
class _Open:
    round: int
    block: int
    start: dict[str, Tensor] | None  # s, kept only when a delta will be sent
    start_version: int


class ClientCore:
    """One client's round state machine over the live tensors of its blocks.

    The driver calls, in this order for every round ``t``: :meth:`awaiting`
    (the rounds whose aggregates it must deliver first, each through
    :meth:`apply`), then :meth:`skip` if the client is not sampled for ``t``,
    else :meth:`begin`, ``K`` optimizer steps, and :meth:`end`; after the last
    round, :meth:`awaiting` again until :attr:`finished`. The core mutates the
    block tensors in place (under ``no_grad``) only in :meth:`apply` and
    :meth:`adopt`.

    Args:
        plan: the federation's plan.
        client_id: this client.
        blocks: the live tensors of every block, by name (e.g. the module's
            parameters); index = block.
        compression: how updates and aggregates travel. A lossless upload
            lets a client that started from the global send its end value;
            a lossy one always sends the compressed delta ``Q(Δ + r)``,
            keeping the residual ``r`` of each block (on the CPU). A lossy
            download makes the client keep, for every block its live
            tensors do not hold exactly, a CPU copy of the block's global
            value, so that it can form ``g + D`` as the server does.

    Raises:
        AlgorithmError: a call out of order (an aggregate applied early, late,
            twice, or of another version than the round's).
    """

    def __init__(
        self, plan: Plan, client_id: int, blocks: Sequence[Mapping[str, Tensor]], *, compression: Compression = NO_COMPRESSION
    ) -> None:
        if len(blocks) != plan.num_blocks:
            raise AlgorithmError(f"the plan has {plan.num_blocks} blocks, the client {len(blocks)}")
        self.plan = plan
        self.client_id = client_id
        self.blocks = [dict(b) for b in blocks]
        self.compression = compression
        self.exact_uploads = not compression.lossy_upload
        self.uplink = ErrorFeedback(compression.upload, compression.error_feedback) if compression.lossy_upload else None
        # block -> its exact global value, where the live tensors do not hold it (lossy downloads only)
        self.globals: list[dict[str, Tensor] | None] = [None] * plan.num_blocks
        self.round = 0
        self.next_apply = 0
        self.versions = [-1] * plan.num_blocks
        self.clean = [True] * plan.num_blocks  # the block holds exactly its global value of `versions[b]`
        # round -> {block the round moves: this client's hand-off value e of it, kept only if the rebase needs it}
        self.inflight: dict[int, dict[int, dict[str, Tensor] | None]] = {}
        self.open: _Open | None = None
        self.catching_up = False  # cyclic: blocks changed since this client's last turn are still to be fetched

    # ------------------------------------------------------------ queries

    @property
    def finished(self) -> bool:
        """Every round trained (or skipped) and every aggregate applied."""
        return self.round >= self.plan.rounds and self.next_apply >= self.plan.rounds and self.open is None

    @property
    def active_block(self) -> int | None:
        return self.open.block if self.open is not None else None

    def awaiting(self) -> list[int]:
        """Rounds whose aggregates must be applied, in this order, before the next step."""
        if self.open is not None:
            return []
        return list(range(self.next_apply, self.plan.applied_before(self.round) + 1))

    def participates(self) -> bool:
        """Whether this client trains the next round."""
        return self.plan.participates(self.client_id, self.round)

    # ------------------------------------------------------------ round steps

    def _check_ready(self) -> int:
        t = self.round
        if self.open is not None:
            raise AlgorithmError(f"client {self.client_id}: round {self.open.round} is still open")
        if t >= self.plan.rounds:
            raise AlgorithmError(f"client {self.client_id}: all {self.plan.rounds} rounds are done")
        if self.awaiting():
            raise AlgorithmError(
                f"client {self.client_id}: round {t} cannot begin before the aggregate of round {self.next_apply} is applied"
            )
        return t

    def begin(self) -> RoundStart:
        """Open round ``t``: block ``b_t`` trains from ``s``, its current value."""
        t = self._check_ready()
        if not self.participates():
            raise AlgorithmError(f"client {self.client_id} is not sampled for round {t}; call skip()")
        if self.catching_up:
            raise AlgorithmError(f"client {self.client_id}: fetch the blocks changed since its last turn before round {t}")
        b = self.plan.block_for(self.client_id, t)
        pending = any(b in blocks for blocks in self.inflight.values())
        from_global = self.clean[b] and not pending and self.exact_uploads
        self.open = _Open(t, b, None if from_global else _cpu_copy(self.blocks[b]), self.versions[b])
        if self.compression.lossy_download and self.clean[b] and self.globals[b] is None:
            self.globals[b] = self.open.start if self.open.start is not None else _cpu_copy(self.blocks[b])
        return RoundStart(t, b, fresh_optimizer_state=not self.plan.keep_optimizer_state)

    def end(self, *, samples: int, tokens: int, shard: int, weighting: str, loss: float | None = None) -> Update:
        """Close the open round: the update ``e`` or ``e − s`` with its weight ``w_i``."""
        if self.open is None:
            raise AlgorithmError(f"client {self.client_id}: no round is open")
        o, self.open = self.open, None
        e = _cpu_copy(self.blocks[o.block])
        codec = "none"
        if o.start is None:
            kind, payload = "value", e
        else:
            kind, payload = "delta", {n: e[n] - o.start[n] for n in e}
            if self.uplink is not None:
                codec = self.compression.upload.name  # compressed by Update.encode, in hand-off order
        self.inflight[o.round] = self._handed(o.round, own=(o.block, e))
        self.clean[o.block] = False
        self.round = o.round + 1
        weight = client_weight(weighting, samples=samples, tokens=tokens, shard=shard)
        return Update(o.round, o.block, kind, o.start_version, weight, payload, loss, codec, self.uplink if codec != "none" else None)

    def skip(self) -> Update | None:
        """A round this client is not sampled for: nothing trains; its aggregate is fetched and applied in turn.

        ``cyclic``: only the round just before the client's next turn (or the
        last round) is fetched (the client waits for its turn, or the end);
        the blocks other rounds changed are fetched once each, before its
        turn or at the end (:attr:`catching_up`).
        Returns ``None`` when nothing is to be fetched.
        """
        t = self._check_ready()
        if self.participates():
            raise AlgorithmError(f"client {self.client_id} is sampled for round {t}; call begin()")
        b = self.plan.block_for(self.client_id, t)
        if self.plan.mode == "cyclic":
            self.catching_up = True
            if not self.plan.participates(self.client_id, t + 1) and t + 1 < self.plan.rounds:
                self.round = self.next_apply = t + 1
                return None
        self.inflight[t] = self._handed(t)
        self.round = t + 1
        return Update(t, b, "none", self.versions[b], 0.0, None)

    def _handed(self, t: int, own: tuple[int, dict[str, Tensor]] | None = None) -> dict[int, dict[str, Tensor] | None]:
        """What round ``t`` leaves in flight: each block it moves, with this client's value ``e`` where the rebase will need it."""
        out: dict[int, dict[str, Tensor] | None] = {}
        for blk in self.plan.blocks_of(t):
            if not self.plan.trains_again_before_apply(t, blk, self.client_id):
                out[blk] = None
            elif own is not None and own[0] == blk:
                out[blk] = own[1]
            else:
                out[blk] = _cpu_copy(self.blocks[blk])
        return out

    def global_value(self, block: int) -> dict[str, Tensor] | None:
        """The exact global value of ``block`` at :attr:`versions` ``[block]`` as this client holds it, or ``None`` if unknown."""
        kept = self.globals[block]
        if kept is not None:
            return kept
        if self.clean[block] and not (self.open is not None and self.open.block == block):
            return self.blocks[block]
        return None

    def compressed_aggregate(self, round_index: int, delta: Mapping[str, Tensor], base_versions: Mapping[int, int]) -> dict[str, Tensor]:
        """The aggregate ``g' = g + D`` of ``round_index`` from its decoded broadcast ``D`` (every block the round moves).

        Raises:
            ResyncNeeded: this client does not hold the version of a block
                ``D`` applies to (it must adopt the server's values).
        """
        out: dict[str, Tensor] = {}
        for b in self.plan.blocks_of(round_index):
            base = base_versions.get(b)
            g = self.global_value(b)
            if g is None or base != self.versions[b]:
                held = self.versions[b] if g is not None else "no exact copy"
                raise ResyncNeeded(
                    f"client {self.client_id}: the aggregate of round {round_index} applies to version {base} of block {b}; "
                    f"this client holds {held}"
                )
            for n, t in g.items():
                if n not in delta or tuple(delta[n].shape) != tuple(t.shape):
                    raise ResyncNeeded(f"client {self.client_id}: the aggregate of round {round_index} lacks tensor {n!r} of its shape")
                out[n] = advance(t, delta[n])
        return out

    def apply(self, round_index: int, version: int, new_global: Mapping[str, Tensor]) -> None:
        """Apply the aggregate ``g'`` of ``round_index`` (version ``round_index`` exactly) by the rebase."""
        if round_index != self.next_apply:
            raise AlgorithmError(
                f"client {self.client_id}: aggregate of round {round_index} applied out of turn (next is {self.next_apply})"
            )
        if round_index not in self.inflight:
            raise AlgorithmError(f"client {self.client_id}: round {round_index} was never handed off")
        if version != round_index:
            raise AlgorithmError(f"client {self.client_id}: asked for version {round_index} of the block, got version {version}")
        keep = self.compression.lossy_download
        for b, end in self.inflight.pop(round_index).items():
            later = [q for q, blocks in self.inflight.items() if b in blocks and q > round_index]
            trained = [q for q in later if self.plan.participates(self.client_id, q) and self.plan.block_for(self.client_id, q) == b]
            if not trained and not (self.open is not None and self.open.block == b):
                # untouched since the hand-off: the aggregate replaces it, and so do later hand-offs kept of it
                self._copy_in(b, new_global)
                self.clean[b] = True
                self.globals[b] = None
                for q in later:
                    if self.inflight[q][b] is not None:
                        self.inflight[q][b] = _cpu_copy(self.blocks[b])
            else:
                if end is None:
                    raise AlgorithmError(f"client {self.client_id}: block {b} trained again before round {round_index}'s aggregate arrived")
                with torch.no_grad():
                    for n, p in self.blocks[b].items():
                        p.copy_(rebase(p, end[n], new_global[n]))
                for q in later:
                    e_q = self.inflight[q][b]
                    if e_q is not None:
                        self.inflight[q][b] = {n: rebase(e_q[n], end[n], new_global[n]) for n in e_q}
                if self.open is not None and self.open.block == b and self.open.start is not None:
                    self.open.start = {n: rebase(self.open.start[n], end[n], new_global[n]) for n in end}
                self.clean[b] = False
                if keep:
                    self.globals[b] = {n: new_global[n].detach().to("cpu", copy=True) for n in self.blocks[b]}
            self.versions[b] = version
        self.next_apply = round_index + 1

    # ------------------------------------------------------------ joining

    def adopt(self, block: int, version: int, new_global: Mapping[str, Tensor]) -> None:
        """Hold the server's current global value of ``block`` (join, rejoin, resync)."""
        self._copy_in(block, new_global)
        self.versions[block] = version
        self.clean[block] = True
        self.globals[block] = None

    def caught_up(self) -> None:
        """``cyclic``: the blocks changed since this client's last turn are now held (:meth:`adopt`)."""
        self.catching_up = False

    def restart_at(self, next_round: int) -> None:
        """Continue from the server's first round not yet aggregated (its blocks adopted); hand-offs in flight are dropped."""
        self.catching_up = False
        self.inflight.clear()
        self.open = None
        self.round = self.next_apply = next_round

    def mark_unverified(self) -> None:
        """The blocks may not hold their global values (restored from a checkpoint, server restarted)."""
        self.clean = [False] * self.plan.num_blocks
        self.globals = [None] * self.plan.num_blocks

    def _copy_in(self, block: int, tensors: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.blocks[block].items():
                p.copy_(tensors[n])

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume from (between rounds, with nothing in flight)."""
        return {"round": self.round, "versions": list(self.versions)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.restart_at(int(state["round"]))
        self.versions = [int(v) for v in state.get("versions", self.versions)]
        self.mark_unverified()


def activate(blocks: Sequence[Mapping[str, Tensor]], start: RoundStart, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Step 1 of a round on the live parameters: block ``start.block`` alone trains.

    Every other block is frozen and its gradients dropped; with
    ``start.fresh_optimizer_state`` every block's optimizer state is dropped,
    so the active block's is created fresh by its first step and only the
    active block ever holds optimizer state (BAdam's memory saving).
    """
    for b, params in enumerate(blocks):
        for p in params.values():
            p.requires_grad_(b == start.block)
            if b != start.block:
                p.grad = None
    if start.fresh_optimizer_state:
        for opt in optimizers:
            for params in blocks:
                for p in params.values():
                    opt.state.pop(p, None)


# ---------------------------------------------------------------------------------------------------- server


class Superseded(AlgorithmError):  # noqa: N818 - names the event
    """The version asked for is no longer held: a later round replaced it; fetch the current value and resync."""


class ServerOptimizer:
    """A server optimizer per block (FedOpt, Reddi et al., *Adaptive Federated Optimization*): ``x_b <- x_b - opt(-Δ_agg)``.

    ``Δ_agg`` is the round's weighted mean delta of block ``b``. Each block
    has its own state (created at its first round, kept on the server and in
    its checkpoints). Subclasses define :meth:`update` on one float64 piece.

    Args:
        lr: the server learning rate ``η``.
        betas: ``(β1, β2)``: momentum and second-moment decay.
        tau: the adaptivity ``τ`` (adaptive optimizers).
    """

    name = ""
    slots: tuple[str, ...] = ()

    def __init__(self, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.tau = tau
        self.state: dict[int, dict[str, dict[str, Tensor]]] = {}

    def initial(self, slot: str, like: Tensor) -> Tensor:
        return torch.zeros(like.shape, dtype=torch.float64)

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        """The new value of piece ``g`` (float64, may be modified in place) given the mean delta and the state's pieces."""
        raise NotImplementedError

    def step_for(self, block: int, current: Mapping[str, Tensor]) -> Callable[[str, int, Tensor, Tensor], Tensor]:
        """The piecewise step of ``block``'s round (its state created on first use)."""
        per_name = self.state.setdefault(block, {})
        for name, t in current.items():
            if name not in per_name:
                per_name[name] = {slot: self.initial(slot, t) for slot in self.slots}

        def step(name: str, start: int, g: Tensor, delta: Tensor) -> Tensor:
            pieces = {slot: v.view(-1)[start : start + g.numel()] for slot, v in per_name[name].items()}
            return self.update(g, delta, pieces)

        return step

    def state_tensors(self) -> dict[str, Tensor]:
        """The state as flat named tensors (``"<block>/<name>/<slot>"``), for a checkpoint."""
        return {f"{b}/{n}/{slot}": t for b, names in self.state.items() for n, slots in names.items() for slot, t in slots.items()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        self.state = {}
        for key, t in tensors.items():
            b, rest = key.split("/", 1)
            name, slot = rest.rsplit("/", 1)
            self.state.setdefault(int(b), {}).setdefault(name, {})[slot] = t.to(torch.float64)


class ServerSGD(ServerOptimizer):
    """``x + η Δ``; ``η = 1`` is FedAvg (and, with value updates, the exact weighted mean)."""

    name = "sgd"

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        return g.add_(delta, alpha=self.lr)


class ServerMomentum(ServerOptimizer):
    """FedAvgM: ``m <- β1 m + Δ``, ``x + η m``."""

    name = "momentum"
    slots = ("m",)

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        m = state["m"].mul_(self.beta1).add_(delta)
        return g.add_(m, alpha=self.lr)


class ServerAdam(ServerOptimizer):
    """FedAdam: ``m <- β1 m + (1-β1) Δ``, ``v <- β2 v + (1-β2) Δ²``, ``x + η m / (√v + τ)`` (``v`` starts at ``τ²``)."""

    name = "adam"
    slots = ("m", "v")

    def initial(self, slot: str, like: Tensor) -> Tensor:
        return torch.full(like.shape, self.tau**2 if slot == "v" else 0.0, dtype=torch.float64)

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)

    def update(self, g: Tensor, delta: Tensor, state: dict[str, Tensor]) -> Tensor:
        m = state["m"].mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v = self.second_moment(state["v"], delta * delta)
        return g.add_(m / (v.sqrt() + self.tau), alpha=self.lr)


class ServerYogi(ServerAdam):
    """FedYogi: as FedAdam with ``v <- v - (1-β2) Δ² sign(v - Δ²)``."""

    name = "yogi"

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))


class ServerAdagrad(ServerAdam):
    """FedAdagrad: as FedAdam with ``v <- v + Δ²``."""

    name = "adagrad"

    def second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v.add_(d2)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (ServerSGD, ServerMomentum, ServerAdam, ServerYogi, ServerAdagrad)
}
"""The server optimizers by name (``federation.server_optimizer.name``)."""


def make_server_optimizer(name: str, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3) -> ServerOptimizer:
    if name not in SERVER_OPTIMIZERS:
        raise AlgorithmError(f"unknown server optimizer {name!r}; use {', '.join(SERVER_OPTIMIZERS)}")
    return SERVER_OPTIMIZERS[name](lr=lr, betas=betas, tau=tau)


class RoundStep:
    """The server's step for one round of one block: accumulate updates, then form ``g'``.

    ``g' = g + η_g · Σ w_i Δ_i / Σ w_i``; with ``η_g = 1`` and only value
    updates, ``Σ w_i e_i / Σ w_i`` (see :class:`~pl_parablock.aggregate.RoundAccumulator`
    for the exact float64 arithmetic). Memory: two float64 copies of the
    block, whatever the number of clients.
    """

    def __init__(self, round_index: int, block: int, server_lr: float = 1.0, optimizer: ServerOptimizer | None = None) -> None:
        self.round = round_index
        self.block = block
        self.server_lr = server_lr
        if isinstance(optimizer, ServerSGD):  # plain SGD is the accumulator's own exact path
            self.server_lr, optimizer = optimizer.lr, None
        self.optimizer = optimizer
        self.acc = RoundAccumulator()

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
        bad = [n for n, t in new.items() if not _finite(t)]
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
