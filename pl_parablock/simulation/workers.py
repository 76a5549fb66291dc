"""The simulator over several processes and machines: one worker per process, on ``torch.distributed``.

``simulation.workers: W`` (or ``torchrun``'s ``WORLD_SIZE``) splits the
virtual clients among ``W`` processes. A client's state between its rounds
(data position, RNG, optimizer state, upload residuals: plain CPU data)
lives on one worker at a time; every worker builds the model once and runs
the driver's round loop over the clients placed on it. The plan, the
schedule and the sampling are the same everywhere (seeded), and so is the
placement (:class:`Placement`), which every worker computes alike:

* each round's sampled clients are dealt to the workers in client-id order,
  in contiguous runs of equal size (the first ``k mod W`` workers one
  more), so every worker trains as many clients as any other (a round waits
  for its slowest worker; a fixed map would give one worker 6.2 of 10
  sampled clients on average);
* a client with a round in flight (``parablock``: sampled in consecutive
  rounds) keeps its worker, and the others' runs are balanced around it;
* a client placed on another worker than the one holding its state moves
  there first (its :meth:`~pl_parablock.simulation.virtual.VirtualClient.export`,
  a few kB without error feedback or kept optimizer state); every move is
  counted in the report (``clients_moved``, ``client_bytes_moved``).

A round's exchanges (:class:`Workers`):

1. **gather**: each worker's results without their tensors (client, compute
   time, bytes, samples, tokens, weight, loss) reach rank 0, which runs the
   simulated clock and **shares** the clients whose updates arrived in time;
2. **chain**: the on-time updates, in client-id order, fall into runs of
   clients trained on one worker (:meth:`Placement.runs`); the run's worker
   opens the round's :class:`~pl_parablock.simulation.aggregation.ServerRound`
   (or resumes it from the previous run's worker), adds its run's updates
   and sends what it has added (the float64 sums and weight totals; a robust
   rule's kept updates; the clipped clients) to the next run's worker; the
   last sends it to rank 0. So every update is added in client-id order,
   exactly as one process adds them: float64 addition is not associative,
   so summing per worker and then adding the partial sums would not be
   bitwise the same;
3. **share**: rank 0 closes the blocks (the server optimizer's state lives
   there) and sends their new values to every worker, which installs them
   in its own :class:`~pl_parablock.simulation.virtual.ServerBlocks` (a
   deterministic step, so every worker's copy, the server's download
   residual included, stays identical to rank 0's).

Only blocks, sums and the state of a client that moves cross processes. An
error a user can cause (a refused update, bad data) on any worker travels
with these messages and stops every worker with the same message; a worker
that dies ends the others' waits (its connections close, or
``simulation.worker_timeout_s`` passes).

:class:`Solo` is the one-process case: the same calls, no messages.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from pl_parablock import errors
from pl_parablock.errors import FederationError, ParaBlockError
from pl_parablock.recipe.build import available_cores

__all__ = [
    "ENV_KEYS",
    "Group",
    "Placement",
    "Solo",
    "Workers",
    "join_group",
    "launched_by_torchrun",
    "owner_of",
    "rss_mb",
    "spawn_group",
    "worker_threads",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
"""What ``torchrun`` sets for each process it starts."""


def owner_of(client: int, workers: int, clients: int) -> int:
    """The worker that holds ``client`` before the first round: contiguous runs as even as can be (the first ``N mod W`` one longer)."""
    base, extra = divmod(clients, workers)
    edge = extra * (base + 1)
    return client // (base + 1) if client < edge else extra + (client - edge) // base


class Placement:
    """Which worker holds each client's state, and which trains each sampled client of a round (see the module's text).

    Every worker keeps its own copy and calls :meth:`place` with the same
    rounds, so all copies agree without a message.

    Args:
        clients: ``federation.clients``.
        workers: the workers.
        window: the rounds a client's core outlives its last round (the driver's retiring rule: a client not
            sampled at ``t`` is retired once ``t >= last + window``).
        balanced: deal every round evenly (``simulation.placement: balanced``); ``False``: every client stays
            where it was before the first round (``fixed``), and nothing moves.
    """

    def __init__(self, clients: int, workers: int, window: int, *, balanced: bool = True) -> None:
        self.workers = workers
        self.window = window
        self.balanced = balanced
        self.holder = [owner_of(i, workers, clients) for i in range(clients)]
        self.last: dict[int, int] = {}
        self.in_flight: set[int] = set()  # clients whose core may live on (a superset of every worker's own `live`)
        self.trainer: dict[int, int] = {}

    def place(self, round_index: int, sampled: Sequence[int]) -> list[tuple[int, int, int]]:
        """Place round ``round_index``'s ``sampled`` clients; the moves it takes, ``(client, from, to)`` in client order.

        A worker's own retiring happens no earlier than here (it counts only
        rounds a client trained), so a client not kept here has no core.
        """
        t, chosen = round_index, sorted(set(sampled))
        if not self.balanced:
            self.trainer = {i: self.holder[i] for i in chosen}
            return []
        picked = set(chosen)
        self.in_flight = {i for i in self.in_flight if i in picked or t < self.last[i] + self.window}
        kept = [i for i in chosen if i in self.in_flight]
        loads = [0] * self.workers
        for i in kept:
            loads[self.holder[i]] += 1
        counts = [0] * self.workers
        for _ in range(len(chosen) - len(kept)):  # each next client to the least loaded worker (the lowest rank on a tie)
            w = min(range(self.workers), key=lambda w: (loads[w], w))
            loads[w] += 1
            counts[w] += 1
        trainer: dict[int, int] = {i: self.holder[i] for i in kept}
        free = iter(i for i in chosen if i not in trainer)
        for w, n in enumerate(counts):
            for _ in range(n):
                trainer[next(free)] = w
        moves = [(i, self.holder[i], trainer[i]) for i in chosen if trainer[i] != self.holder[i]]
        for i in chosen:
            self.holder[i] = trainer[i]
            self.last[i] = t
            self.in_flight.add(i)
        self.trainer = trainer
        return moves

    def trains(self, client: int, rank: int) -> bool:
        """Whether worker ``rank`` trains ``client`` this round (placed by the last :meth:`place`)."""
        return self.trainer.get(client) == rank

    def runs(self, clients: Sequence[int]) -> list[tuple[int, list[int]]]:
        """``clients`` (sampled this round) in client-id order, cut into runs trained on one worker: ``(worker, run)``."""
        out: list[tuple[int, list[int]]] = []
        for i in sorted(clients):
            w = self.trainer[i]
            if out and out[-1][0] == w:
                out[-1][1].append(i)
            else:
                out.append((w, [i]))
        return out


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment names a world size and a rank)."""
    return all(k in os.environ for k in ENV_KEYS)


def worker_threads(local_workers: int) -> int:
    """The default CPU threads of each of ``local_workers`` workers on this machine: the available cores shared among them."""
    return max(1, available_cores() // max(1, local_workers))


def rss_mb() -> float:
    """This process's resident memory now, in MiB (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


# ---------------------------------------------------------------------------------------------------- errors on the wire


def _wire_error(exc: ParaBlockError, rank: int) -> tuple[str, str]:
    return type(exc).__name__, f"{exc} (on worker {rank})"


def _raise(err: tuple[str, str]) -> None:
    name, message = err
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ParaBlockError)):
        cls = ParaBlockError
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if isinstance(exc, errors.ConfigError):
        exc.problems, exc.source = [message], None
    raise exc


# ---------------------------------------------------------------------------------------------------- groups


class Solo:
    """One process holds every client: no messages (the simulator as it always ran)."""

    rank = 0
    size = 1
    is_root = True
    train_device = None

    def gather(self, work: Callable[[], T]) -> tuple[list[T], None]:
        return [work()], None

    def share(self, value: T, error: tuple[str, str] | None = None) -> T:
        if error is not None:
            _raise(error)
        return value

    def move(self, moves: Sequence[tuple[int, int, int]], send: Callable[[int], Any], receive: Callable[[int, Any], None]) -> int:
        return 0

    def chain(
        self, runs: Sequence[tuple[int, Sequence[int]]], start: Callable[[], Any], add: Callable[[Any, Sequence[int]], None]
    ) -> tuple[Any, None]:
        step = start()
        for _, run in runs:
            add(step, run)
        return step, None

    def close(self) -> None:
        return None


class Workers:
    """This process's place among ``size`` workers of one ``torch.distributed`` group (see the module's description).

    Args:
        rank: this worker.
        size: the workers.
        device: where the group's tensors travel (CPU for gloo, this worker's GPU for NCCL).
    """

    def __init__(self, rank: int, size: int, device: torch.device, train_device: torch.device | None = None) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.train_device = train_device or device
        self.is_root = rank == 0

    @classmethod
    def join(
        cls,
        rank: int,
        size: int,
        clients: int,
        *,
        timeout_s: float,
        device: torch.device,
        init_method: str | None = None,
        store: Any = None,
    ) -> Workers:
        """Join the group (``init_method`` ``env://`` under torchrun, or a store); NCCL when ``device`` is a GPU, else gloo."""
        if clients < size:
            raise errors.ConfigError(f"{size} worker processes but {clients} clients; use at most one worker per client")
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend,
                init_method=init_method,
                store=store,
                rank=rank,
                world_size=size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        except (RuntimeError, ValueError) as exc:  # torch's DistError and store timeouts are RuntimeErrors
            raise FederationError(
                f"worker {rank} of {size} could not join the others within simulation.worker_timeout_s={timeout_s:g} s: {exc}"
            ) from None
        return cls(rank, size, device)

    # ------------------------------------------------------------ exchanges

    def gather(self, work: Callable[[], T]) -> tuple[list[T] | None, tuple[str, str] | None]:
        """Run ``work`` here; rank 0 gets every worker's value, in rank order, and the first error (others: ``None``)."""
        try:
            mine: tuple[Any, Any] = (work(), None)
        except ParaBlockError as exc:
            mine = (None, _wire_error(exc, self.rank))
        out: list[Any] | None = [None] * self.size if self.is_root else None
        self._wait(lambda: dist.gather_object(mine, out, dst=0))
        if out is None:
            return None, None
        error = next((e for _, e in out if e is not None), None)
        return [v for v, _ in out], error

    def share(self, value: T, error: tuple[str, str] | None = None) -> T:
        """Rank 0's ``value`` (tensors in it travel as tensors), or its ``error`` raised on every worker."""
        box: list[Any] = [(_skeleton(value), error) if self.is_root else None]
        self._wait(lambda: dist.broadcast_object_list(box, src=0, device=torch.device("cpu")))
        skeleton, err = box[0]
        if err is not None:
            _raise(err)
        tensors = _tensors(value) if self.is_root else _empty(skeleton)
        for t in tensors:
            self._transfer(t, lambda x: dist.broadcast(x, src=0))
        return _filled(skeleton, tensors)

    def move(self, moves: Sequence[tuple[int, int, int]], send: Callable[[int], Any], receive: Callable[[int, Any], None]) -> int:
        """Carry out the round's ``moves`` (``(client, from, to)``, the same list on every worker, in its order).

        The worker a client leaves sends ``send(client)``; the one it comes to
        gets it through ``receive(client, state)``. Returns the bytes of
        tensors this worker sent.
        """
        sent = 0
        for client, src, dst in moves:
            if self.rank == src:
                sent += self._send(dst, send(client), None)
            elif self.rank == dst:
                state, _ = self._receive(src)
                receive(client, state)
        return sent

    def chain(
        self, runs: Sequence[tuple[int, Sequence[int]]], start: Callable[[], Any], add: Callable[[Any, Sequence[int]], None]
    ) -> tuple[Any, tuple[str, str] | None]:
        """The round's step through each run's worker in turn (``runs``: ``(worker, clients)``, in client order), then rank 0.

        ``start()`` opens a step (every worker the same way); ``add(step,
        clients)`` adds this worker's on-time updates of a run. Returns, on
        rank 0, the step with everything added and the first error
        (others: ``None``).
        """
        if not runs:
            return (start(), None) if self.rank == 0 else (None, None)
        step, error = None, None
        last = len(runs) - 1
        for at, (worker, clients) in enumerate(runs):
            if worker != self.rank:
                continue
            step = start()
            if at > 0:
                state, error = self._receive(runs[at - 1][0])
                if state is not None:
                    step.resume(state)
            if error is None:
                try:
                    add(step, clients)
                except ParaBlockError as exc:
                    error = _wire_error(exc, self.rank)
            if at < last:
                self._send(runs[at + 1][0], None if error else step.export(), error)
            elif self.rank != 0:
                self._send(0, None if error else step.export(), error)
        if self.rank != 0:
            return None, None
        if runs[last][0] != 0:  # the round's sums, every on-time update added, back on rank 0
            state, error = self._receive(runs[last][0])
            step = start()
            if state is not None:
                step.resume(state)
        return step, error

    def close(self) -> None:
        """Leave the group."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------ transport

    def _send(self, dst: int, value: Any, error: tuple[str, str] | None) -> int:
        """``value`` (or ``error``) to worker ``dst``; the bytes of its tensors."""
        skeleton = _skeleton(value)
        self._wait(lambda: dist.send_object_list([(skeleton, error)], dst=dst, device=torch.device("cpu")))
        tensors = _tensors(value)
        for t in tensors:
            self._transfer(t, lambda x: dist.send(x, dst=dst))
        return sum(t.numel() * t.element_size() for t in tensors)

    def _receive(self, src: int) -> tuple[Any, tuple[str, str] | None]:
        box: list[Any] = [None]
        self._wait(lambda: dist.recv_object_list(box, src=src, device=torch.device("cpu")))
        skeleton, error = box[0]
        tensors = _empty(skeleton)
        for t in tensors:
            self._transfer(t, lambda x: dist.recv(x, src=src))
        return _filled(skeleton, tensors), error

    def _transfer(self, t: Tensor, op: Callable[[Tensor], Any]) -> None:
        """``op`` on ``t`` (in place), through this worker's device when the group is NCCL's."""
        if self.device.type == "cpu":
            self._wait(lambda: op(t))
            return
        on = t.to(self.device)
        self._wait(lambda: op(on))
        t.copy_(on.cpu())

    def _wait(self, op: Callable[[], Any]) -> None:
        try:
            op()
        except (RuntimeError, ValueError) as exc:  # a peer died (its connections closed) or the wait timed out
            raise FederationError(
                f"worker {self.rank} of {self.size}: another worker stopped or did not answer within "
                f"simulation.worker_timeout_s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "see that worker's own error"
            ) from None


# ---------------------------------------------------------------------------------------------------- tensors in messages


class _Slot:
    """Where a tensor was in a message: its index, shape and dtype (the tensor itself travels on its own)."""

    __slots__ = ("dtype", "index", "shape")

    def __init__(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.index, self.shape, self.dtype = index, shape, dtype

    def __reduce__(self) -> tuple[Any, ...]:
        return _Slot, (self.index, self.shape, self.dtype)


def _walk(value: Any, on_leaf: Callable[[Any], Any], leaf: type = Tensor) -> Any:
    """``value`` rebuilt with each ``leaf`` (a tensor, or a :class:`_Slot`) replaced by ``on_leaf(leaf)``."""
    if isinstance(value, leaf):
        return on_leaf(value)
    if isinstance(value, dict):
        return {k: _walk(v, on_leaf, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_walk(v, on_leaf, leaf) for v in value]
        return out if isinstance(value, list) else tuple(out)
    return value


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of ``value``, in the order :func:`_skeleton` numbers them (contiguous, on the CPU)."""
    found: list[Tensor] = []
    _walk(value, lambda t: found.append(t.detach().to("cpu").contiguous()))
    return found


def _skeleton(value: Any) -> Any:
    """``value`` with each tensor replaced by its :class:`_Slot`."""
    count = [0]

    def slot(t: Tensor) -> _Slot:
        count[0] += 1
        return _Slot(count[0] - 1, tuple(t.shape), t.dtype)

    return _walk(value, slot)


def _empty(skeleton: Any) -> list[Tensor]:
    slots: list[_Slot] = []
    _walk(skeleton, slots.append, _Slot)
    return [torch.empty(s.shape, dtype=s.dtype) for s in sorted(slots, key=lambda s: s.index)]


def _filled(skeleton: Any, tensors: list[Tensor]) -> Any:
    return _walk(skeleton, lambda s: tensors[s.index], _Slot)


Group = Solo | Workers


# ---------------------------------------------------------------------------------------------------- starting workers


def _devices(accelerator: str, local_rank: int, local_size: int) -> tuple[torch.device, torch.device]:
    """The device a worker trains on and the one its messages travel through (its GPU for NCCL, else the CPU)."""
    from pl_parablock.simulation.driver import device_of

    device = device_of(accelerator)
    if device.type != "cuda":
        return device, torch.device("cpu")
    count = torch.cuda.device_count()
    own = torch.device("cuda", local_rank % max(1, count))
    torch.cuda.set_device(own)
    return own, (own if count >= local_size else torch.device("cpu"))  # NCCL only when every worker has its own GPU


def join_group(
    rank: int,
    size: int,
    recipe: Any,
    *,
    local_rank: int,
    local_size: int,
    timeout_s: float,
    init_method: str | None = None,
    port: int | None = None,
    store: Any = None,
) -> Workers:
    """Join the workers' group as ``rank`` of ``size``: by ``init_method`` (``env://`` under torchrun), rank 0's ``port`` or a ``store``."""
    train, comm = _devices(recipe.train.accelerator, local_rank, local_size)
    if store is None and port is not None:
        try:
            store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
            store.set(f"ready/{rank}", "1")
        except (RuntimeError, ValueError) as exc:
            raise FederationError(f"worker {rank} could not reach rank 0 at 127.0.0.1:{port}: {exc}") from None
    group = Workers.join(rank, size, recipe.federation.clients, timeout_s=timeout_s, device=comm, init_method=init_method, store=store)
    group.train_device = train
    return group


def spawn_group(size: int, timeout_s: float, recipes: Sequence[Any], target: Callable[..., None], body: Callable[[Workers], T]) -> T:
    """This process as rank 0 of ``size`` workers, the others started here (spawn), all joined when ``body`` returns or fails.

    ``target(rank, size, port, recipes, timeout_s)`` runs in each started
    process. A worker that exits before joining stops the start with its
    exit code; one that dies later ends rank 0's next exchange (its
    connections close; at worst ``timeout_s`` passes). Every started
    process is joined (terminated if it has not ended within a few seconds
    of the group's end).
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    td = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=td, wait_for_workers=False)
    procs = [ctx.Process(target=target, args=(r, size, store.port, list(recipes), timeout_s), daemon=True) for r in range(1, size)]
    for p in procs:
        p.start()
    group: Workers | None = None
    try:
        _await_ready(store, procs, timeout_s)
        group = join_group(0, size, recipes[0], local_rank=0, local_size=size, timeout_s=timeout_s, store=store)
        return body(group)
    except FederationError as exc:
        dead = [f"worker {r} exited with status {p.exitcode}" for r, p in enumerate(procs, 1) if p.exitcode not in (None, 0)]
        if dead and group is not None:
            raise FederationError(f"{'; '.join(dead)} (its error is printed above); {exc}") from None
        raise
    finally:
        if group is not None:
            group.close()
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def _await_ready(store: Any, procs: Sequence[Any], timeout_s: float) -> None:
    """Wait until every started worker has reached the store; a worker that exits first stops the wait with its status."""
    deadline = time.monotonic() + timeout_s
    keys = [f"ready/{r}" for r in range(1, len(procs) + 1)]
    while not store.check(keys):
        for r, p in enumerate(procs, 1):
            if not p.is_alive():
                raise FederationError(f"worker {r} exited with status {p.exitcode} before joining (its error is printed above)")
        if time.monotonic() > deadline:
            raise FederationError(f"the worker processes did not start within simulation.worker_timeout_s={timeout_s:g} s")
        time.sleep(0.05)
