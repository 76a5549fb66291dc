"""The server's state of a federation: one coordinator over the pieces that each own one job.

:class:`Aggregator` is what the protocol handlers
(:class:`~pl_parablock.server.service.FederationService`), the launcher and
the tests call. It owns no file or socket and forms no aggregate itself: it
takes the federation's lock, asks the piece that owns the job, and passes
what that piece hands back to the next one.

* :mod:`~pl_parablock.server.admission`: joins and fingerprints (the first
  client sets the federation's model and its plan), the initial state, the
  gather window, leaves.
* :mod:`~pl_parablock.server.validation`: whole-update checks (header,
  codec, weight bound, declared tensors, values, norm).
* :mod:`~pl_parablock.server.intake`: updates into their round's sums as
  they arrive (spooled, rolled back exactly when refused late) or whole; it
  reports a round complete, it never closes one.
* :mod:`~pl_parablock.server.rounds`: the global value and version of every
  block, the rounds (quorum, timeouts) and their close, with the
  aggregation rule of the core's registry.
* :mod:`~pl_parablock.server.checkpoint`: where checkpoints are kept (an
  injected :class:`~pl_parablock.server.checkpoint.CheckpointStore`).
* :mod:`~pl_parablock.server.report`: the server's part of the run report.

Every update is validated before it touches global state: a joined client
sampled for the round, the round's block, exactly the block's tensor names,
shapes and dtypes, finite values, and optionally an L2 norm bound. A bad
update is refused with the reason and recorded; the round goes on. A
repeated update of the same client, round and block is acknowledged and not
applied twice; an update for a round that already closed is counted as late
and dropped. A round closes when every expected client's update has
arrived, or at its timeout with a quorum, and never before every earlier
round closed (rounds close in order: with ``staleness`` >= 2 a client
uploads round ``t + 1`` while round ``t`` still waits for others, and round
``t + 1`` may be complete first); with a checkpoint store and
``checkpoint_every``, the global state is written before the aggregate is
released, so a restarted server resumes from it.

All methods are thread-safe; every wait is bounded by the timeout given.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from pl_parablock.core.aggregate import AGGREGATIONS, AggregationRule, rule_of
from pl_parablock.core.blocks import Partition
from pl_parablock.core.codecs import NO_COMPRESSION, Compression
from pl_parablock.core.optimizers import ServerOptimizer
from pl_parablock.core.plan import WEIGHTINGS, Mode, mode_of
from pl_parablock.errors import FederationError
from pl_parablock.server.admission import Admission, AdmissionLimits, PlanSettings, check_fingerprint
from pl_parablock.server.checkpoint import CHECKPOINT_FORMAT as CHECKPOINT_FORMAT  # still importable from here
from pl_parablock.server.checkpoint import CheckpointPolicy, CheckpointStore, DirectoryStore, check_state, compose, federation_params
from pl_parablock.server.evaluator import EvaluatorDesk
from pl_parablock.server.intake import Consume as Consume  # still importable from here
from pl_parablock.server.intake import Feed, Intake, Opened, Outcome, feed_of
from pl_parablock.server.report import MAX_RECORDED_REJECTIONS as MAX_RECORDED_REJECTIONS  # still importable from here
from pl_parablock.server.report import Refusals, round_record, server_report
from pl_parablock.server.rounds import Aggregation, Quorum, Round, Rounds
from pl_parablock.server.validation import MAX_WEIGHT, RefusedError, UpdateLimits, parse_update_header
from pl_parablock.wire.framing import Spec, StagedTensors, short

__all__ = ["AGGREGATIONS", "MAX_WEIGHT", "Aggregator", "Feed", "RefusedError", "check_fingerprint"]

log = logging.getLogger(__name__)

ACCEPTED = {"accepted": True, "status": "accepted", "reason": "accepted"}


def _checked(
    clients: int,
    rounds: int,
    server_lr: float,
    aggregation: str,
    weighting: str | None,
    max_weight: float | None,
    server_optimizer: ServerOptimizer | None,
    mode: Mode,
    staleness: int,
    stale_mix: float,
) -> AggregationRule:
    """The aggregation rule of the :class:`Aggregator`'s arguments, once they are checked (in this order).

    Raises:
        ValueError: the first argument out of its range, naming it.
    """
    if clients < 1 or rounds < 1:
        raise ValueError("a federation needs at least one client and one round")
    refused = mode.refusals(staleness=staleness, stale_mix=stale_mix)
    if refused:
        raise ValueError("; ".join(refused))
    if not server_lr > 0:
        raise ValueError(f"server_lr must be > 0, not {server_lr}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {aggregation!r}")
    if weighting is not None and weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    if max_weight is not None and not 1.0 <= max_weight <= MAX_WEIGHT:
        raise ValueError(f"max_weight must be between 1 and 2**53, not {max_weight}")
    rule = rule_of(aggregation)
    if server_optimizer is not None and server_optimizer.name != "sgd" and not rule.server_optimizer:
        raise ValueError(f"the server optimizer {server_optimizer.name} cannot follow aggregation={aggregation}; use mean")
    return rule


class Aggregator:
    """Global state and round bookkeeping of a federation: the coordinator of the server's pieces.

    The arguments are kept as attributes of their names and grouped as the pieces use them: the plan (:class:`.PlanSettings`),
    admission's waits (``AdmissionLimits``), the bounds on updates (:class:`.UpdateLimits`), the aggregate (:class:`.Aggregation`),
    the quorum (``Quorum``), the checkpoints (:class:`.CheckpointPolicy`, a ``CheckpointStore``); see those for details.

    Args:
        clients: number of clients.
        rounds: number of rounds.
        schedule: ``ascending``, ``descending``, ``random`` or an explicit list.
        seed: seed of a random schedule and of client sampling.
        server_lr: server learning rate ``eta_g`` (1.0 is FedAvg).
        server_optimizer: the server optimizer per block (its state is in the checkpoints); ``None``: SGD at ``server_lr``.
        mode: the federation's mode; clients must run the same.
        assignment: ``shared`` (every client trains ``b_t``) or ``staggered`` (client ``i`` trains ``(b_t + i) mod M``).
        staleness: ``k`` of a pipelined mode (``federation.staleness``): a client may push up to ``k`` rounds beyond
            the first one still open; its clients learn it (and ``stale_mix``, the rebase's ``α``) at their join.
        min_clients: quorum to close a round at ``round_timeout_s``.
        round_timeout_s: close a round this long after its first update if the quorum arrived; ``None``: wait for all.
        clients_per_round: sample this many clients per round (seeded).
        aggregation: ``mean`` (weighted FedAvg), or the robust ``median`` / ``trimmed_mean`` of the deltas (unweighted;
            updates stay spooled on disk until the round closes): a rule of :data:`~pl_parablock.core.aggregate.AGGREGATION_RULES`.
        trim_fraction: share trimmed at each end by ``trimmed_mean``.
        clip_norm: scale every delta down to this L2 norm before aggregating.
        max_update_norm: refuse updates whose delta has a larger L2 norm.
        checkpoint_dir: where to write the server checkpoint.
        checkpoint_every: write it every this many rounds (0: never).
        on_round_closed: called with the round's record after it closes.
        weighting: the clients' weighting (:data:`.WEIGHTINGS`); ``uniform`` refuses any weight but 1; ``None``: any up to ``max_weight``.
        max_weight: refuse an update whose weight is larger (:func:`pl_parablock.recipe.build.weight_bound`); ``None``: :data:`MAX_WEIGHT`.
        gather_s: before every client has joined once, updates are refused with "retry" until this many seconds
            after the first join, so that every client starts from round 0 (its view of the rounds is the plan's).
        initial_state_wait_s: the first fingerprint is dropped if its initial state has not begun to arrive this long after its join.
        compression: the federation's codecs: an update compressed with another is refused; with a lossy download
            codec a round's aggregate is broadcast as ``D = Q(Δ_agg + r_b)`` and the global becomes ``g + D``.
        checkpoint_store: where the checkpoints go instead of ``checkpoint_dir`` (e.g. a ``MemoryStore``).
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
        checkpoint_store: CheckpointStore | None = None,
        staleness: int = 1,
        stale_mix: float = 1.0,
    ) -> None:
        rule = _checked(
            clients, rounds, server_lr, aggregation, weighting, max_weight, server_optimizer, mode_of(mode), staleness, stale_mix
        )
        # the settings as given (read by callers), then grouped by the piece that uses them
        self.clients, self.rounds, self.schedule_kind, self.seed, self.mode = clients, rounds, schedule, seed, mode
        self.assignment, self.clients_per_round, self.gather_s = assignment, clients_per_round, gather_s
        self.server_lr, self.server_optimizer, self.compression = server_lr, server_optimizer, compression
        self.aggregation, self.trim_fraction, self.clip_norm, self.max_update_norm = aggregation, trim_fraction, clip_norm, max_update_norm
        self.round_timeout_s, self.weighting, self.initial_state_wait_s = round_timeout_s, weighting, initial_state_wait_s
        self.checkpoint_dir, self.checkpoint_every, self.on_round_closed = checkpoint_dir, checkpoint_every, on_round_closed
        self.max_weight = 1.0 if weighting == "uniform" else float(max_weight or MAX_WEIGHT)
        self._settings = PlanSettings(mode, clients, rounds, schedule, seed, clients_per_round, assignment, staleness, stale_mix)
        self.participants = list(self._settings.participants)  # the plan's, known before the model (and so the plan) is
        self.min_clients = min(min_clients or clients, min(len(p) for p in self.participants))
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex
        self.resumed_from: int | None = None

        self._cond = threading.Condition()  # the federation's lock (re-entrant), shared with the pieces
        self._stopping = threading.Event()
        self._admission = Admission(self._cond, self._settings, AdmissionLimits(gather_s, initial_state_wait_s), self._stopping)
        self._limits = UpdateLimits(weighting, self.max_weight, max_update_norm, clip_norm, compression)
        self._intake = Intake(self._limits, rule)
        self._aggregation = Aggregation(rule, trim_fraction, server_lr, server_optimizer, compression)
        self._rounds = Rounds(self._cond, rounds, self._aggregation, Quorum(self.min_clients, round_timeout_s), self.started_at)
        self._refusals = Refusals(self._cond, self.started_at)
        self._store = checkpoint_store or (DirectoryStore(checkpoint_dir) if checkpoint_dir else None)
        self._policy = CheckpointPolicy(checkpoint_every, rounds - 1)
        self._checkpoint_lock = threading.Lock()
        self.evaluator = EvaluatorDesk(self._cond, rounds=self._rounds, admission=self._admission)  # an evaluator's reads: not a client

    # ------------------------------------------------------------------ join

    def join(
        self, client_id: int, fingerprint: Mapping[str, Any], timeout: float, cancelled: threading.Event | None = None
    ) -> dict[str, Any]:
        """Admit a client (first time or again); the first one fixes the federation's model (see :mod:`~pl_parablock.server.admission`).

        Returns the schedule, the round count, the block versions, the next round to train, the participants of
        each round and whether this client must upload the initial state. While the first fingerprint waits for
        its initial state, a join with another fingerprint is told to retry (``unavailable``).

        Raises:
            RefusedError: bad client id or fingerprint, mismatching model or mode, or the initial state not
                arriving within ``timeout`` (or the caller going away: ``cancelled`` set).
        """
        fp = self._admission.check_join(client_id, fingerprint, timeout)
        with self._cond:
            admitted = self._admission.join(client_id, fp, timeout, cancelled)
            self._admission.saw(client_id)
            if admitted.took_model:  # a new model: the round state starts over with its plan
                assert self._admission.plan is not None
                self._rounds.reset(self._admission.plan)
            if admitted.again:  # it adopts the current values: it reads no older version
                self._rounds.state.release(client_id)
                log.info("client %d joined again; next round %d", client_id, self._rounds.next_round())
            return self._admission.reply(admitted, list(self._rounds.state.versions), self._rounds.next_round(), self.instance)

    def begin_upload(self, client_id: int, specs: list[Spec]) -> None:
        """An initial-state upload is about to be read: only from the client asked for it, and exactly the fingerprint's tensors.

        Call :meth:`end_upload` when it is read (or failed). While an upload
        is in progress, the pending fingerprint does not expire.

        Raises:
            RefusedError: nobody joined yet, another client sets the state,
                or the declared tensors differ from the fingerprint's.
        """
        self._admission.begin_upload(client_id, specs)

    def end_upload(self) -> None:
        self._admission.end_upload()

    def set_initial_state(self, client_id: int, tensors: Mapping[str, Tensor] | StagedTensors) -> None:
        """Store the initial global value of every block (from the first client)."""
        blocks = self._admission.initial_blocks(client_id, tensors)
        if blocks is None:
            return
        with self._cond:
            if not self._admission.ready:
                self._rounds.begin(blocks)
                self._admission.ready = True
                self.evaluator.reached(0, self._rounds.state.values)
            self._cond.notify_all()
        self._checkpoint_if_due(None)

    # ---------------------------------------------------------------- updates

    def state_nbytes(self) -> int | None:
        """Bytes of the whole initial state, once the fingerprint is known."""
        return self._admission.state_nbytes()

    def block_nbytes(self, block: int) -> int:
        """Bytes of a block at float32 or its own dtype, whichever is larger (bound on an update)."""
        return self._admission.block_nbytes(block)

    def expected_block(self, round_index: int, client_id: int | None = None) -> int:
        """The block ``client_id`` trains in round ``round_index`` (the schedule's ``b_t`` without a client)."""
        with self._cond:
            return self._rounds.expected_block(round_index, client_id, ready=self._admission.ready)

    def refuse(self, record: dict[str, Any], reason: str, rnd: Round | None = None) -> dict[str, Any]:
        """Record a refused update (it shows in the report, see :class:`~pl_parablock.server.report.Refusals`) and return the reply."""
        self._refusals.note(record, reason, rnd)
        return {"accepted": False, "status": "rejected", "reason": reason}

    def precheck(self, header: Mapping[str, Any], specs: list[Spec] | None = None) -> dict[str, Any] | None:
        """Check an update's header before its body is read.

        Returns ``None`` when the body should be read, or the reply to send
        without reading it (refused, duplicate or late).
        """
        try:
            h = parse_update_header(header)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return self.refuse({"client": header.get("client_id"), "round": header.get("round")}, f"malformed update header ({short(exc)})")
        record = h.record()
        admission = self._admission
        with self._cond:
            problem = admission.update_problem(h.client) or self._rounds.range_problem(h.round)
            if problem:
                return self.refuse(record, problem)
            if not admission.gathered():
                return admission.waiting_reply()
            problem = self._rounds.slot_problem(h.client, h.round, h.block)
            if problem:
                return self.refuse(record, problem)
            rnd = self._rounds.open(h.round)
            early = rnd.settled_reply(h.client)
            if early is not None:
                if early["status"] == "late":
                    log.info("late update from client %d for closed round %d dropped", h.client, h.round)
                return early
            version, current = self._rounds.state.versions[h.block], self._rounds.state.values[h.block]
        problem = self._limits.problem(h, version, current, specs)
        return self.refuse(record, problem, rnd) if problem else None

    def _open_update(self, header: Mapping[str, Any], specs: list[Spec]) -> dict[str, Any] | Opened:
        """:meth:`precheck`'s reply, or what summing the update needs."""
        early = self.precheck(header, specs)
        if early is not None:
            return early
        client, rnd_i, kind, weight = int(header["client_id"]), int(header["round"]), str(header["kind"]), float(header["weight"])
        with self._cond:
            self._admission.saw(client)
            assert self._rounds.plan is not None
            rnd = self._rounds.open(rnd_i)
            block = self._rounds.plan.block_for(client, rnd_i)
            current = self._rounds.state.values[block]
        return Opened(client, kind, weight, rnd, block, current)

    @property
    def streams(self) -> bool:
        """Whether updates are summed as they arrive (:meth:`receive`), else spooled whole (:attr:`.intake.Intake.streams`)."""
        return self._intake.streams

    def receive(self, header: Mapping[str, Any], specs: list[Spec], feed: Feed) -> dict[str, Any]:
        """Check and sum one client's update as it arrives; returns the reply (as :meth:`submit`). Needs :attr:`streams`.

        ``feed(consume, spool)`` delivers the update (see :meth:`~pl_parablock.server.intake.Intake.receive`); an
        update refused, cut short, superseded or overtaken by its round's close is rolled back exactly.
        """
        if not self.streams:
            raise FederationError("this aggregator keeps whole updates (clip_norm or robust aggregation): use submit")
        opened = self._open_update(header, specs)
        if isinstance(opened, dict):
            return opened
        return self._settle(opened, self._intake.receive(opened, header, specs, feed))

    def submit(self, header: Mapping[str, Any], tensors: StagedTensors | Mapping[str, Tensor]) -> dict[str, Any]:
        """Validate one client's update and add it to its round.

        Takes ownership of ``tensors`` (closed when no longer needed). Returns
        the reply: ``accepted``, ``status`` (accepted, duplicate, late,
        rejected) and ``reason``.
        """
        if self.streams and not isinstance(tensors, StagedTensors):
            try:
                specs, feed = feed_of(tensors)
            except FederationError as exc:
                return self.refuse({"client": header.get("client_id"), "round": header.get("round")}, str(exc))
            return self.receive(header, specs, feed)
        staged = tensors if isinstance(tensors, StagedTensors) else StagedTensors.from_tensors(tensors)
        try:
            opened = self._open_update(header, staged.specs)
        except BaseException:
            staged.close()
            raise
        if isinstance(opened, dict):
            staged.close()
            return opened
        return self._settle(opened, self._intake.submit(opened, header, staged))

    def _settle(self, op: Opened, outcome: Outcome) -> dict[str, Any]:
        """The reply to what the intake handed back: a refusal is recorded; a complete round is closed, else its waiters woken."""
        if outcome.refused:
            return self.refuse(op.record(), outcome.refused, op.rnd)
        if outcome.reply is not None:
            return outcome.reply
        if outcome.complete:
            self._close_complete()  # this round, once every earlier round is closed (else the close of the last of those closes it)
        else:
            with self._cond:
                self._cond.notify_all()
        return dict(ACCEPTED)

    # ---------------------------------------------------------------- rounds

    def _close_complete(self) -> None:
        """Close, in round order, the first open round while every expected client of it has arrived."""
        while (rnd := self._rounds.next_complete()) is not None:
            self._close(rnd, "all clients arrived")

    def _close(self, rnd: Round, reason: str) -> None:
        """Close a round: the rounds settle it, a due checkpoint is written, then the aggregate is released."""
        with rnd.lock:
            if rnd.closed:
                return
            self._rounds.settle(rnd, reason, self._admission.readers)
            self._checkpoint_if_due(rnd)
            rnd.closed = True
        with self._cond:
            self.evaluator.reached(self._rounds.next_round(), self._rounds.state.values)
            self._cond.notify_all()
        record = round_record(rnd, self.started_at)
        log.info("round %d closed (%s): block %d, %d/%d clients", rnd.index, reason, rnd.block, len(rnd.clients), len(rnd.expected))
        if self.on_round_closed is not None:
            try:
                self.on_round_closed(record)
            except Exception:  # a progress printer must not break the federation
                log.exception("on_round_closed callback failed")

    def wait_round(self, round_index: int, timeout: float, cancelled: threading.Event | None = None) -> bool:
        """Wait until round ``round_index`` is aggregated; ``False`` on timeout, shutdown or ``cancelled``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                rnd = self._rounds.get(round_index)
                if rnd is not None and rnd.closed:
                    return True
                if self._stopping.is_set() or (cancelled is not None and cancelled.is_set()):
                    return False
                due = self._rounds.due()
                left = deadline - time.monotonic()
                if not due:
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.5))
            for r in due:
                self._close(r, self._rounds.timeout_reason(r))
                self._close_complete()  # later rounds complete meanwhile follow it

    def block_value(self, block: int) -> tuple[int, dict[str, Tensor]]:
        """Current version and global value of a block (do not modify the tensors)."""
        with self._cond:
            return self._rounds.block_value(block, ready=self._admission.ready)

    def round_value(self, round_index: int, client_id: int | None = None) -> tuple[int, dict[str, Tensor]]:
        """Version ``round_index`` of the round's block, once aggregated (do not modify); ``superseded`` if no longer held."""
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
            if client_id is not None:
                self._admission.saw(client_id)
            return self._rounds.answer(round_index, client_id, delta)

    def round_shapes(self, round_index: int) -> dict[str, list[int]]:
        """The shape of every tensor of the blocks round ``round_index`` moves."""
        with self._cond:
            return self._rounds.shapes(round_index)

    def versions(self) -> list[int]:
        with self._cond:
            return list(self._rounds.state.versions)

    def next_round(self) -> int:
        """The first round not yet aggregated (``rounds`` when all are)."""
        with self._cond:
            return self._rounds.next_round()

    @property
    def schedule(self) -> list[int]:
        with self._cond:
            return list(self._admission.plan.schedule) if self._admission.plan is not None else []

    @property
    def partition(self) -> Partition | None:
        return self._admission.partition

    def global_state(self) -> dict[str, Tensor]:
        """All global tensors by name (references; do not modify)."""
        with self._cond:
            return self._rounds.global_state()

    # ------------------------------------------------------------ departures

    def leave(self, client_id: int, report: Mapping[str, Any] | None) -> None:
        """A client is done; its report (per-round records, final metrics) is kept, replacing an earlier one.

        Raises:
            RefusedError: the client never joined (nothing is kept).
        """
        with self._cond:
            self._admission.leave(client_id, report)
            self._rounds.state.release(client_id)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiter to look again (a caller went away)."""
        with self._cond:
            self._cond.notify_all()

    def wait_finished(self, timeout: float, grace_s: float = 30.0, on_wait: Callable[[list[int], float], None] | None = None) -> bool:
        """Wait until every round is closed and every client that took part in the run's last rounds left.

        Only clients seen since the last rounds began are waited for (:meth:`~pl_parablock.server.rounds.Rounds.last_rounds_began`,
        :meth:`~pl_parablock.server.admission.Admission.awaited`), and told to ``on_wait(clients, grace_s)`` once; one not
        gone ``grace_s`` after the last close is dropped. ``False`` on timeout or shutdown.
        """
        deadline, tell = time.monotonic() + timeout, on_wait
        with self._cond:
            while True:
                done = self._rounds.next_round() >= self.rounds
                awaited = self._admission.awaited(self._rounds.last_rounds_began()) if done else []
                if done and self._admission.joined and not awaited:
                    return True
                if awaited and tell is not None:
                    tell(awaited, grace_s)
                    tell = None  # once
                last = self._rounds.last_close
                if done and last is not None and time.monotonic() - last >= grace_s:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    return False
                self._cond.wait(min(remaining, 0.5))

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._rounds.next_round() >= self.rounds

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._stopping.is_set()

    def shutdown(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()

    # ------------------------------------------------------------ checkpoints

    def _checkpoint_if_due(self, rnd: Round | None) -> None:
        if self._store is not None and self._policy.due(rnd.index if rnd is not None else None):
            self._save(self._store, extra_closed=rnd)

    def save_checkpoint(self, directory: str | CheckpointStore, extra_closed: Round | None = None) -> str:
        """Write the global state, versions, closed rounds and schedule; returns where the state went.

        ``directory``: a directory (a :class:`~pl_parablock.server.checkpoint.DirectoryStore`, written
        atomically: a crash at any point leaves the previous checkpoint whole), or another store.
        """
        return self._save(DirectoryStore(directory) if isinstance(directory, str) else directory, extra_closed)

    def _save(self, store: CheckpointStore, extra_closed: Round | None) -> str:
        with self._checkpoint_lock:
            with self._cond:
                if self._admission.fingerprint is None or not self._admission.ready:
                    raise FederationError("nothing to checkpoint before the first client joined")
                versions, records, tensors, upto = self._rounds.snapshot(extra_closed)
                params = federation_params(self._settings, self._aggregation)
                admission, rejected = self._admission.snapshot(), list(self._refusals.outside)
                state = compose(
                    params=params, admission=admission, versions=versions, rounds=records, rejected=rejected, started_at=self.started_at
                )
            path = store.save(state, tensors, upto)
            log.info("server checkpoint written: %d rounds closed", len(records))
            return path

    def load_checkpoint(self, directory: str | CheckpointStore) -> int:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (a directory, or a store); returns the next round.

        Raises:
            FederationError: the checkpoint is unreadable, corrupt, or was
                written for a different federation (recipe).
        """
        store = DirectoryStore(directory) if isinstance(directory, str) else directory
        state, tensors = store.load()
        check_state(state, federation_params(self._settings, self._aggregation), store.where)
        with self._cond:
            admission = self._admission
            admission.adopt(state["fingerprint"])
            assert admission.plan is not None and admission.partition is not None and admission.fingerprint is not None
            self._rounds.reset(admission.plan)
            blocks = [b.params for b in admission.partition.blocks]
            self._rounds.restore(tensors, set(admission.fingerprint["tensors"]), blocks, state["versions"], state["rounds"], store.where)
            admission.restore(state)
            self._refusals.outside = list(state.get("rejected", []))
            self.resumed_from = self._rounds.next_round()
            return self.resumed_from

    # ---------------------------------------------------------------- report

    def report(self) -> dict[str, Any]:
        """The server's view of the run: rounds, rejections, client reports, dropped clients."""
        with self._cond:
            return server_report(
                evaluator=self.evaluator.summary(),
                settings=self._settings,
                aggregation=self._aggregation,
                admission=self._admission,
                rounds=self._rounds,
                refusals=self._refusals,
                resumed_from=self.resumed_from,
            )
