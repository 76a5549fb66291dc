"""The server's state: global block values, versions, rounds and their aggregation.

The aggregator is model-agnostic: it holds tensors by name. The first client
to join sets the federation's fingerprint (block partition, tensor names,
shapes, dtypes and a hash of the initial values) and uploads the initial
global state; a client whose fingerprint differs is refused with the reason.
The aggregator owns the schedule (the active block of every round) and, with
``clients_per_round``, the seeded sample of clients that train each round.

Every update is validated before it touches global state: a joined client
sampled for the round, the round's block, exactly the block's tensor names,
shapes and dtypes, finite values, and optionally an L2 norm bound. A bad
update is refused with the reason and recorded; the round goes on. With
weighted ``mean`` aggregation and no ``clip_norm`` (:attr:`Aggregator.streams`),
an update is checked and summed chunk by chunk as it arrives
(:meth:`Aggregator.receive`) and one found bad late is rolled back exactly;
otherwise it is spooled whole, then checked and summed (:meth:`Aggregator.submit`). A repeated
update of the same client, round and block is acknowledged and not applied
twice; an update for a round that already closed is counted as late and
dropped.

A round closes when every expected client's update has arrived, or, with
``round_timeout_s``, that many seconds after its first update if at least
``min_clients`` arrived. Closing replaces the block's global value
(copy-on-write: a reader streaming the old value keeps a consistent copy) and
sets its version to the round number. With ``checkpoint_dir`` and
``checkpoint_every``, the global state is written atomically before the
aggregate is released, so a restarted server resumes from it.

All methods are thread-safe; every wait is bounded by the timeout given.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pl_parablock.core.aggregate import AGGREGATIONS, PIECE_ELEMS, PIECES, assemble, clip_factor, pieces_of, robust_mean
from pl_parablock.core.blocks import Partition
from pl_parablock.core.codecs import NO_COMPRESSION, CodecError, Compression, block_problem, decode_update
from pl_parablock.core.optimizers import ServerOptimizer, make_server_optimizer
from pl_parablock.core.plan import WEIGHTINGS, Plan, make_plan, sample_participants, staleness
from pl_parablock.core.server import GlobalState, RoundStep, Superseded
from pl_parablock.core.tensors import digest
from pl_parablock.errors import FederationError, ParaBlockError
from pl_parablock.server._ratelimit import RateLimitedLog
from pl_parablock.wire.framing import DTYPES, Spec, StagedTensors, check_specs, dtype_name, short, tensor_specs

__all__ = ["AGGREGATIONS", "MAX_WEIGHT", "Aggregator", "Feed", "RefusedError", "check_fingerprint"]

log = logging.getLogger(__name__)
warn = RateLimitedLog(log)

WORK_SLOTS = max(1, min(4, os.cpu_count() or 1))
CHECKPOINT_FORMAT = 1
OPT_PREFIX = "server_optimizer::"
RESIDUAL_PREFIX = "broadcast_residual::"
MAX_WEIGHT = float(2**53)
"""No update's weight may exceed this, whatever the bound of the recipe: every integer up to it is exact in
float64, and a weight times any float32 value stays far from float64's overflow."""
MAX_RECORDED_REJECTIONS = 1000
"""Refusals kept with their reasons per round (and outside rounds); beyond it they are only counted."""
MAX_BLOCKS = 1 << 16
MAX_DIMS = 16
MAX_NAME = 1024


Consume = Callable[[str, int, Tensor], None]
"""``consume(name, start, values)``: elements ``start .. start + values.numel()`` of tensor ``name`` of an update, flat."""
Feed = Callable[[Consume, Callable[[memoryview], None]], None]
"""``feed(consume, spool)``: delivers an update to :meth:`Aggregator.receive` as it arrives."""


class RefusedError(FederationError):
    """A request the server refuses; ``code`` says why for the transport."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Update:
    """An accepted update kept until its round closes (robust aggregation only)."""

    source: StagedTensors
    weight: float
    kind: str
    scale: float


class _Refusal(Exception):  # noqa: N818 - control flow inside the aggregator, never raised to callers
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
    """An update being checked and summed as its stream arrives (the streaming path, see :meth:`Aggregator.receive`).

    Its bytes are also written, as they arrive, to an unnamed temporary file
    (disk, not memory): if this or another update of the round is refused
    after part of it was summed, the pieces it touched are rebuilt from the
    spools of the others' segments, in the order they were added.
    """

    def __init__(
        self, rnd: _Round, client: int, block: int, kind: str, weight: float, specs: list[Spec], current: dict[str, Tensor]
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


@dataclass
class _Round:
    index: int
    block: int  # the schedule's b_t
    expected: tuple[int, ...]
    steps: dict[int, RoundStep]  # one per block the round moves (several when staggered)
    lock: threading.Lock = field(default_factory=threading.Lock)
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    kept: dict[int, _Update] = field(default_factory=dict)
    streaming: dict[int, _Upload] = field(default_factory=dict)  # updates being summed as they arrive, by client
    spooled: list[_Upload] = field(default_factory=list)  # accepted streamed updates (their spools until it closes)
    log: dict[tuple[int, str, str, int], list[_Entry]] = field(default_factory=dict)  # (block, kind, tensor, piece) -> adds
    work_s: float = 0.0  # the server's work on the round's updates as they arrived
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0  # also those beyond the recorded ones
    late: int = 0
    first_arrival: float | None = None
    closed: bool = False
    closed_at: float | None = None
    aggregation_s: float = 0.0
    reason: str = ""
    restored_loss: float | None = None


def _describe_mismatch(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str:
    if mine.get("mode") != theirs.get("mode"):
        return f"it runs mode={theirs.get('mode')} but the federation runs mode={mine.get('mode')}"
    pa, pb = mine["partition"], theirs["partition"]
    if len(pa) != len(pb):
        return f"it has {len(pb)} blocks, the federation {len(pa)} (check blocks.* and the model config)"
    for i, (a, b) in enumerate(zip(pa, pb)):
        if a["params"] != b["params"]:
            return f"block {i} holds different parameters ({b['name']!r} vs {a['name']!r})"
    ta, tb = mine["tensors"], theirs["tensors"]
    for name, spec in ta.items():
        other = tb.get(name)
        if other != spec:
            return f"tensor {name!r} is {other} here but {spec} in the federation"
    if mine.get("hash") != theirs.get("hash"):
        return "its initial weights differ (different seed, checkpoint or init)"
    return "unknown difference"


def _same_fingerprint(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("mode", "partition", "tensors", "hash"))


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise RefusedError(f"malformed model fingerprint: {what} {short(value)} is not a name of 1..{MAX_NAME} characters", "invalid")
    return value


def check_fingerprint(fingerprint: Any) -> dict[str, Any]:
    """A join's model fingerprint, checked in full; returns its canonical form (known keys only).

    The fingerprint must hold ``mode`` (a string), ``partition`` (a non-empty
    list of ``{name, params}`` blocks, disjoint), ``tensors`` (every
    parameter of the partition and nothing else, each with a known
    ``dtype``, a ``shape`` of non-negative integers and the ``nbytes`` they
    make) and ``hash`` (a string). Anything else it carries is dropped.

    Raises:
        RefusedError: code ``invalid``, naming the first problem.
    """

    def bad(why: str) -> RefusedError:
        return RefusedError(f"malformed model fingerprint: {why}", "invalid")

    if not isinstance(fingerprint, dict):
        raise bad("not a JSON object")
    mode, parts, tensors, hash_ = (fingerprint.get(k) for k in ("mode", "partition", "tensors", "hash"))
    if not isinstance(mode, str) or len(mode) > 64:
        raise bad(f"`mode` {short(mode)} is not a mode name")
    if not isinstance(hash_, str) or len(hash_) > 256:
        raise bad(f"`hash` {short(hash_)} is not a string of at most 256 characters")
    if not isinstance(parts, list) or not 0 < len(parts) <= MAX_BLOCKS:
        raise bad(f"`partition` is not a list of 1..{MAX_BLOCKS} blocks")
    partition = []
    for i, block in enumerate(parts):
        if not isinstance(block, dict) or not isinstance(block.get("params"), list) or not block["params"]:
            raise bad(f"block {i} is not {{name, params}} with a non-empty list of parameter names")
        partition.append(
            {"name": _name(block.get("name"), f"block {i}'s name"), "params": [_name(p, "parameter") for p in block["params"]]}
        )
    if not isinstance(tensors, dict):
        raise bad("`tensors` is not an object of tensor name -> {dtype, shape, nbytes}")
    specs: dict[str, dict[str, Any]] = {}
    for name, spec in tensors.items():
        _name(name, "tensor")
        if not isinstance(spec, dict):
            raise bad(f"tensor {short(name)} has no {{dtype, shape, nbytes}}")
        dtype, shape, nbytes = spec.get("dtype"), spec.get("shape"), spec.get("nbytes")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"tensor {short(name)} has dtype {short(dtype)}; known: {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and 0 <= d < 1 << 48 for d in shape)):
            raise bad(f"tensor {short(name)} has shape {short(shape)}, not a list of at most {MAX_DIMS} sizes")
        if type(nbytes) is not int or nbytes != math.prod(shape) * _itemsize(dtype):
            raise bad(f"tensor {short(name)}: nbytes {short(nbytes)} is not what shape {shape} of {dtype} takes")
        specs[name] = {"dtype": dtype, "shape": list(shape), "nbytes": nbytes}
    params = [p for b in partition for p in b["params"]]
    if set(params) != set(specs):
        missing = sorted(set(params) - set(specs))[:3]
        extra = sorted(set(specs) - set(params))[:3]
        raise bad(f"`tensors` does not list exactly the partition's parameters (missing {short(missing)}, not in a block {short(extra)})")
    try:
        Partition.from_dict(partition)
    except ParaBlockError as exc:
        raise bad(str(exc)) from None
    return {"mode": mode, "partition": partition, "tensors": specs, "hash": hash_}


class Aggregator:
    """Global state and round bookkeeping of a federation.

    Args:
        clients: number of clients.
        rounds: number of rounds.
        schedule: ``ascending``, ``descending``, ``random`` or an explicit list.
        seed: seed of a random schedule and of client sampling.
        server_lr: server learning rate ``eta_g`` (1.0 is FedAvg).
        server_optimizer: the server optimizer per block (its state lives here
            and in the checkpoints); ``None``: SGD at ``server_lr``.
        mode: the federation's mode; clients must run the same.
        assignment: ``shared`` (every client trains ``b_t``) or ``staggered``
            (client ``i`` trains ``(b_t + i) mod M``; each block is aggregated
            over the clients that trained it).
        min_clients: quorum to close a round at ``round_timeout_s``.
        round_timeout_s: close a round this long after its first update if
            the quorum arrived; ``None`` waits for every expected client.
        clients_per_round: sample this many clients per round (seeded).
        aggregation: ``mean`` (weighted FedAvg), or the robust ``median`` /
            ``trimmed_mean`` of the deltas (unweighted; keeps the round's
            updates spooled on disk until it closes).
        trim_fraction: share trimmed at each end by ``trimmed_mean``.
        clip_norm: scale every delta down to this L2 norm before aggregating.
        max_update_norm: refuse updates whose delta has a larger L2 norm.
        checkpoint_dir: where to write the server checkpoint.
        checkpoint_every: write it every this many rounds (0: never).
        on_round_closed: called with the round's record after it closes.
        weighting: the clients' weighting (one of
            :data:`~pl_parablock.core.plan.WEIGHTINGS`); ``uniform`` refuses
            any weight but 1. ``None``: any positive weight up to
            ``max_weight``.
        max_weight: refuse an update whose weight is larger (what a client
            can have seen in a round, see :func:`pl_parablock.recipe.schema.weight_bound`);
            ``None``: :data:`MAX_WEIGHT`.
        gather_s: before every client has joined once, updates are refused
            with "retry" until this many seconds after the first join, so
            that a client starting late starts from round 0 like the others
            (every client's view of the rounds is then the plan's); 0: no wait.
        initial_state_wait_s: the first client's fingerprint is dropped if
            its initial state has not begun to arrive this long after its
            join (or within its join's timeout, if shorter).
        compression: the codecs of the federation: updates compressed with
            another codec are refused; with a lossy download codec each
            round's aggregate is broadcast as ``D = Q(Δ_agg + r_b)`` and the
            global becomes ``g + D`` (its residuals are in the checkpoints).
    """

    def __init__(
        self,
        *,
        clients: int,
        rounds: int,
        schedule: str | list[int] = "ascending",
        seed: int = 0,
        server_lr: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
        mode: str = "parablock",
        assignment: str = "shared",
        min_clients: int | None = None,
        round_timeout_s: float | None = None,
        clients_per_round: int | None = None,
        aggregation: str = "mean",
        trim_fraction: float = 0.1,
        clip_norm: float | None = None,
        max_update_norm: float | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        on_round_closed: Callable[[dict[str, Any]], None] | None = None,
        weighting: str | None = None,
        max_weight: float | None = None,
        initial_state_wait_s: float = 30.0,
        gather_s: float = 0.0,
        compression: Compression = NO_COMPRESSION,
    ) -> None:
        if clients < 1 or rounds < 1:
            raise ValueError("a federation needs at least one client and one round")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, not {server_lr}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {aggregation!r}")
        if weighting is not None and weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
        if max_weight is not None and not 1.0 <= max_weight <= MAX_WEIGHT:
            raise ValueError(f"max_weight must be between 1 and 2**53, not {max_weight}")
        self.clients = clients
        self.rounds = rounds
        self.schedule_kind = schedule
        self.seed = seed
        self.server_lr = server_lr
        self.server_optimizer = server_optimizer
        self.compression = compression
        if server_optimizer is not None and server_optimizer.name != "sgd" and aggregation != "mean":
            raise ValueError(f"the server optimizer {server_optimizer.name} cannot follow aggregation={aggregation}; use mean")
        self.mode = mode
        self.assignment = assignment
        self.clients_per_round = clients_per_round
        # cyclic visits one client per round in turn; otherwise every client or a seeded sample
        cyclic = mode == "cyclic"
        self.participants = (
            [(t % clients,) for t in range(rounds)] if cyclic else sample_participants(clients, rounds, clients_per_round, seed)
        )
        self.min_clients = min(min_clients or clients, min(len(p) for p in self.participants))
        self.round_timeout_s = round_timeout_s
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.clip_norm = clip_norm
        self.max_update_norm = max_update_norm
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.on_round_closed = on_round_closed
        self._sampled = any(len(p) < clients for p in self.participants)
        self.weighting = weighting
        self.initial_state_wait_s = initial_state_wait_s
        self.max_weight = 1.0 if weighting == "uniform" else float(max_weight or MAX_WEIGHT)
        self._ahead = staleness(mode)  # rounds a client may push beyond the first one still open
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex
        self.resumed_from: int | None = None

        self._cond = threading.Condition()
        self._fingerprint: dict[str, Any] | None = None
        self._partition: Partition | None = None
        self._plan: Plan | None = None
        self.gather_s = gather_s
        self._first_join: float | None = None
        self._gathered_once = gather_s <= 0
        self._schedule: list[int] = []
        self._initializer: int | None = None
        self._pending_until = math.inf  # a fingerprint whose initial state has not come is dropped after this
        self._uploads = 0  # initial-state uploads in progress
        self._ready = False
        self._state = GlobalState([])
        self._rounds: dict[int, _Round] = {}
        self._joined: set[int] = set()
        self._left: set[int] = set()
        self._reports: dict[int, dict[str, Any]] = {}
        self._rejected: list[dict[str, Any]] = []
        self._refused_outside = 0
        self._last_close: float | None = None
        self._shutdown = False
        self._checkpoint_lock = threading.Lock()
        # updates are read back, checked and summed by at most this many handler threads at once: the work is
        # CPU-bound, so more would not be faster, and each one holds a piece of its update in memory
        self._work_slots = threading.BoundedSemaphore(WORK_SLOTS)

    # ------------------------------------------------------------------ join

    def join(
        self, client_id: int, fingerprint: Mapping[str, Any], timeout: float, cancelled: threading.Event | None = None
    ) -> dict[str, Any]:
        """Admit a client (first time or again); the first one fixes the federation's model.

        Returns the schedule, the round count, the block versions, the next
        round to train, the participants of each round and whether this
        client must upload the initial state.

        The fingerprint is checked in full (:func:`check_fingerprint`) before
        anything changes, and the federation's mode must be its mode. The
        first fingerprint stays pending until its client's initial state
        arrives: if none begins to arrive within ``timeout`` (at most
        ``initial_state_wait_s``), it is dropped and the next join's is taken; while it is pending, a
        join with another fingerprint is told to retry (``unavailable``)
        rather than refused for good.

        Raises:
            RefusedError: bad client id or fingerprint, mismatching model or
                mode, or the initial state not arriving within ``timeout``
                (or the caller going away: ``cancelled`` set).
        """
        if not 0 <= client_id < self.clients:
            raise RefusedError(
                f"client id {client_id} is outside 0..{self.clients - 1}: this federation has {self.clients} clients", "invalid"
            )
        if not (math.isfinite(timeout) and timeout >= 0):
            raise RefusedError(f"join timeout {timeout!r} is not a number of seconds >= 0", "invalid")
        fp = check_fingerprint(fingerprint)
        if fp["mode"] != self.mode:
            raise RefusedError(
                f"client {client_id} refused: it runs mode={fp['mode']} but the federation runs mode={self.mode}. "
                "Every client must build the same model (same model.config or model.path, blocks and seed)",
                "refused",
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            self._expire_pending()
            if self._fingerprint is None:
                self._set_fingerprint(fp)
                self._initializer = client_id
                self._pending_until = time.monotonic() + min(timeout, self.initial_state_wait_s)
                assert self._partition is not None
                log.info("client %d set the federation's model: %d blocks", client_id, len(self._partition))
            elif not _same_fingerprint(self._fingerprint, fp):
                why = _describe_mismatch(self._fingerprint, fp)
                if not self._ready:
                    raise RefusedError(
                        f"client {client_id}: its model does not match the one client {self._initializer} announced ({why}), "
                        "whose initial state has not arrived; retry later",
                        "unavailable",
                    )
                raise RefusedError(
                    f"client {client_id} refused: its model does not match this federation's: {why}. "
                    "Every client must build the same model (same model.config or model.path, blocks and seed)",
                    "refused",
                )
            need_state = not self._ready and client_id == self._initializer
            while not self._ready and not need_state:
                if self._expire_pending() or self._fingerprint is None:  # the announced state never came: this client's model
                    self._set_fingerprint(fp)
                    self._initializer = client_id
                    self._pending_until = time.monotonic() + min(timeout, self.initial_state_wait_s)
                    need_state = True
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._shutdown or (cancelled is not None and cancelled.is_set()):
                    raise RefusedError(
                        f"client {client_id}: the initial model state from client {self._initializer} did not arrive within {timeout:g} s",
                        "unavailable",
                    )
                self._cond.wait(min(left, 0.5))
            if need_state:  # (again): its state is awaited from now
                self._pending_until = max(self._pending_until, time.monotonic() + min(timeout, self.initial_state_wait_s))
            again = client_id in self._joined
            if again:  # it adopts the current values: it reads no older version
                self._state.release(client_id)
            self._joined.add(client_id)
            if self._first_join is None:
                self._first_join = time.monotonic()
            self._left.discard(client_id)
            if again:
                log.info("client %d joined again; next round %d", client_id, self._next_round())
            return {
                "need_state": need_state,
                "schedule": list(self._schedule),
                "rounds": self.rounds,
                "versions": list(self._state.versions),
                "next_round": self._next_round(),
                "participants": [list(p) for p in self.participants] if self._sampled else None,
                "mode": self.mode,
                "assignment": self.assignment,
                "clients": self.clients,
                "instance": self.instance,
            }

    def _expire_pending(self) -> bool:
        """Drop a fingerprint whose initial state did not come in time (none arriving); caller holds ``_cond``."""
        if self._ready or self._fingerprint is None or self._uploads or time.monotonic() < self._pending_until:
            return False
        warn.warning(
            "initializer",
            "client %s announced the model but sent no initial state in time; the next client's model is taken",
            self._initializer,
        )
        self._fingerprint = self._partition = self._initializer = None
        self._schedule = []
        self._state = GlobalState([])
        self._pending_until = math.inf
        return True

    def _set_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        partition = Partition.from_dict(fingerprint["partition"])
        plan = make_plan(
            self.mode,
            num_blocks=len(partition),
            rounds=self.rounds,
            schedule=self.schedule_kind,
            seed=self.seed,
            clients=self.clients,
            clients_per_round=self.clients_per_round,
            assignment=self.assignment,
        )
        # only now, with everything built, does the federation take it
        self._fingerprint = fingerprint
        self._partition = partition
        self._plan = plan
        self._schedule = list(plan.schedule)
        self._state = GlobalState([{} for _ in partition.blocks], compression=self.compression)

    def begin_upload(self, client_id: int, specs: list[Spec]) -> None:
        """An initial-state upload is about to be read: only from the client asked for it, and exactly the fingerprint's tensors.

        Call :meth:`end_upload` when it is read (or failed). While an upload
        is in progress, the pending fingerprint does not expire.

        Raises:
            RefusedError: nobody joined yet, another client sets the state,
                or the declared tensors differ from the fingerprint's.
        """
        with self._cond:
            if self._fingerprint is None:
                raise RefusedError(f"client {client_id} sent an initial state before joining; join first", "refused")
            if client_id != self._initializer or self._ready:
                raise RefusedError(f"client {client_id} may not set the initial state (client {self._initializer} does)", "refused")
            expected = self._fingerprint["tensors"]
            declared = {s.name: {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "nbytes": s.nbytes} for s in specs}
            if len(declared) != len(specs) or declared != expected:
                missing = sorted(set(expected) - set(declared))[:3]
                differ = sorted(n for n in declared if declared[n] != expected.get(n))[:3]
                raise RefusedError(
                    f"initial state does not match the fingerprint (missing {short(missing)}, unexpected or different {short(differ)})",
                    "invalid",
                )
            self._uploads += 1

    def end_upload(self) -> None:
        with self._cond:
            self._uploads -= 1
            self._pending_until = max(self._pending_until, time.monotonic() + 1.0)
            self._cond.notify_all()

    def set_initial_state(self, client_id: int, tensors: Mapping[str, Tensor] | StagedTensors) -> None:
        """Store the initial global value of every block (from the first client)."""
        with self._cond:
            if self._fingerprint is None or client_id != self._initializer:
                raise RefusedError(f"client {client_id} may not set the initial state (client {self._initializer} does)", "refused")
            if self._ready:
                return
            specs = self._fingerprint["tensors"]
        loaded = dict(tensors) if isinstance(tensors, Mapping) else dict(iter(tensors))
        if set(loaded) != set(specs):
            missing = sorted(set(specs) - set(loaded))[:3]
            extra = sorted(set(loaded) - set(specs))[:3]
            raise RefusedError(f"initial state does not match the fingerprint (missing {missing}, unexpected {extra})", "invalid")
        for name, t in loaded.items():
            if [str(t.dtype).removeprefix("torch."), list(t.shape)] != [specs[name]["dtype"], specs[name]["shape"]]:
                raise RefusedError(f"initial tensor {name!r} does not match the fingerprint", "invalid")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise RefusedError(f"initial tensor {name!r} holds NaN or infinite values", "invalid")
        with self._cond:
            assert self._partition is not None
            if not self._ready:
                self._state = GlobalState([{n: loaded[n] for n in b.params} for b in self._partition.blocks], compression=self.compression)
                self._ready = True
            self._cond.notify_all()
        self._checkpoint_if_due(None)

    # ---------------------------------------------------------------- updates

    def state_nbytes(self) -> int | None:
        """Bytes of the whole initial state, once the fingerprint is known."""
        with self._cond:
            if self._fingerprint is None:
                return None
            return sum(int(s["nbytes"]) for s in self._fingerprint["tensors"].values())

    def block_nbytes(self, block: int) -> int:
        """Bytes of a block at float32 or its own dtype, whichever is larger (bound on an update)."""
        assert self._fingerprint is not None and self._partition is not None
        specs = self._fingerprint["tensors"]
        return sum(math.prod(specs[n]["shape"]) * max(4, _itemsize(specs[n]["dtype"])) for n in self._partition.blocks[block].params)

    def expected_block(self, round_index: int, client_id: int | None = None) -> int:
        """The block ``client_id`` trains in round ``round_index`` (the schedule's ``b_t`` without a client)."""
        with self._cond:
            if not self._ready:
                raise RefusedError("the federation has no initial state yet; join first", "unavailable")
            if not 0 <= round_index < self.rounds:
                raise RefusedError(f"round {round_index} is outside 0..{self.rounds - 1}", "invalid")
            return self._block_for(client_id, round_index) if client_id is not None else self._schedule[round_index]

    def _gathered(self) -> bool:
        """Every client joined once, or ``gather_s`` passed since the first join (caller holds ``_cond``)."""
        if not self._gathered_once:
            waited = self._first_join is not None and time.monotonic() - self._first_join >= self.gather_s
            self._gathered_once = len(self._joined) >= self.clients or waited
        return self._gathered_once

    def _block_for(self, client: int, round_index: int) -> int:
        assert self._plan is not None
        return self._plan.block_for(client, round_index)

    def refuse(self, record: dict[str, Any], reason: str, rnd: _Round | None = None) -> dict[str, Any]:
        """Record a refused update (it shows in the report) and return the reply.

        At most :data:`MAX_RECORDED_REJECTIONS` refusals are kept with their
        reasons per round (and outside rounds); the rest are counted only.
        Warnings are rate-limited per client.
        """
        record = {k: (v if isinstance(v, int) and not isinstance(v, bool) else short(v, 40)) for k, v in record.items()}
        entry = {**record, "reason": reason, "at": time.time() - self.started_at}
        with self._cond:
            if rnd is not None:
                rnd.refused += 1
                if len(rnd.rejected) < MAX_RECORDED_REJECTIONS:
                    rnd.rejected.append(entry)
            else:
                self._refused_outside += 1
                if len(self._rejected) < MAX_RECORDED_REJECTIONS:
                    self._rejected.append(entry)
        client = record.get("client")
        warn.warning(f"client {client}", "refused update from client %s for round %s: %s", client, record.get("round"), reason)
        return {"accepted": False, "status": "rejected", "reason": reason}

    def precheck(self, header: Mapping[str, Any], specs: list[Spec] | None = None) -> dict[str, Any] | None:
        """Check an update's header before its body is read.

        Returns ``None`` when the body should be read, or the reply to send
        without reading it (refused, duplicate or late).
        """
        try:
            client = _strict_int(header["client_id"])
            rnd_i = _strict_int(header["round"])
            block = _strict_int(header["block"])
            kind = header["kind"]
            base = _strict_int(header.get("base_version", -1))
            weight = header["weight"]
            codec = header.get("codec", "none")
            if not isinstance(kind, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)) or not isinstance(codec, str):
                raise TypeError("`kind` and `codec` must be strings and `weight` a number")
            weight = float(weight)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return self.refuse({"client": header.get("client_id"), "round": header.get("round")}, f"malformed update header ({short(exc)})")
        record = {"client": client, "round": rnd_i, "block": block}
        with self._cond:
            if client not in self._joined:
                return self.refuse(record, f"client {client} has not joined")
            if not self._ready:
                return self.refuse(record, "no initial state yet")
            if not 0 <= rnd_i < self.rounds:
                return self.refuse(record, f"round {rnd_i} is outside 0..{self.rounds - 1}")
            if not self._gathered():
                return {
                    "accepted": False,
                    "status": "waiting",
                    "reason": f"waiting for every client to join ({len(self._joined)} of {self.clients})",
                    "retry": True,
                }
            if rnd_i > self._next_round() + self._ahead:
                return self.refuse(record, f"round {rnd_i} is not open: the federation is at round {self._next_round()}")
            if block != self._block_for(client, rnd_i):
                return self.refuse(record, f"round {rnd_i} trains block {self._block_for(client, rnd_i)} for client {client}, not {block}")
            if client not in self.participants[rnd_i]:
                return self.refuse(record, f"client {client} is not sampled for round {rnd_i}")
            rnd = self._round(rnd_i)
            if client in rnd.clients:
                return {"accepted": True, "status": "duplicate", "reason": "duplicate: already applied"}
            if rnd.closed:
                rnd.late += 1
                log.info("late update from client %d for closed round %d dropped", client, rnd_i)
                return {"accepted": False, "status": "late", "reason": f"late: round {rnd_i} already closed"}
            version = self._state.versions[block]
            current = self._state.values[block]
        if kind not in ("value", "delta"):
            return self.refuse(record, f"unknown update kind {short(kind)}", rnd)
        accepted = self.compression.upload.name
        if codec != accepted:
            return self.refuse(
                record,
                f"the update is compressed with {short(codec)}; this federation accepts {accepted!r} (federation.compression.codec)",
                rnd,
            )
        if self.compression.lossy_upload and kind != "delta":
            return self.refuse(record, f"a {accepted} update must be a delta, not a {short(kind)}", rnd)
        if not (weight > 0 and math.isfinite(weight)):
            return self.refuse(record, f"weight {weight!r} is not a positive number", rnd)
        if weight > self.max_weight or (self.weighting == "uniform" and weight != 1.0):
            return self.refuse(record, self._weight_problem(weight), rnd)
        if kind == "value" and base != version:
            return self.refuse(
                record, f"stale base: the client started from version {base} of block {block}, the server holds {version}", rnd
            )
        if specs is not None:
            if self.compression.lossy_upload:
                shapes = {n: tuple(t.shape) for n, t in current.items()}
                problem = block_problem(self.compression.upload, [(s.name, s.dtype, s.shape) for s in specs], shapes)
            else:
                problem = _check_specs(current, specs, exact_dtype=(kind == "value"))
            if problem:
                return self.refuse(record, problem, rnd)
        return None

    def _open_update(
        self, header: Mapping[str, Any], specs: list[Spec]
    ) -> dict[str, Any] | tuple[int, str, float, _Round, int, dict[str, Tensor], dict[str, Any]]:
        """:meth:`precheck`'s reply, or what summing the update needs: client, kind, weight, round, block, global value, record."""
        early = self.precheck(header, specs)
        if early is not None:
            return early
        client, rnd_i, kind, weight = int(header["client_id"]), int(header["round"]), str(header["kind"]), float(header["weight"])
        with self._cond:
            rnd = self._round(rnd_i)
            block = self._block_for(client, rnd_i)
            current = self._state.values[block]
        return client, kind, weight, rnd, block, current, {"client": client, "round": rnd_i, "block": block}

    def _weight_problem(self, weight: float) -> str:
        if self.weighting == "uniform":
            return f"weight {weight:g} is not 1: this federation weighs clients uniformly (federation.weighting=uniform)"
        what = f"federation.weighting={self.weighting}" if self.weighting else "this federation"
        return (
            f"weight {weight:g} exceeds the bound {self.max_weight:g} of {what}: more than a client can have seen in a round "
            "(raise federation.max_weight if a client legitimately sees more, e.g. one spanning several devices)"
        )

    def _round(self, index: int) -> _Round:
        rnd = self._rounds.get(index)
        if rnd is None:
            assert self._plan is not None
            steps = {b: RoundStep(index, b, self.server_lr, self.server_optimizer) for b in self._plan.blocks_of(index)}
            rnd = self._rounds[index] = _Round(index, self._schedule[index], self.participants[index], steps)
        return rnd

    @property
    def streams(self) -> bool:
        """Whether updates are checked and summed as they arrive (:meth:`receive`).

        Weighted ``mean`` aggregation without ``clip_norm`` and without a
        lossy upload codec. With ``clip_norm`` an update's scale is known
        only once its norm is, at its end; ``median`` / ``trimmed_mean``
        keep every update until the round closes; a compressed update is
        decoded whole: those spool each update whole and read it back
        (:meth:`submit` with :class:`~pl_parablock.wire.framing.StagedTensors`).
        """
        return self.aggregation == "mean" and self.clip_norm is None and not self.compression.lossy_upload

    def receive(self, header: Mapping[str, Any], specs: list[Spec], feed: Feed) -> dict[str, Any]:
        """Check and sum one client's update as it arrives; returns the reply (as :meth:`submit`).

        ``feed(consume, spool)`` delivers the update: ``spool(chunk)`` with
        every body chunk as it comes, then ``consume(name, start, values)``
        with its elements (flat, any float dtype, none crossing a multiple of
        :data:`~pl_parablock.core.aggregate.PIECE_ELEMS`), in any order and cut;
        it may raise (a cut or corrupt stream) after part was consumed.

        Every piece is checked (finite values; the norm bound as the squared
        norm grows) and added to the round's float64 sums at once, under the
        round's lock for that piece only. The server never holds the update:
        one piece at a time, and its bytes in an unnamed temporary file. An
        update refused, cut short, superseded or overtaken by its round's
        close after some of it was summed is rolled back: every piece of the
        sums it touched is rebuilt from the other updates' spooled segments
        in the order they were added, bitwise what the sums would hold had it
        never arrived (no subtraction, which large values would make
        inexact). Needs :attr:`streams`.
        """
        if not self.streams:
            raise FederationError("this aggregator keeps whole updates (clip_norm or robust aggregation): use submit")
        opened = self._open_update(header, specs)
        if isinstance(opened, dict):
            return opened
        client, kind, weight, rnd, block, current, record = opened
        rnd_i = rnd.index
        up = _Upload(rnd, client, block, kind, weight, specs, current)
        try:
            with rnd.lock:
                if client in rnd.clients:
                    return {"accepted": True, "status": "duplicate", "reason": "duplicate: already applied"}
                if rnd.closed:
                    rnd.late += 1
                    return {"accepted": False, "status": "late", "reason": f"late: round {rnd_i} already closed"}
                older = rnd.streaming.pop(client, None)
                if older is not None:  # a retry while the first try still streams (its connection died): the newer one counts
                    older.aborted = "superseded"
                    self._rollback(rnd, older)
                # the round's last update, with no other arriving, never needs to be replayed (a rollback replays the
                # *others'* segments, and no other update can come after it): only the others are spooled
                if rnd.streaming or not set(rnd.expected) <= {*rnd.clients, client}:
                    up.keep_spool()
                rnd.streaming[client] = up
            try:
                feed(lambda name, start, values: self._consume(up, name, start, values), up.write)
            except _Refusal as exc:
                self._drop(up)
                return self.refuse(record, str(exc), rnd)
            except _Aborted:
                return self._aborted_reply(up, rnd_i)
            except BaseException:
                self._drop(up)
                raise
            norm = math.sqrt(up.sq)
            complete = False
            with rnd.lock:
                if up.aborted:
                    return self._aborted_reply(up, rnd_i)
                rnd.streaming.pop(client, None)
                rnd.steps[block].acc.commit(weight, kind)
                rnd.spooled.append(up)
                rnd.work_s += up.work_s
                norm_seen = norm if self.max_update_norm is not None else None
                complete = _arrived(rnd, client, header, weight, kind, norm_seen, clipped=False)
        finally:
            if up not in rnd.spooled:
                up.close()
        return self._accepted(rnd, complete)

    def _accepted(self, rnd: _Round, complete: bool) -> dict[str, Any]:
        """Close the round if this update completed it, else wake its waiters; the reply to an accepted update."""
        if complete:
            self._close(rnd, "all clients arrived")
        else:
            with self._cond:
                self._cond.notify_all()
        return {"accepted": True, "status": "accepted", "reason": "accepted"}

    def _aborted_reply(self, up: _Upload, rnd_i: int) -> dict[str, Any]:
        if up.aborted == "late":
            return {"accepted": False, "status": "late", "reason": f"late: round {rnd_i} closed while the update arrived"}
        return {"accepted": False, "status": "superseded", "reason": "a newer upload of the same update replaced this one", "retry": True}

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
            if self.max_update_norm is not None:
                d = values.to(torch.float64, copy=True)
                if up.kind == "value":
                    d -= _global_piece(up.current, name, start, count)
                up.sq += float(d.square().sum())
                norm = math.sqrt(up.sq)
                if norm > self.max_update_norm:  # it only grows: refused as soon as it passes the bound
                    raise _Refusal(f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:g}")
            i, off = divmod(start, PIECE_ELEMS)
            with rnd.lock:
                if up.aborted:
                    raise _Aborted
                rnd.steps[up.block].acc.add_segment(up.kind, name, min(PIECE_ELEMS, g.numel() - i * PIECE_ELEMS), start, values, up.weight)
                rnd.log.setdefault((up.block, up.kind, name, i), []).append(_Entry(up, off, count))
                up.touched[(name, i)] = None
        up.work_s += time.perf_counter() - t0

    def _drop(self, up: _Upload) -> None:
        """Take a streaming update that will not count out of its round (rolling back what it added)."""
        rnd = up.rnd
        with rnd.lock:
            if up.aborted:
                return
            up.aborted = "dropped"
            if rnd.streaming.get(up.client) is up:
                del rnd.streaming[up.client]
            t0 = time.perf_counter()
            self._rollback(rnd, up)
            rnd.work_s += up.work_s + time.perf_counter() - t0

    def _rollback(self, rnd: _Round, up: _Upload) -> None:
        """Rebuild every piece of the sums ``up`` touched without it (caller holds ``rnd.lock``).

        Each piece is formed again from ``-0.0`` by the other updates'
        segments in the order they were first added, read from their
        spools: the same additions, so bitwise what the piece would hold had
        ``up`` never arrived.
        """
        if not up.touched:
            return
        acc = rnd.steps[up.block].acc
        for name, i in up.touched:
            key = (up.block, up.kind, name, i)
            entries = [e for e in rnd.log.get(key, []) if e.upload is not up]
            old = acc.piece(up.kind, name, i)
            if not entries or old is None:
                rnd.log.pop(key, None)
                acc.replace_piece(up.kind, name, i, None)
                if old is not None:
                    PIECES.give(old)
                continue
            rnd.log[key] = entries
            piece = PIECES.take(old.numel()).fill_(-0.0)
            for e in entries:
                u = e.upload
                values = u.read(name, i * PIECE_ELEMS + e.off, e.count)
                piece[e.off : e.off + e.count].add_(values.to(torch.float64), alpha=u.weight)
            acc.replace_piece(up.kind, name, i, piece)
            PIECES.give(old)
            del old
        up.touched.clear()
        log.info("round %d: rolled back client %d's partial update (%s)", rnd.index, up.client, up.aborted)

    def submit(self, header: Mapping[str, Any], tensors: StagedTensors | Mapping[str, Tensor]) -> dict[str, Any]:
        """Validate one client's update and add it to its round.

        Takes ownership of ``tensors`` (closed when no longer needed). Returns
        the reply: ``accepted``, ``status`` (accepted, duplicate, late,
        rejected) and ``reason``.
        """
        if self.streams and not isinstance(tensors, StagedTensors):
            flat = {n: t.detach().to("cpu").contiguous().reshape(-1) for n, t in tensors.items()}
            try:
                specs = check_specs(tensor_specs(tensors), None)
            except FederationError as exc:
                return self.refuse({"client": header.get("client_id"), "round": header.get("round")}, str(exc))

            def feed(consume: Consume, spool: Callable[[memoryview], None]) -> None:
                for name, t in flat.items():
                    if t.numel():
                        spool(memoryview(t.view(torch.uint8).numpy()).cast("B"))  # type: ignore[arg-type]
                    for start in range(0, t.numel(), PIECE_ELEMS):
                        consume(name, start, t[start : start + PIECE_ELEMS])

            return self.receive(header, specs, feed)
        staged = tensors if isinstance(tensors, StagedTensors) else StagedTensors.from_tensors(tensors)
        keep = False
        try:
            opened = self._open_update(header, staged.specs)
            if isinstance(opened, dict):
                return opened
            client, kind, weight, rnd, block, current, record = opened
            rnd_i = rnd.index
            if self.compression.lossy_upload:  # the parts of a compressed delta: decoded whole (one block of float32) before any check
                try:
                    dense = decode_update(self.compression, str(header.get("codec")), dict(iter(staged)), current)
                except CodecError as exc:
                    return self.refuse(record, f"corrupt compressed update: {exc}", rnd)
                staged.close()
                staged = StagedTensors.from_tensors(dense)
            need_norm = self.max_update_norm is not None or self.clip_norm is not None
            t0 = time.perf_counter()
            with self._work_slots:
                problem, norm = _check_values(current, staged, kind, need_norm)
            checked_s = time.perf_counter() - t0
            if problem:
                return self.refuse(record, problem, rnd)
            if self.max_update_norm is not None and norm > self.max_update_norm:
                return self.refuse(record, f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:g}", rnd)
            scale = clip_factor(norm, self.clip_norm)
            complete = False
            with self._work_slots, rnd.lock:
                t0 = time.perf_counter()
                if client in rnd.clients:
                    return {"accepted": True, "status": "duplicate", "reason": "duplicate: already applied"}
                if rnd.closed:
                    rnd.late += 1
                    return {"accepted": False, "status": "late", "reason": f"late: round {rnd_i} already closed"}
                if self.aggregation == "mean":
                    if kind == "value" and scale == 1.0:
                        rnd.steps[block].add_pieces(staged.pieces(PIECE_ELEMS), weight, "value")
                    else:
                        rnd.steps[block].add_pieces(_deltas(staged, current, kind), weight, "delta", scale)
                else:
                    rnd.kept[client] = _Update(staged, weight, kind, scale)
                    keep = True
                rnd.work_s += checked_s + time.perf_counter() - t0
                complete = _arrived(rnd, client, header, weight, kind, norm if need_norm else None, clipped=scale < 1.0)
            return self._accepted(rnd, complete)
        finally:
            if not keep:
                staged.close()

    def _aggregate(self, rnd: _Round, block: int, current: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.aggregation == "mean":
            step = rnd.steps[block]
            return step.close(current) if step.count else current  # a block nobody trained keeps its value
        # a piece of every kept update at a time: memory O(clients x piece + block), not O(clients x block)
        out = {name: assemble(g, self._robust_pieces(rnd, name, g)) for name, g in current.items()}
        for u in rnd.kept.values():
            u.source.close()
        rnd.kept.clear()
        return out

    def _robust_pieces(self, rnd: _Round, name: str, g: Tensor) -> Iterator[Tensor]:
        for _, start, g_piece in pieces_of({name: g}):
            g64 = g_piece.to(torch.float64)
            deltas = []
            for u in rnd.kept.values():
                t = u.source.read(name, start, g64.numel()).to(torch.float64)
                deltas.append((t - g64 if u.kind == "value" else t) * u.scale)
            yield g64 + self.server_lr * robust_mean(deltas, self.aggregation, self.trim_fraction)

    def _close(self, rnd: _Round, reason: str) -> None:
        with rnd.lock:
            if rnd.closed:
                return
            t0 = time.perf_counter()
            for up in list(rnd.streaming.values()):  # still arriving: not part of this round (their senders hear "late")
                up.aborted = "late"
                rnd.late += 1
                self._rollback(rnd, up)
            rnd.streaming.clear()
            new = {}
            for block in rnd.steps:
                with self._cond:
                    current = self._state.values[block]
                new[block] = self._aggregate(rnd, block, current)
            for up in rnd.spooled:
                up.close()
            rnd.spooled.clear()
            rnd.log.clear()
            # all the server's work on the round's updates: checking and summing each (as it arrived, or read
            # back), rolling back refused ones, and forming the new value
            rnd.aggregation_s = rnd.work_s + time.perf_counter() - t0
            rnd.closed_at = time.time()
            rnd.reason = reason
            for block, value in new.items():
                with self._cond:
                    problem = self._state.install(rnd.index, block, value, readers=self._joined - self._left)
                    self._last_close = time.monotonic()
                if problem:
                    rnd.rejected.append({"round": rnd.index, "block": block, "reason": problem, "at": time.time() - self.started_at})
                    log.error("round %d: %s", rnd.index, problem)
            self._checkpoint_if_due(rnd)
            rnd.closed = True
        with self._cond:
            self._cond.notify_all()
        record = self._round_record(rnd)
        log.info("round %d closed (%s): block %d, %d/%d clients", rnd.index, reason, rnd.block, len(rnd.clients), len(rnd.expected))
        if self.on_round_closed is not None:
            try:
                self.on_round_closed(record)
            except Exception:  # a progress printer must not break the federation
                log.exception("on_round_closed callback failed")

    def _due_rounds(self) -> list[_Round]:
        if self.round_timeout_s is None:
            return []
        now = time.monotonic()
        return [
            r
            for r in self._rounds.values()
            if not r.closed
            and r.first_arrival is not None
            and now - r.first_arrival >= self.round_timeout_s
            and len(r.clients) >= min(self.min_clients, len(r.expected))
        ]

    def wait_round(self, round_index: int, timeout: float, cancelled: threading.Event | None = None) -> bool:
        """Wait until round ``round_index`` is aggregated; ``False`` on timeout, shutdown or ``cancelled``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                rnd = self._rounds.get(round_index)
                if rnd is not None and rnd.closed:
                    return True
                if self._shutdown or (cancelled is not None and cancelled.is_set()):
                    return False
                due = self._due_rounds()
                left = deadline - time.monotonic()
                if not due:
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.5))
            for r in due:
                self._close(r, f"timeout after {self.round_timeout_s:g} s with {len(r.clients)} of {len(r.expected)} clients")

    def block_value(self, block: int) -> tuple[int, dict[str, Tensor]]:
        """Current version and global value of a block (do not modify the tensors)."""
        with self._cond:
            if not self._ready:
                raise RefusedError("the federation has no initial state yet", "unavailable")
            if not 0 <= block < len(self._state.values):
                raise RefusedError(f"block {block} is outside 0..{len(self._state.values) - 1}", "invalid")
            return self._state.versions[block], self._state.values[block]

    def round_value(self, round_index: int, client_id: int | None = None) -> tuple[int, dict[str, Tensor]]:
        """Version ``round_index`` of the round's block, once the round is aggregated (do not modify the tensors).

        Raises:
            RefusedError: code ``superseded`` when a later round of the block
                replaced that version and it is no longer held.
        """
        version, values, _ = self.round_answer(round_index, client_id, delta=False)
        return version, values

    def round_answer(
        self, round_index: int, client_id: int | None = None, *, delta: bool = True
    ) -> tuple[int, dict[str, Tensor], dict[int, int] | None]:
        """:meth:`round_value`, or, with ``delta`` and a lossy download codec, the compressed broadcast ``D`` of the round.

        Returns the version, the tensors (values, or the parts of ``D``) and,
        for ``D``, the version of each block it applies to (``None``: values).
        """
        self.expected_block(round_index)
        with self._cond:
            assert self._plan is not None
            blocks = self._plan.blocks_of(round_index)
            try:
                values = [self._state.value_at(b, round_index, reader=client_id) for b in blocks]
            except Superseded as exc:
                raise RefusedError(str(exc), "superseded") from None
            sent = [self._state.broadcast_at(b, round_index) for b in blocks] if delta else []
            if sent and all(x is not None for x in sent):
                parts = {n: t for x in sent if x is not None for n, t in x[1].items()}
                return round_index, parts, {b: x[0] for b, x in zip(blocks, sent) if x is not None}
            return round_index, {n: t for blk in values for n, t in blk.items()}, None

    def round_shapes(self, round_index: int) -> dict[str, list[int]]:
        """The shape of every tensor of the blocks round ``round_index`` moves."""
        with self._cond:
            assert self._plan is not None
            return {n: list(t.shape) for b in self._plan.blocks_of(round_index) for n, t in self._state.values[b].items()}

    def versions(self) -> list[int]:
        with self._cond:
            return list(self._state.versions)

    def _next_round(self) -> int:
        return next((r for r in range(self.rounds) if r not in self._rounds or not self._rounds[r].closed), self.rounds)

    def next_round(self) -> int:
        """The first round not yet aggregated (``rounds`` when all are)."""
        with self._cond:
            return self._next_round()

    @property
    def schedule(self) -> list[int]:
        with self._cond:
            return list(self._schedule)

    @property
    def partition(self) -> Partition | None:
        return self._partition

    def global_state(self) -> dict[str, Tensor]:
        """All global tensors by name (references; do not modify)."""
        with self._cond:
            return {n: t for blk in self._state.values for n, t in blk.items()}

    # ------------------------------------------------------------ departures

    def leave(self, client_id: int, report: Mapping[str, Any] | None) -> None:
        """A client is done; its report (per-round records, final metrics) is kept, replacing an earlier one.

        Raises:
            RefusedError: the client never joined (nothing is kept).
        """
        with self._cond:
            if client_id not in self._joined:
                raise RefusedError(f"client {short(client_id, 40)} has not joined; nothing to leave", "refused")
            if report:
                self._reports[client_id] = dict(report)
            self._left.add(client_id)
            self._state.release(client_id)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiter to look again (a caller went away)."""
        with self._cond:
            self._cond.notify_all()

    def wait_finished(self, timeout: float, grace_s: float = 30.0) -> bool:
        """Wait until every round is closed and every joined client left.

        A client that has not left ``grace_s`` seconds after the last round
        closed is counted as dropped. ``False`` on timeout or shutdown.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = self._next_round() >= self.rounds
                if done and self._joined and self._joined <= self._left:
                    return True
                if done and self._last_close is not None and time.monotonic() - self._last_close >= grace_s:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._shutdown:
                    return False
                self._cond.wait(min(left, 0.5))

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._next_round() >= self.rounds

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._shutdown

    def shutdown(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    # ------------------------------------------------------------ checkpoints

    def _checkpoint_if_due(self, rnd: _Round | None) -> None:
        if not self.checkpoint_dir or self.checkpoint_every <= 0:
            return
        if rnd is not None and (rnd.index + 1) % self.checkpoint_every and rnd.index != self.rounds - 1:
            return
        self.save_checkpoint(self.checkpoint_dir, extra_closed=rnd)

    def save_checkpoint(self, directory: str, extra_closed: _Round | None = None) -> str:
        """Write the global state, versions, closed rounds and schedule atomically.

        The tensors go to a new ``globals-*.safetensors`` file, then
        ``state.json`` is replaced in one rename, so a crash at any point
        leaves the previous checkpoint whole. Returns the state file's path.
        """
        with self._checkpoint_lock:
            with self._cond:
                if self._fingerprint is None or not self._ready:
                    raise FederationError("nothing to checkpoint before the first client joined")
                closed = [r for r in self._rounds.values() if r.closed or r is extra_closed]
                tensors = {n: t for blk in self._state.values for n, t in blk.items()}
                if self.server_optimizer is not None:
                    tensors.update({OPT_PREFIX + k: t.clone() for k, t in self.server_optimizer.state_tensors().items()})
                if self._state.downlink is not None:
                    tensors.update(self._state.downlink.state_tensors(RESIDUAL_PREFIX))
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "params": self._params(),
                    "fingerprint": self._fingerprint,
                    "initializer": self._initializer,
                    "versions": list(self._state.versions),
                    "rounds": [self._round_record(r) for r in sorted(closed, key=lambda r: r.index)],
                    "joined": sorted(self._joined),
                    "left": sorted(self._left),
                    "reports": {str(k): v for k, v in self._reports.items()},
                    "rejected": list(self._rejected),
                    "started_at": self.started_at,
                }
            os.makedirs(directory, exist_ok=True)
            upto = max((r.index for r in closed), default=-1)
            name = f"globals-{upto + 1:06d}.safetensors"
            tmp = os.path.join(directory, name + ".tmp")
            save_file({n: t.contiguous() for n, t in tensors.items()}, tmp)
            os.replace(tmp, os.path.join(directory, name))
            state["globals"] = name
            path = os.path.join(directory, "state.json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
            for old in os.listdir(directory):
                if old.startswith("globals-") and old != name:
                    os.remove(os.path.join(directory, old))
            log.info("server checkpoint written: %d rounds closed", len(closed))
            return path

    def _params(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "rounds": self.rounds,
            "schedule": self.schedule_kind,
            "seed": self.seed,
            "server_lr": self.server_lr,
            "server_optimizer": _describe_optimizer(self.server_optimizer),
            "mode": self.mode,
            "assignment": self.assignment,
            "clients_per_round": self.clients_per_round,
            "compression": _describe_compression(self.compression),
        }

    def load_checkpoint(self, directory: str) -> int:
        """Resume from a checkpoint written by :meth:`save_checkpoint`; returns the next round.

        Raises:
            FederationError: the checkpoint is unreadable, corrupt, or was
                written for a different federation (recipe).
        """
        path = os.path.join(directory, "state.json")
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            tensors = load_file(os.path.join(directory, state["globals"]))
        except Exception as exc:  # any failure to read it back means the checkpoint is unusable
            raise FederationError(
                f"server checkpoint in {directory} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
                "move it away to start the federation afresh"
            ) from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise FederationError(
                f"server checkpoint in {directory} has format {state.get('format')}, this version reads {CHECKPOINT_FORMAT}"
            )
        params = self._params()
        # keys added after the first checkpoints: a checkpoint without them ran their defaults
        legacy = {
            "assignment": "shared",
            "server_optimizer": _describe_optimizer(make_server_optimizer("sgd", lr=self.server_lr)),
            "compression": _describe_compression(NO_COMPRESSION),
        }
        saved = {k: state["params"].get(k, legacy.get(k)) for k in params}
        diff = {k: (saved[k], v) for k, v in params.items() if saved[k] != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in diff.items())
            raise FederationError(
                f"server checkpoint in {directory} belongs to another federation ({what}); use its recipe or another output_dir"
            )
        with self._cond:
            self._set_fingerprint(state["fingerprint"])
            assert self._partition is not None
            specs = self._fingerprint["tensors"]  # type: ignore[index]
            opt_state = {k.removeprefix(OPT_PREFIX): t for k, t in tensors.items() if k.startswith(OPT_PREFIX)}
            residuals = {k: t for k, t in tensors.items() if k.startswith(RESIDUAL_PREFIX)}
            tensors = {k: t for k, t in tensors.items() if not k.startswith((OPT_PREFIX, RESIDUAL_PREFIX))}
            if self.server_optimizer is not None:
                self.server_optimizer.load_state_tensors(opt_state)
            if set(tensors) != set(specs):
                raise FederationError(f"server checkpoint in {directory} is corrupt: its tensors do not match its fingerprint")
            self._state.restore([{n: tensors[n] for n in b.params} for b in self._partition.blocks], state["versions"])
            if self._state.downlink is not None:
                self._state.downlink.load_state_tensors(residuals, RESIDUAL_PREFIX)
            self._initializer = state["initializer"]
            self._ready = True
            for rec in state["rounds"]:
                rnd = self._round(int(rec["round"]))
                rnd.closed = True
                rnd.clients = {int(c): {"weight": None, "kind": None, "loss": None} for c in rec["clients"]}
                rnd.late = int(rec.get("late", 0))
                rnd.rejected = list(rec.get("rejections", []))
                rnd.aggregation_s = float(rec.get("aggregation_s") or 0.0)
                rnd.reason = str(rec.get("close_reason", ""))
                rnd.closed_at = self.started_at + float(rec["closed_at"]) if rec.get("closed_at") is not None else None
                rnd.restored_loss = rec.get("loss")
            self._joined = set(state.get("joined", []))
            self._left = set(state.get("left", []))
            self._reports = {int(k): v for k, v in state.get("reports", {}).items()}
            self._rejected = list(state.get("rejected", []))
            self._gathered_once = True  # the federation had started
            self.resumed_from = self._next_round()
            return self.resumed_from

    # ---------------------------------------------------------------- report

    def _round_record(self, rnd: _Round) -> dict[str, Any]:
        losses = [(c["weight"], c["loss"]) for c in rnd.clients.values() if c.get("loss") is not None and c.get("weight")]
        total = sum(w for w, _ in losses)
        loss = sum(w * v for w, v in losses) / total if total > 0 else rnd.restored_loss
        return {
            "round": rnd.index,
            "block": rnd.block,
            "blocks": sorted(rnd.steps),
            "expected": len(rnd.expected),
            "expected_clients": list(rnd.expected),
            "arrived": len(rnd.clients),
            "rejected": max(rnd.refused, len(rnd.rejected)),
            "late": rnd.late,
            "aggregation_s": rnd.aggregation_s,
            "closed_at": rnd.closed_at - self.started_at if rnd.closed_at else None,
            "close_reason": rnd.reason,
            "loss": loss,
            "clients": sorted(rnd.clients),
            "clipped": sorted(c for c, v in rnd.clients.items() if v.get("clipped")),
            "rejections": [dict(r) for r in rnd.rejected],
        }

    def report(self) -> dict[str, Any]:
        """The server's view of the run: rounds, rejections, client reports, dropped clients."""
        with self._cond:
            rounds = [self._round_record(self._rounds[i]) for i in sorted(self._rounds) if self._rounds[i].closed]
            return {
                "mode": self.mode,
                "clients": self.clients,
                "rounds_planned": self.rounds,
                "schedule": list(self._schedule),
                "blocks": self._partition.to_dict() if self._partition else [],
                "server_lr": self.server_lr,
                "server_optimizer": _describe_optimizer(self.server_optimizer),
                "aggregation": self.aggregation,
                "compression": _describe_compression(self.compression),
                "rounds": rounds,
                "rejected_outside_rounds": list(self._rejected),
                "rejected_outside_rounds_count": max(self._refused_outside, len(self._rejected)),
                "client_reports": {str(k): v for k, v in sorted(self._reports.items())},
                "joined": sorted(self._joined),
                "dropped": sorted(self._joined - self._left),
                "resumed_from_round": self.resumed_from,
                "started_at": self.started_at,
                "globals_sha256": digest({n: t for blk in self._state.values for n, t in blk.items()}) if self._ready else None,
            }


def _describe_optimizer(opt: ServerOptimizer | None) -> dict[str, Any] | None:
    if opt is None:
        return None
    return {"name": opt.name, "lr": opt.lr, "betas": [opt.beta1, opt.beta2], "tau": opt.tau}


def _describe_compression(compression: Compression) -> dict[str, Any]:
    return {
        "upload": compression.upload.describe(),
        "download": compression.download.describe(),
        "error_feedback": compression.error_feedback,
    }


def _arrived(rnd: _Round, client: int, header: Mapping[str, Any], weight: float, kind: str, norm: float | None, *, clipped: bool) -> bool:
    """Record an accepted update in its round (under ``rnd.lock``); whether every expected client has now arrived."""
    loss = header.get("loss")
    rnd.clients[client] = {
        "weight": weight,
        "kind": kind,
        "loss": loss if isinstance(loss, (int, float)) else None,
        "norm": norm,
        "clipped": clipped,
    }
    if rnd.first_arrival is None:
        rnd.first_arrival = time.monotonic()
    return len(rnd.clients) >= len(rnd.expected)


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
    for name, start, t in staged.pieces(PIECE_ELEMS):
        yield name, start, (t.to(torch.float64) - _global_piece(current, name, start, t.numel())) if kind == "value" else t
