"""Admission: who is in the federation, and which model it runs.

The first client to join sets the federation's model: its fingerprint
(block partition, tensor names, shapes, dtypes and a hash of the initial
values, checked in full by :func:`check_fingerprint`) fixes the partition
and with it the :class:`~pl_parablock.core.plan.Plan` (made by
:func:`~pl_parablock.core.plan.make_plan`, never re-derived here), and that
client uploads the initial state. Until the state has begun to arrive the
fingerprint is pending: it is dropped after ``initial_state_wait_s`` and
the next client's is taken. A client whose fingerprint differs is refused
with the reason.

:class:`Admission` also keeps the clients that joined and left (with their
reports) and the gather window: before every client has joined once,
updates wait until ``gather_s`` after the first join. It holds no global
value: it hands back what the coordinator needs (:class:`Admitted`, the
initial values of every block) and the
:class:`~pl_parablock.server.aggregator.Aggregator` puts them in the round
state. Its methods take the federation's lock themselves (shared with the
coordinator, a re-entrant condition); those marked "caller holds the lock"
do not.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import Tensor

from pl_parablock.core.blocks import Partition
from pl_parablock.core.plan import Plan, make_plan, participants_of
from pl_parablock.core.tensors import finite
from pl_parablock.errors import ParaBlockError
from pl_parablock.server._ratelimit import RateLimitedLog
from pl_parablock.server.validation import RefusedError, _itemsize
from pl_parablock.wire.framing import DTYPES, Spec, StagedTensors, dtype_name, short

__all__ = ["Admission", "AdmissionLimits", "Admitted", "PlanSettings", "check_fingerprint"]

log = logging.getLogger(__name__)
warn = RateLimitedLog(log)

MAX_BLOCKS = 1 << 16
MAX_DIMS = 16
MAX_NAME = 1024


@dataclass(frozen=True)
class PlanSettings:
    """What the federation's plan is made of, apart from the model's blocks (known at the first join).

    Args:
        mode: the federation's mode; clients must run the same.
        clients: number of clients.
        rounds: number of rounds.
        schedule: ``ascending``, ``descending``, ``random`` or an explicit list.
        seed: seed of a random schedule and of client sampling.
        clients_per_round: sample this many clients per round (seeded).
        assignment: ``shared`` or ``staggered``.
        staleness: ``k``, rounds in flight in a pipelined mode.
        stale_mix: ``α`` of the rebase.
    """

    mode: str
    clients: int
    rounds: int
    schedule: str | list[int] = "ascending"
    seed: int = 0
    clients_per_round: int | None = None
    assignment: str = "shared"
    staleness: int = 1
    stale_mix: float = 1.0

    @cached_property
    def participants(self) -> tuple[tuple[int, ...], ...]:
        """The clients of every round, as the plan will hold them (:func:`~pl_parablock.core.plan.participants_of`)."""
        per_round = self.clients_per_round
        members = participants_of(self.mode, clients=self.clients, rounds=self.rounds, clients_per_round=per_round, seed=self.seed)
        return members if members is not None else (tuple(range(self.clients)),) * self.rounds

    @property
    def sampled(self) -> bool:
        """Whether some round has fewer clients than the federation (a join tells the clients the participants)."""
        return any(len(p) < self.clients for p in self.participants)

    def plan(self, num_blocks: int) -> Plan:
        """The plan for a model of ``num_blocks`` blocks."""
        return make_plan(
            self.mode,
            num_blocks=num_blocks,
            rounds=self.rounds,
            schedule=self.schedule,
            seed=self.seed,
            clients=self.clients,
            clients_per_round=self.clients_per_round,
            assignment=self.assignment,
            staleness=self.staleness,
            stale_mix=self.stale_mix,
        )


@dataclass(frozen=True)
class AdmissionLimits:
    """How long admission waits.

    Args:
        gather_s: updates wait (``retry``) until this many seconds after the
            first join, unless every client joined once before; 0: no wait.
        initial_state_wait_s: a first fingerprint is dropped if its initial
            state has not begun to arrive this long after its join (or
            within its join's timeout, if shorter).
    """

    gather_s: float = 0.0
    initial_state_wait_s: float = 30.0


@dataclass(frozen=True)
class Admitted:
    """What a join changed, handed back to the coordinator.

    Attributes:
        need_state: this client must upload the initial state.
        again: it had joined before (it adopts the current values).
        took_model: its fingerprint became the federation's (pending its
            initial state): the round state starts over with this partition.
    """

    need_state: bool
    again: bool
    took_model: bool


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


class Admission:
    """The federation's model and members: joins, the pending first fingerprint, the initial state's upload, leaves.

    Args:
        lock: the federation's lock (a re-entrant condition, shared with the
            coordinator; a join waits on it for the initial state).
        settings: what the plan is made of besides the blocks.
        limits: how long admission waits.
        stopping: set when the server shuts down (waits end).
    """

    def __init__(self, lock: threading.Condition, settings: PlanSettings, limits: AdmissionLimits, stopping: threading.Event) -> None:
        self._cond = lock
        self.settings = settings
        self.limits = limits
        self._stopping = stopping
        self.fingerprint: dict[str, Any] | None = None
        self.partition: Partition | None = None
        self.plan: Plan | None = None
        self.initializer: int | None = None
        self.ready = False  # the initial state arrived
        self._pending_until = math.inf  # a fingerprint whose initial state has not come is dropped after this
        self._uploads = 0  # initial-state uploads in progress
        self.joined: set[int] = set()
        self.seen: dict[int, float] = {}  # client -> when it last called (time.time()), for the end of the run
        self.left: set[int] = set()
        self.reports: dict[int, dict[str, Any]] = {}
        self._first_join: float | None = None
        self._gathered_once = limits.gather_s <= 0

    # ------------------------------------------------------------ joins

    def check_join(self, client_id: int, fingerprint: Any, timeout: float) -> dict[str, Any]:
        """A join's client id, timeout and fingerprint, checked before anything changes; returns the canonical fingerprint.

        Raises:
            RefusedError: bad client id, timeout or fingerprint, or another mode.
        """
        clients, mode = self.settings.clients, self.settings.mode
        if not 0 <= client_id < clients:
            raise RefusedError(f"client id {client_id} is outside 0..{clients - 1}: this federation has {clients} clients", "invalid")
        if not (math.isfinite(timeout) and timeout >= 0):
            raise RefusedError(f"join timeout {timeout!r} is not a number of seconds >= 0", "invalid")
        fp = check_fingerprint(fingerprint)
        if fp["mode"] != mode:
            raise RefusedError(
                f"client {client_id} refused: it runs mode={fp['mode']} but the federation runs mode={mode}. "
                "Every client must build the same model (same model.config or model.path, blocks and seed)",
                "refused",
            )
        return fp

    def join(self, client_id: int, fp: dict[str, Any], timeout: float, cancelled: threading.Event | None) -> Admitted:
        """Admit a client with a fingerprint from :meth:`check_join` (caller holds the lock; released only while waiting).

        See :meth:`~pl_parablock.server.aggregator.Aggregator.join`.

        Raises:
            RefusedError: a mismatching model, or the initial state not
                arriving within ``timeout`` (or ``cancelled`` set).
        """
        deadline = time.monotonic() + timeout
        took = False
        self._expire_pending()
        if self.fingerprint is None:
            self._take(fp, client_id, timeout)
            took = True
            assert self.partition is not None
            log.info("client %d set the federation's model: %d blocks", client_id, len(self.partition))
        elif not _same_fingerprint(self.fingerprint, fp):
            why = _describe_mismatch(self.fingerprint, fp)
            if not self.ready:
                raise RefusedError(
                    f"client {client_id}: its model does not match the one client {self.initializer} announced ({why}), "
                    "whose initial state has not arrived; retry later",
                    "unavailable",
                )
            raise RefusedError(
                f"client {client_id} refused: its model does not match this federation's: {why}. "
                "Every client must build the same model (same model.config or model.path, blocks and seed)",
                "refused",
            )
        need_state = not self.ready and client_id == self.initializer
        while not self.ready and not need_state:
            if self._expire_pending() or self.fingerprint is None:  # the announced state never came: this client's model
                self._take(fp, client_id, timeout)
                took = need_state = True
                break
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set() or (cancelled is not None and cancelled.is_set()):
                raise RefusedError(
                    f"client {client_id}: the initial model state from client {self.initializer} did not arrive within {timeout:g} s",
                    "unavailable",
                )
            self._cond.wait(min(left, 0.5))
        if need_state:  # (again): its state is awaited from now
            self._pending_until = max(self._pending_until, time.monotonic() + min(timeout, self.limits.initial_state_wait_s))
        again = client_id in self.joined
        self.joined.add(client_id)
        if self._first_join is None:
            self._first_join = time.monotonic()
        self.left.discard(client_id)
        return Admitted(need_state, again, took)

    def reply(self, admitted: Admitted, versions: list[int], next_round: int, instance: str) -> dict[str, Any]:
        """What a joining client learns (caller holds the lock): the plan, the block ``versions`` and the ``next_round``."""
        settings = self.settings
        return {
            "need_state": admitted.need_state,
            "schedule": list(self.plan.schedule) if self.plan is not None else [],
            "rounds": settings.rounds,
            "versions": versions,
            "next_round": next_round,
            "participants": [list(p) for p in settings.participants] if settings.sampled else None,
            "mode": settings.mode,
            "assignment": settings.assignment,
            "clients": settings.clients,
            "staleness": settings.staleness,
            "stale_mix": settings.stale_mix,
            "instance": instance,
        }

    def _take(self, fingerprint: dict[str, Any], client_id: int, timeout: float) -> None:
        """This client's fingerprint becomes the federation's, pending its initial state (caller holds the lock)."""
        self.adopt(fingerprint)
        self.initializer = client_id
        self._pending_until = time.monotonic() + min(timeout, self.limits.initial_state_wait_s)

    def _expire_pending(self) -> bool:
        """Drop a fingerprint whose initial state did not come in time (none arriving); caller holds the lock."""
        if self.ready or self.fingerprint is None or self._uploads or time.monotonic() < self._pending_until:
            return False
        warn.warning(
            "initializer",
            "client %s announced the model but sent no initial state in time; the next client's model is taken",
            self.initializer,
        )
        self.fingerprint = self.partition = self.plan = self.initializer = None
        self._pending_until = math.inf
        return True

    def adopt(self, fingerprint: dict[str, Any]) -> None:
        """Make ``fingerprint`` the federation's model: its partition and plan (caller holds the lock).

        Raises:
            AlgorithmError: settings the mode refuses (nothing changes).
        """
        partition = Partition.from_dict(fingerprint["partition"])
        plan = self.settings.plan(len(partition))
        # only now, with everything built, does the federation take it
        self.fingerprint = fingerprint
        self.partition = partition
        self.plan = plan

    def gathered(self) -> bool:
        """Every client joined once, or ``gather_s`` passed since the first join (caller holds the lock)."""
        if not self._gathered_once:
            waited = self._first_join is not None and time.monotonic() - self._first_join >= self.limits.gather_s
            self._gathered_once = len(self.joined) >= self.settings.clients or waited
        return self._gathered_once

    def update_problem(self, client: int) -> str:
        """Why ``client`` may not send an update yet (not joined, no initial state), or ``''`` (caller holds the lock)."""
        if client not in self.joined:
            return f"client {client} has not joined"
        return "" if self.ready else "no initial state yet"

    def waiting_reply(self) -> dict[str, Any]:
        """The reply to an update that came before the gather window closed: retry (caller holds the lock)."""
        joined, clients = len(self.joined), self.settings.clients
        return {
            "accepted": False,
            "status": "waiting",
            "reason": f"waiting for every client to join ({joined} of {clients})",
            "retry": True,
        }

    def saw(self, client_id: int) -> None:
        """``client_id`` called (join, update, pull, leave): it is alive at this time (caller holds the lock)."""
        if client_id in self.joined:
            self.seen[client_id] = time.time()

    def awaited(self, since: float | None) -> list[int]:
        """The clients whose Leave the end of the run waits for: joined, not left, and seen at ``since`` or later.

        A client that called nothing since (it missed the run's last rounds:
        killed, or its connection gone) is not waited for (caller holds the lock).
        """
        return sorted(c for c in self.joined - self.left if since is None or self.seen.get(c, -math.inf) >= since)

    def readers(self) -> set[int]:
        """The clients that may still read a new version: joined and not left (caller holds the lock)."""
        return self.joined - self.left

    def leave(self, client_id: int, report: Mapping[str, Any] | None) -> None:
        """Record a client's departure and keep its report (caller holds the lock).

        Raises:
            RefusedError: the client never joined.
        """
        if client_id not in self.joined:
            raise RefusedError(f"client {short(client_id, 40)} has not joined; nothing to leave", "refused")
        if report:
            self.reports[client_id] = dict(report)
        self.left.add(client_id)

    # ------------------------------------------------------------ the initial state

    def begin_upload(self, client_id: int, specs: list[Spec]) -> None:
        """An initial-state upload is about to be read (see :meth:`~pl_parablock.server.aggregator.Aggregator.begin_upload`)."""
        with self._cond:
            if self.fingerprint is None:
                raise RefusedError(f"client {client_id} sent an initial state before joining; join first", "refused")
            if client_id != self.initializer or self.ready:
                raise RefusedError(f"client {client_id} may not set the initial state (client {self.initializer} does)", "refused")
            expected = self.fingerprint["tensors"]
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

    def initial_blocks(self, client_id: int, tensors: Mapping[str, Tensor] | StagedTensors) -> list[dict[str, Tensor]] | None:
        """The initial value of every block, checked against the fingerprint; ``None`` if the state is already set.

        The caller installs them (and marks the state :attr:`ready`) unless
        another upload did in the meantime.

        Raises:
            RefusedError: another client sets the state, or the tensors do
                not match the fingerprint or hold NaN or infinite values.
        """
        with self._cond:
            if self.fingerprint is None or client_id != self.initializer:
                raise RefusedError(f"client {client_id} may not set the initial state (client {self.initializer} does)", "refused")
            if self.ready:
                return None
            specs = self.fingerprint["tensors"]
            partition = self.partition
        assert partition is not None
        loaded = dict(tensors) if isinstance(tensors, Mapping) else dict(iter(tensors))
        if set(loaded) != set(specs):
            missing = sorted(set(specs) - set(loaded))[:3]
            extra = sorted(set(loaded) - set(specs))[:3]
            raise RefusedError(f"initial state does not match the fingerprint (missing {missing}, unexpected {extra})", "invalid")
        for name, t in loaded.items():
            if [str(t.dtype).removeprefix("torch."), list(t.shape)] != [specs[name]["dtype"], specs[name]["shape"]]:
                raise RefusedError(f"initial tensor {name!r} does not match the fingerprint", "invalid")
            if t.is_floating_point() and not finite(t):
                raise RefusedError(f"initial tensor {name!r} holds NaN or infinite values", "invalid")
        return [{n: loaded[n] for n in b.params} for b in partition.blocks]

    def state_nbytes(self) -> int | None:
        """Bytes of the whole initial state, once the fingerprint is known."""
        with self._cond:
            if self.fingerprint is None:
                return None
            return sum(int(s["nbytes"]) for s in self.fingerprint["tensors"].values())

    def block_nbytes(self, block: int) -> int:
        """Bytes of a block at float32 or its own dtype, whichever is larger (bound on an update)."""
        assert self.fingerprint is not None and self.partition is not None
        specs = self.fingerprint["tensors"]
        return sum(math.prod(specs[n]["shape"]) * max(4, _itemsize(specs[n]["dtype"])) for n in self.partition.blocks[block].params)

    # ------------------------------------------------------------ checkpoints

    def snapshot(self) -> dict[str, Any]:
        """Its part of a server checkpoint (caller holds the lock)."""
        return {
            "fingerprint": self.fingerprint,
            "initializer": self.initializer,
            "joined": sorted(self.joined),
            "left": sorted(self.left),
            "reports": {str(k): v for k, v in self.reports.items()},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from a checkpoint's part (:meth:`snapshot`), after :meth:`adopt` of its fingerprint (caller holds the lock)."""
        self.initializer = state["initializer"]
        self.ready = True
        self.joined = set(state.get("joined", []))
        self.left = set(state.get("left", []))
        self.reports = {int(k): v for k, v in state.get("reports", {}).items()}
        self._gathered_once = True  # the federation had started
