"""The server's state: global block values, versions, rounds and their aggregation.

The aggregator is model-agnostic: it holds tensors by name. The first client
to join sets the federation's fingerprint (block partition, tensor names,
shapes, dtypes and a hash of the initial values) and uploads the initial
global state; a client whose fingerprint differs is refused with the reason.
The aggregator owns the schedule (the active block of every round) and hands
it to clients when they join.

A round closes when every expected client's update has arrived, or, when
``round_timeout_s`` is set, that many seconds after its first update if at
least ``min_clients`` arrived. Closing replaces the block's global value
(copy-on-write: a reader streaming the old value keeps a consistent copy) and
sets its version to the round number.

All methods are thread-safe; waits are bounded by the timeouts given.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pl_parablock.blocks import Partition, make_schedule
from pl_parablock.errors import FederationError
from pl_parablock.federation.aggregate import RoundAccumulator
from pl_parablock.federation.wire import DTYPES

__all__ = ["Aggregator", "RefusedError"]

log = logging.getLogger(__name__)


class RefusedError(FederationError):
    """A request the server refuses; ``code`` says why for the transport."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Round:
    index: int
    block: int
    acc: RoundAccumulator = field(default_factory=RoundAccumulator)
    lock: threading.Lock = field(default_factory=threading.Lock)
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    late: int = 0
    first_arrival: float | None = None
    closed: bool = False
    closed_at: float | None = None
    aggregation_s: float = 0.0
    reason: str = ""


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


class Aggregator:
    """Global state and round bookkeeping of a federation.

    Args:
        clients: number of clients expected in every round.
        rounds: number of rounds.
        schedule: ``ascending``, ``descending``, ``random`` or an explicit list.
        seed: seed of a random schedule.
        server_lr: server learning rate ``eta_g`` (1.0 is FedAvg).
        mode: the federation's mode; clients must run the same.
        min_clients: quorum to close a round at ``round_timeout_s``.
        round_timeout_s: close a round this long after its first update if
            the quorum arrived; ``None`` waits for every client.
        on_round_closed: called with the round's record after it closes.
    """

    def __init__(
        self,
        *,
        clients: int,
        rounds: int,
        schedule: str | list[int] = "ascending",
        seed: int = 0,
        server_lr: float = 1.0,
        mode: str = "parablock",
        min_clients: int | None = None,
        round_timeout_s: float | None = None,
        on_round_closed: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if clients < 1 or rounds < 1:
            raise ValueError("a federation needs at least one client and one round")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, not {server_lr}")
        self.clients = clients
        self.rounds = rounds
        self.schedule_kind = schedule
        self.seed = seed
        self.server_lr = server_lr
        self.mode = mode
        self.min_clients = clients if min_clients is None else min_clients
        self.round_timeout_s = round_timeout_s
        self.on_round_closed = on_round_closed
        self.started_at = time.time()

        self._cond = threading.Condition()
        self._fingerprint: dict[str, Any] | None = None
        self._partition: Partition | None = None
        self._schedule: list[int] = []
        self._initializer: int | None = None
        self._ready = False
        self._globals: list[dict[str, Tensor]] = []
        self._versions: list[int] = []
        self._rounds: dict[int, _Round] = {}
        self._joined: set[int] = set()
        self._left: set[int] = set()
        self._reports: dict[int, dict[str, Any]] = {}
        self._rejected: list[dict[str, Any]] = []
        self._shutdown = False

    # ------------------------------------------------------------------ join

    def join(self, client_id: int, fingerprint: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Admit a client; the first one fixes the federation's model.

        Returns the schedule, the round count, the block versions and whether
        this client must upload the initial state.

        Raises:
            RefusedError: bad client id, mismatching model or mode, or the initial
                state not arriving within ``timeout``.
        """
        if not 0 <= client_id < self.clients:
            raise RefusedError(
                f"client id {client_id} is outside 0..{self.clients - 1}: this federation has {self.clients} clients", "invalid"
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._fingerprint is None:
                self._fingerprint = dict(fingerprint)
                self._partition = Partition.from_dict(fingerprint["partition"])
                self._schedule = make_schedule(self.schedule_kind, len(self._partition), self.rounds, self.seed)
                self._versions = [-1] * len(self._partition)
                self._initializer = client_id
                log.info("client %d set the federation's model: %d blocks", client_id, len(self._partition))
            elif (fingerprint.get("mode"), fingerprint.get("partition"), fingerprint.get("tensors"), fingerprint.get("hash")) != (
                self._fingerprint.get("mode"),
                self._fingerprint.get("partition"),
                self._fingerprint.get("tensors"),
                self._fingerprint.get("hash"),
            ):
                why = _describe_mismatch(self._fingerprint, fingerprint)
                raise RefusedError(
                    f"client {client_id} refused: its model does not match this federation's: {why}. "
                    "Every client must build the same model (same model.config or model.path, blocks and seed)",
                    "refused",
                )
            need_state = not self._ready and client_id == self._initializer
            while not self._ready and not need_state:
                left = deadline - time.monotonic()
                if left <= 0 or self._shutdown:
                    raise RefusedError(
                        f"client {client_id}: the initial model state from client {self._initializer} did not arrive within {timeout:g} s",
                        "unavailable",
                    )
                self._cond.wait(min(left, 0.5))
            self._joined.add(client_id)
            self._left.discard(client_id)
            return {
                "need_state": need_state,
                "schedule": list(self._schedule),
                "rounds": self.rounds,
                "versions": list(self._versions),
                "mode": self.mode,
                "clients": self.clients,
            }

    def set_initial_state(self, client_id: int, tensors: Mapping[str, Tensor]) -> None:
        """Store the initial global value of every block (from the first client)."""
        with self._cond:
            if self._fingerprint is None or client_id != self._initializer:
                raise RefusedError(f"client {client_id} may not set the initial state (client {self._initializer} does)", "refused")
            if self._ready:
                return
            specs = self._fingerprint["tensors"]
            if set(tensors) != set(specs):
                missing = sorted(set(specs) - set(tensors))[:3]
                extra = sorted(set(tensors) - set(specs))[:3]
                raise RefusedError(f"initial state does not match the fingerprint (missing {missing}, unexpected {extra})", "invalid")
            for name, t in tensors.items():
                if [str(t.dtype).removeprefix("torch."), list(t.shape)] != [specs[name]["dtype"], specs[name]["shape"]]:
                    raise RefusedError(f"initial tensor {name!r} does not match the fingerprint", "invalid")
            assert self._partition is not None
            self._globals = [{n: tensors[n] for n in b.params} for b in self._partition.blocks]
            self._ready = True
            self._cond.notify_all()

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

    def expected_block(self, round_index: int) -> int:
        with self._cond:
            if not self._ready:
                raise RefusedError("the federation has no initial state yet; join first", "unavailable")
            if not 0 <= round_index < self.rounds:
                raise RefusedError(f"round {round_index} is outside 0..{self.rounds - 1}", "invalid")
            return self._schedule[round_index]

    def _reject(self, record: dict[str, Any], reason: str, rnd: _Round | None = None) -> tuple[bool, str]:
        entry = {**record, "reason": reason}
        (rnd.rejected if rnd is not None else self._rejected).append(entry)
        log.warning("rejected update from client %s for round %s: %s", record.get("client"), record.get("round"), reason)
        return False, reason

    def submit(self, header: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[bool, str]:
        """Validate one client's update and add it to its round.

        Returns ``(accepted, reason)``. A bad update is refused with the
        reason and recorded; the round goes on with the others. A repeated
        update of the same client, round and block is acknowledged and not
        applied twice.
        """
        try:
            client = int(header["client_id"])
            rnd_i = int(header["round"])
            block = int(header["block"])
            kind = str(header["kind"])
            base = int(header.get("base_version", -1))
            weight = float(header["weight"])
        except (KeyError, TypeError, ValueError) as exc:
            return self._reject({"client": header.get("client_id"), "round": header.get("round")}, f"malformed update header ({exc})")
        record = {"client": client, "round": rnd_i, "block": block}
        with self._cond:
            if client not in self._joined:
                return self._reject(record, f"client {client} has not joined")
            if not self._ready:
                return self._reject(record, "no initial state yet")
            if not 0 <= rnd_i < self.rounds:
                return self._reject(record, f"round {rnd_i} is outside 0..{self.rounds - 1}")
            if block != self._schedule[rnd_i]:
                return self._reject(record, f"round {rnd_i} trains block {self._schedule[rnd_i]}, not {block}")
            rnd = self._rounds.setdefault(rnd_i, _Round(rnd_i, block))
            if client in rnd.clients:
                return True, "duplicate: already applied"
            if rnd.closed:
                rnd.late += 1
                return self._reject(record, f"late: round {rnd_i} already closed", rnd)
            if kind not in ("value", "delta"):
                return self._reject(record, f"unknown update kind {kind!r}", rnd)
            if not (weight > 0 and math.isfinite(weight)):
                return self._reject(record, f"weight {weight!r} is not a positive number", rnd)
            if kind == "value" and base != self._versions[block]:
                return self._reject(
                    record,
                    f"stale base: the client started from version {base} of block {block}, the server holds {self._versions[block]}",
                    rnd,
                )
            current = self._globals[block]
        problem = _check_tensors(current, tensors, exact_dtype=(kind == "value"))
        if problem:
            return self._reject(record, problem, rnd)
        complete = False
        with rnd.lock:
            if rnd.closed:
                rnd.late += 1
                return self._reject(record, f"late: round {rnd_i} already closed", rnd)
            if client in rnd.clients:
                return True, "duplicate: already applied"
            rnd.acc.add(tensors, weight, kind)
            loss = header.get("loss")
            rnd.clients[client] = {"weight": weight, "kind": kind, "loss": loss if isinstance(loss, (int, float)) else None}
            if rnd.first_arrival is None:
                rnd.first_arrival = time.monotonic()
            complete = len(rnd.clients) >= self.clients
        if complete:
            self._close(rnd, "all clients arrived")
        else:
            with self._cond:
                self._cond.notify_all()
        return True, "accepted"

    def _close(self, rnd: _Round, reason: str) -> None:
        with rnd.lock:
            if rnd.closed:
                return
            t0 = time.perf_counter()
            with self._cond:
                current = self._globals[rnd.block]
            new = rnd.acc.finish(current, self.server_lr)
            rnd.closed = True
            rnd.aggregation_s = time.perf_counter() - t0
            rnd.closed_at = time.time()
            rnd.reason = reason
        with self._cond:
            self._globals[rnd.block] = new
            self._versions[rnd.block] = max(self._versions[rnd.block], rnd.index)
            self._cond.notify_all()
        record = self._round_record(rnd)
        log.info("round %d closed (%s): block %d, %d/%d clients", rnd.index, reason, rnd.block, len(rnd.clients), self.clients)
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
            and len(r.clients) >= self.min_clients
        ]

    def wait_round(self, round_index: int, timeout: float) -> bool:
        """Wait until round ``round_index`` is aggregated; ``False`` on timeout or shutdown."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                rnd = self._rounds.get(round_index)
                if rnd is not None and rnd.closed:
                    return True
                if self._shutdown:
                    return False
                due = self._due_rounds()
                left = deadline - time.monotonic()
                if not due:
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.5))
            for r in due:
                self._close(r, f"timeout after {self.round_timeout_s:g} s with quorum")

    def block_value(self, block: int) -> tuple[int, dict[str, Tensor]]:
        """Current version and global value of a block (do not modify the tensors)."""
        with self._cond:
            if not self._ready:
                raise RefusedError("the federation has no initial state yet", "unavailable")
            if not 0 <= block < len(self._globals):
                raise RefusedError(f"block {block} is outside 0..{len(self._globals) - 1}", "invalid")
            return self._versions[block], self._globals[block]

    def versions(self) -> list[int]:
        with self._cond:
            return list(self._versions)

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
            return {n: t for blk in self._globals for n, t in blk.items()}

    # ------------------------------------------------------------ departures

    def leave(self, client_id: int, report: Mapping[str, Any] | None) -> None:
        """A client is done; its report (per-round records, final metrics) is kept."""
        with self._cond:
            if report:
                self._reports[client_id] = dict(report)
            self._left.add(client_id)
            self._cond.notify_all()

    def wait_all_left(self, timeout: float) -> bool:
        """Wait until every client that joined has left (and at least one joined)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._joined and self._joined <= self._left):
                left = deadline - time.monotonic()
                if left <= 0 or self._shutdown:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    @property
    def finished(self) -> bool:
        with self._cond:
            return all(r in self._rounds and self._rounds[r].closed for r in range(self.rounds))

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._shutdown

    def shutdown(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    # ---------------------------------------------------------------- report

    def _round_record(self, rnd: _Round) -> dict[str, Any]:
        losses = [(c["weight"], c["loss"]) for c in rnd.clients.values() if c["loss"] is not None]
        total = sum(w for w, _ in losses)
        return {
            "round": rnd.index,
            "block": rnd.block,
            "expected": self.clients,
            "arrived": len(rnd.clients),
            "rejected": len(rnd.rejected),
            "late": rnd.late,
            "aggregation_s": rnd.aggregation_s,
            "closed_at": rnd.closed_at - self.started_at if rnd.closed_at else None,
            "close_reason": rnd.reason,
            "loss": sum(w * v for w, v in losses) / total if total > 0 else None,
            "clients": sorted(rnd.clients),
            "rejections": [dict(r) for r in rnd.rejected],
        }

    def report(self) -> dict[str, Any]:
        """The server's view of the run: rounds, rejections, client reports."""
        with self._cond:
            rounds = [self._round_record(self._rounds[i]) for i in sorted(self._rounds)]
            return {
                "mode": self.mode,
                "clients": self.clients,
                "rounds_planned": self.rounds,
                "schedule": list(self._schedule),
                "blocks": self._partition.to_dict() if self._partition else [],
                "server_lr": self.server_lr,
                "rounds": rounds,
                "rejected_outside_rounds": list(self._rejected),
                "client_reports": {str(k): v for k, v in sorted(self._reports.items())},
                "started_at": self.started_at,
            }


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def _check_tensors(current: Mapping[str, Tensor], tensors: Mapping[str, Tensor], *, exact_dtype: bool) -> str:
    """Why an update's tensors do not fit the block, or ``''``."""
    if set(tensors) != set(current):
        missing = sorted(set(current) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(current))[:3]
        return f"tensor names do not match the block (missing {missing}, unexpected {extra})"
    for name, t in tensors.items():
        g = current[name]
        if tuple(t.shape) != tuple(g.shape):
            return f"tensor {name!r} has shape {list(t.shape)}, the block holds {list(g.shape)}"
        if exact_dtype and t.dtype != g.dtype:
            return f"tensor {name!r} is {t.dtype}, the block holds {g.dtype} (send a delta to use another wire dtype)"
        if not t.is_floating_point():
            return f"tensor {name!r} is {t.dtype}, not a floating-point tensor"
        if not bool(torch.isfinite(t).all()):
            return f"tensor {name!r} holds NaN or infinite values"
    return ""
