"""The ParaBlock algorithm (DESIGN.md §1), pure: no threads, sockets or Lightning.

Every driver runs the algorithm through the objects of this module and
decides nothing of its own: the Lightning callback
(:class:`~pl_parablock.client.strategy.FederatedBlockStrategy`, real clients), the
server (:class:`~pl_parablock.server.aggregator.Aggregator`), the
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

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pl_parablock.core.blocks import make_schedule
from pl_parablock.errors import ParaBlockError

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


_S = TypeVar("_S", bound="str | Sequence[int]")


class AlgorithmError(ParaBlockError):
    """A driver asked the core for something the algorithm forbids (a bug in the driver, or a corrupt state)."""


@dataclass(frozen=True)
class Mode:
    """One way of running rounds (``mode`` in a recipe): the rules every driver asks of it, stated once.

    Adding a mode is one :class:`Mode` in :data:`MODE_REGISTRY` (and its tests); the plan, the client core, the
    server, the reference, the simulator and the recipe's validation ask the object, never the name.

    Args:
        name: the recipe's ``mode``.
        summary: one line for the recipe reference and error messages.
        staleness: rounds a client may run ahead of the last aggregate it applied (``parablock``: 1).
        whole_model: every trainable parameter is one block, trained every round (``fedavg``).
        relay: one client a round, in turn, each training its own block of the model the previous one left
            (``cyclic``, FedCyBGD); its trained block replaces the global block, so a download is the block's value
            (never a compressed delta) and a client fetches only the blocks changed since it last held the model.
        assignments: the ``blocks.assignment`` values it runs.
    """

    name: str
    summary: str
    staleness: int = 0
    whole_model: bool = False
    relay: bool = False
    assignments: tuple[str, ...] = ("shared",)

    @property
    def delta_downloads(self) -> bool:
        """Whether a client may ask for an aggregate as the compressed delta ``D`` (not in a relay: it replaces)."""
        return not self.relay

    def schedule(self, asked: _S) -> _S | str:
        """The schedule this mode runs for ``blocks.schedule``: ``fedavg``'s one block needs none (``ascending``)."""
        return "ascending" if self.whole_model else asked

    def refusals(
        self,
        *,
        schedule: str | Sequence[int] = "ascending",
        clients: int = 1,
        clients_per_round: int | None = None,
        assignment: str = "shared",
        aggregation: str = "mean",
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        server_optimizer_lr: float | None = None,
        staleness: int = 1,
        stale_mix: float = 1.0,
    ) -> list[str]:
        """What this mode does not run, one line each naming the recipe key; empty when it runs these settings.

        The recipe's validation and :func:`make_plan` both ask this, so each rule of a mode is stated here only.

        Args:
            schedule: ``blocks.schedule``.
            clients: ``federation.clients``.
            clients_per_round: ``federation.clients_per_round`` (``None``: not set).
            assignment: ``blocks.assignment``.
            aggregation: ``federation.aggregation``.
            server_optimizer: ``federation.server_optimizer.name``.
            server_lr: ``federation.server_lr``.
            server_optimizer_lr: ``federation.server_optimizer.lr`` (``None``: ``server_lr``).
            staleness: ``federation.staleness`` (``k``: rounds in flight; only a pipelined mode takes more than 1).
            stale_mix: ``federation.stale_mix`` (``α`` of the rebase; only a pipelined mode damps).
        """
        p = []
        if not self.staleness and staleness != 1:
            p.append(f"`federation.staleness` is {staleness} but mode={self.name} waits for every aggregate; leave it at 1")
        if not self.staleness and stale_mix != 1.0:
            p.append(f"`federation.stale_mix` is {stale_mix} but mode={self.name} has no stale rounds to damp; leave it at 1.0")
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 1:
            p.append(f"`federation.staleness` is {staleness!r}; give an integer >= 1 (1: the paper's ParaBlock)")
        if not (isinstance(stale_mix, (int, float)) and 0.0 <= stale_mix <= 1.0):
            p.append(f"`federation.stale_mix` is {stale_mix!r}; give a number in [0, 1] (1: the paper's rebase)")
        if assignment in ASSIGNMENTS and assignment not in self.assignments:
            p.append(f"`blocks.assignment` is {assignment} but mode={self.name} has one block a round; use shared")
        if not self.relay:
            return p
        if not (isinstance(schedule, str) and schedule in CYCLIC_ORDERS):
            shown = list(schedule) if isinstance(schedule, (list, tuple)) else schedule
            p.append(f"`blocks.schedule` is {shown!r}; mode={self.name} assigns blocks {' | '.join(CYCLIC_ORDERS)}")
        if clients_per_round is not None:
            p.append(f"`federation.clients_per_round` is set but mode={self.name} visits every client in turn; remove it")
        if server_optimizer != "sgd" or server_lr != 1.0 or server_optimizer_lr not in (None, 1.0):
            p.append(
                f"`federation.server_optimizer` / `federation.server_lr`: mode={self.name} replaces the global block with the "
                "trained one; use sgd at lr 1"
            )
        if aggregation != "mean":
            p.append(f"`federation.aggregation` is {aggregation!r}; mode={self.name} has one update a round (use mean)")
        return p


MODE_REGISTRY: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("parablock", "overlaps a round's communication with the next round's training", staleness=1,
             assignments=("shared", "staggered")),
        Mode("sync", "waits for every round's aggregate before the next round (federated block coordinate descent)",
             assignments=("shared", "staggered")),
        Mode("fedavg", "one block of every trainable parameter, every round", whole_model=True),
        Mode("cyclic", "FedCyBGD: the clients one after another, each training its own block of the model the previous "
             "one left", relay=True),
    )
}  # fmt: skip
"""Every mode, by name."""

MODES = tuple(MODE_REGISTRY)
"""The names of :data:`MODE_REGISTRY`."""


def mode_of(name: str) -> Mode:
    """The :class:`Mode` called ``name``.

    Raises:
        AlgorithmError: no mode has that name (the message lists them).
    """
    try:
        return MODE_REGISTRY[name]
    except (KeyError, TypeError):
        raise AlgorithmError(f"unknown mode {name!r}; use {', '.join(MODES)}") from None


def staleness(mode: str) -> int:
    """Rounds a client may run ahead of the last aggregate it applied: 1 for ``parablock``, else 0."""
    return mode_of(mode).staleness


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
        depth: ``k`` (``federation.staleness``): in a pipelined mode, round ``t``'s aggregate is applied before round
            ``t + k + 1`` begins, so up to ``k`` hand-offs are in flight (1: the paper's ParaBlock).
        mix: ``α`` (``federation.stale_mix``): the rebase applies ``g' + α·(θ − e)`` (1: the paper's rebase).
    """

    mode: str
    schedule: tuple[int, ...]
    num_blocks: int
    participants: tuple[tuple[int, ...], ...] | None = None
    keep_optimizer_state: bool = False
    assignment: str = "shared"
    clients: int = 1
    depth: int = 1
    mix: float = 1.0

    def __post_init__(self) -> None:
        refused = mode_of(self.mode).refusals(staleness=self.depth, stale_mix=self.mix)
        if refused:
            raise AlgorithmError("; ".join(refused))
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
        """Rounds a client may run ahead of the last aggregate it applied: ``k`` in a pipelined mode, else 0."""
        return mode_of(self.mode).staleness * self.depth

    @property
    def relay(self) -> bool:
        """Whether this plan is a relay (:attr:`Mode.relay`): one client a round, its block replacing the global."""
        return mode_of(self.mode).relay

    def participates(self, client: int, t: int) -> bool:
        """Whether ``client`` trains round ``t`` (no round after the last)."""
        return t < self.rounds and (self.participants is None or client in self.participants[t])

    def block_for(self, client: int, t: int) -> int:
        """The block ``client`` trains in round ``t``: ``b_t``, or ``(b_t + i) mod M`` when staggered."""
        b = self.schedule[t]
        return (b + client) % self.num_blocks if self.assignment == "staggered" else b

    def clients_of(self, t: int) -> tuple[int, ...]:
        """The clients expected in round ``t`` (sorted): its participants, or every client."""
        return self.participants[t] if self.participants is not None else tuple(range(self.clients))

    def blocks_of(self, t: int) -> tuple[int, ...]:
        """The blocks round ``t`` moves (each aggregated over the clients that trained it), in order."""
        if self.assignment == "shared":
            return (self.schedule[t],)
        return tuple(sorted({self.block_for(c, t) for c in self.clients_of(t)}))

    def applied_before(self, t: int) -> int:
        """The last round whose aggregate must be in place before round ``t`` begins (``-1``: none).

        ``sync``/``fedavg``: round ``t − 1``; ``parablock``: round ``t − 2``
        (one round of staleness, at the same point of every run).
        """
        return min(t, self.rounds) - 1 - (self.staleness if t < self.rounds else 0)

    def trains_again_before_apply(self, t: int, block: int, client: int = 0) -> bool:
        """Whether ``client`` may train ``block`` between the hand-off of round ``t`` and the application of its aggregate.

        Only in a pipelined mode, and only if one of rounds ``t + 1 .. t + k``
        has the client train that block (a single block; a block another
        client moved in a staggered round; with ``k ≥ 2`` a block that comes
        round again within the window, e.g. ``M = 2``; schedules never repeat
        a block back to back otherwise). Then the hand-off value ``e`` must be
        kept for the rebase.
        """
        last = min(t + self.staleness, self.rounds - 1)
        return any(self.block_for(client, q) == block for q in range(t + 1, last + 1))


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
    return schedule, list(_turns(clients, rounds))


def _turns(clients: int, rounds: int) -> tuple[tuple[int, ...], ...]:
    """A relay's one client of every round: client ``t mod N`` in round ``t``."""
    return tuple((t % clients,) for t in range(rounds))


def participants_of(
    mode: str, *, clients: int, rounds: int, clients_per_round: int | None = None, seed: int = 0
) -> tuple[tuple[int, ...], ...] | None:
    """The clients of every round, as :func:`make_plan`'s :attr:`Plan.participants` holds them; ``None``: every client.

    They do not depend on the model's blocks, so a server knows them before
    the first client announces its model: a relay visits client ``t mod N``
    in round ``t``; otherwise a seeded sample of ``clients_per_round``
    (:func:`sample_participants`) when it is smaller than ``clients``.

    Raises:
        AlgorithmError: an unknown mode.
    """
    if mode_of(mode).relay:
        return _turns(clients, rounds)
    if clients_per_round is not None and clients_per_round < clients:
        return tuple(sample_participants(clients, rounds, clients_per_round, seed))
    return None


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
    staleness: int = 1,
    stale_mix: float = 1.0,
) -> Plan:
    """The plan of a federation (the server's) or of a centralized run (one client, every round).

    Raises:
        AlgorithmError: settings the mode refuses (:meth:`Mode.refusals`).
    """
    m = mode_of(mode)
    refused = m.refusals(schedule=schedule, clients=clients, clients_per_round=clients_per_round, assignment=assignment)
    if refused:
        raise AlgorithmError("; ".join(refused))
    if m.relay:
        assert isinstance(schedule, str)  # refusals() asked for one of CYCLIC_ORDERS
        order_, _ = cyclic_assignment(schedule, clients, num_blocks, rounds, seed)
        participants = participants_of(mode, clients=clients, rounds=rounds, seed=seed)
        return Plan(mode, tuple(order_), num_blocks, participants, keep_optimizer_state, "shared", clients, staleness, stale_mix)
    asked = m.schedule(schedule)
    kind: str | list[int] = asked if isinstance(asked, str) else list(asked)
    order = make_schedule(kind, num_blocks, rounds, seed)
    participants = participants_of(mode, clients=clients, rounds=rounds, clients_per_round=clients_per_round, seed=seed)
    return Plan(mode, tuple(order), num_blocks, participants, keep_optimizer_state, assignment, clients, staleness, stale_mix)


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
