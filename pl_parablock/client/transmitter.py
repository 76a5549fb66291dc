"""The transmitter thread(s) of a client and its mailbox.

The training thread hands each finished block to :meth:`Transmitter.send`
and goes on. The transmitter takes hand-offs in order (FIFO), uploads
each, waits for the server's aggregate of that round, downloads the block's
new global value and posts it to the mailbox, where the training thread picks
it up with :meth:`Transmitter.wait` (blocking, with a timeout) or
:meth:`Transmitter.poll`. A hand-off without tensors (a round this client
was not sampled for) only fetches the aggregate.

Half or full duplex. By default (``staleness`` 1, the paper's ParaBlock) one
thread does a round's upload, its wait for the server and its download, one
after another, then the next round's. With ``duplex=True`` (``federation.staleness``
of 2 or more: DESIGN §1.1 "Staleness k") two threads share the work, one per
direction of the link: the *upload* thread encodes and uploads the hand-offs
in order and passes each uploaded round to the *download* thread, which
waits for that round's aggregate, downloads it and posts it, in the same
order. So round ``t + 1`` uploads while round ``t`` waits for the server and
downloads, and in steady state a round lasts ``max(compute, upload,
download)`` rather than ``max(compute, upload + server wait + download)``.
Arrivals are posted in round order whichever the mode (the core applies
them only so). Each direction moves one transfer at a time, as a link that
is full duplex but not shared between transfers of one direction.

Faults. A lost or corrupted connection is retried with exponential backoff
(0.5 s doubling to 10 s) until ``timeout_s`` has passed: an upload the server
did not acknowledge is sent again (the server ignores a repeat it already
applied), a download is asked for again. (Half duplex: one ``timeout_s`` for
a round's upload and download together; full duplex: one for each.) An
update that arrives after its round closed is dropped by the server and
counted as late; the client then takes the aggregate without it. If the
server answering is another instance than the one joined (it restarted), the
thread stops with :class:`~pl_parablock.errors.ServerRestarted` so the client
can rejoin.

Any error (of either thread) is kept with its traceback and raised on the
training thread at its next call, as a :class:`~pl_parablock.errors.TransmitterError`
whose ``__cause__`` is the original error; after an error neither thread
starts another transfer. The threads are daemons, so a crashed training
loop never hangs the interpreter, and :meth:`close` joins them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import Tensor

from pl_parablock.client.transport import Pulled, Pushed, Transport
from pl_parablock.core.client import Update
from pl_parablock.errors import ParaBlockError, ServerRestarted, TransmitterError, TransportError

__all__ = ["Arrival", "Handoff", "Transmitter"]

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 10.0)


Handoff = Update
"""A finished round's block as handed to the transmitter (the core's :class:`~pl_parablock.core.client.Update`)."""


@dataclass
class Arrival:
    """The global value of a round's block, with the transfer's measurements.

    ``sent_at``: when the round's upload began (its encoding included);
    ``upload_s``: the upload; ``server_wait_s``: from the download's request
    to its first byte (full duplex: the request goes once the download of the
    round before is done, so this is the wait the downlink saw);
    ``download_s``: the download; ``arrived_at``: when it was posted.
    """

    round: int
    block: int
    version: int
    tensors: dict[str, Tensor] = field(repr=False)
    upload_s: float
    server_wait_s: float
    download_s: float
    bytes_up: int
    bytes_down: int
    sent_at: float
    arrived_at: float
    late: bool = False
    retries: int = 0
    kind: str = "value"
    """``value``: ``tensors`` is the global value; ``delta``: the decoded broadcast ``D`` (apply ``g + D``)."""
    base_versions: dict[int, int] = field(default_factory=dict)


@dataclass
class _Retries:
    """Retry bookkeeping of one round's transfers: how many so far and the next backoff."""

    count: int = 0
    backoff: float = field(default_factory=lambda: BACKOFF_S[0])


@dataclass
class _Uploaded:
    """A round's upload done (or nothing to upload), handed from the upload thread to the download thread."""

    job: Update
    pushed: Pushed | None
    sent_at: float
    retries: _Retries
    deadline: float  # half duplex: the download's too (one ``timeout_s`` for both)


T = TypeVar("T")


class Transmitter:
    """The communication thread(s) of one client.

    Args:
        transport: how to reach the server.
        client_id: this client's id.
        timeout_s: longest single network wait (upload, aggregate, download),
            retries included.
        instance: the server instance joined; a reply from another one stops
            the thread with :class:`ServerRestarted`.
        duplex: one thread per direction (upload, download) instead of one
            for both: round ``t + 1`` uploads while round ``t``'s aggregate
            is awaited and downloaded (``federation.staleness`` >= 2).
    """

    def __init__(
        self, transport: Transport, client_id: int, *, timeout_s: float = 600.0, instance: str | None = None, duplex: bool = False
    ) -> None:
        self.transport = transport
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.instance = instance
        self.duplex = duplex
        self._jobs: queue.Queue[Update | None] = queue.Queue()
        self._uploaded: queue.Queue[_Uploaded | None] = queue.Queue()  # duplex: upload thread -> download thread, in order
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._arrivals: dict[int, Arrival] = {}
        self._error: BaseException | None = None
        self._error_round: int | None = None
        name = f"pl_parablock-transmitter-{client_id}"
        if duplex:
            self._threads = [
                threading.Thread(target=self._run_uploads, name=f"{name}-up", daemon=True),
                threading.Thread(target=self._run_downloads, name=f"{name}-down", daemon=True),
            ]
        else:
            self._threads = [threading.Thread(target=self._run, name=name, daemon=True)]
        self._thread = self._threads[-1]  # the thread that posts arrivals
        self._started = False
        self._closed = False

    def start(self) -> None:
        if not self._started:
            for t in self._threads:
                t.start()
            self._started = True

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            where = f" in round {self._error_round}" if self._error_round is not None else ""
            cause = self._error
            msg = str(cause) if isinstance(cause, ParaBlockError) else f"{type(cause).__name__}: {cause}"
            raise TransmitterError(f"client {self.client_id}: transmitter thread failed{where}: {msg}") from cause

    def check(self) -> None:
        """Raise the transmitter thread's error, if it failed."""
        with self._cond:
            self._raise_if_failed()

    def send(self, handoff: Update) -> None:
        """Queue a finished block (or a fetch-only round) for the thread; returns at once."""
        self.check()
        if self._closed:
            raise TransmitterError(f"client {self.client_id}: transmitter is closed")
        self.start()
        self._jobs.put(handoff)

    def poll(self, round_index: int) -> Arrival | None:
        """Take the aggregate of ``round_index`` if it has arrived."""
        with self._cond:
            self._raise_if_failed()
            return self._arrivals.pop(round_index, None)

    def wait(self, round_index: int, timeout: float | None = None) -> Arrival:
        """Block until the aggregate of ``round_index`` arrives and take it.

        Raises:
            TransmitterError: a thread failed, or nothing arrived within ``timeout``.
        """
        limit = self.timeout_s * 3 if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._cond:
            while round_index not in self._arrivals:
                self._raise_if_failed()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransmitterError(
                        f"client {self.client_id}: the aggregate of round {round_index} did not arrive within {limit:g} s"
                    )
                if not self._thread.is_alive() and self._started:
                    raise TransmitterError(f"client {self.client_id}: transmitter thread stopped before round {round_index} arrived")
                self._cond.wait(min(left, 1.0))
            return self._arrivals.pop(round_index)

    # ------------------------------------------------------------ the threads

    def _fail(self, round_index: int, exc: BaseException) -> None:
        """Keep a thread's error for the training thread (the first one wins) and wake it."""
        quiet = isinstance(exc, ParaBlockError)
        log.log(
            logging.WARNING if isinstance(exc, ServerRestarted) else logging.ERROR,
            "client %d: transmitter stopped in round %d: %s",
            self.client_id,
            round_index,
            exc,
            exc_info=not quiet,
        )
        with self._cond:
            if self._error is None:
                self._error = exc
                self._error_round = round_index
            self._cond.notify_all()

    def _post(self, arrival: Arrival) -> None:
        with self._cond:
            self._arrivals[arrival.round] = arrival
            self._cond.notify_all()

    def _run(self) -> None:
        """Half duplex: each round's upload, wait and download, then the next round's."""
        while True:
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                return
            try:
                up = self._upload(job)
                arrival = self._download(up, up.deadline)
            except BaseException as exc:  # reported to the training thread
                self._fail(job.round, exc)
                return
            self._post(arrival)

    def _run_uploads(self) -> None:
        """Full duplex, the upload thread: each hand-off uploaded in turn, then passed on to the download thread."""
        try:
            while True:
                job = self._jobs.get()
                if job is None or self._stop.is_set() or self._error is not None:
                    return
                try:
                    up = self._upload(job)
                except BaseException as exc:  # reported to the training thread
                    self._fail(job.round, exc)
                    return
                self._uploaded.put(up)
        finally:
            self._uploaded.put(None)  # the download thread ends once it has done the rounds uploaded before

    def _run_downloads(self) -> None:
        """Full duplex, the download thread: each uploaded round's aggregate awaited, downloaded and posted, in order."""
        while True:
            up = self._uploaded.get()
            if up is None or self._stop.is_set() or self._error is not None:
                return
            try:
                arrival = self._download(up, time.monotonic() + self.timeout_s)
            except BaseException as exc:  # reported to the training thread
                self._fail(up.job.round, exc)
                return
            self._post(arrival)

    # ------------------------------------------------------------ the transfers

    def _same_server(self, instance: str | None) -> None:
        if self.instance is not None and instance is not None and instance != self.instance:
            raise ServerRestarted(f"the server restarted (instance {instance[:8]}, joined {self.instance[:8]})")

    def _retrying(self, job: Update, deadline: float, retries: _Retries, attempt: Callable[[float], T]) -> T:
        """``attempt(seconds left)`` until it succeeds, retrying a lost connection with backoff until ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TransportError(f"gave up after {retries.count} retries within {self.timeout_s:g} s (federation.timeout_s)")
                return attempt(left)
            except TransportError as exc:
                if time.monotonic() + retries.backoff > deadline or self._stop.is_set():
                    raise
                retries.count += 1
                log.warning("client %d round %d: %s; retry %d in %.1f s", self.client_id, job.round, exc, retries.count, retries.backoff)
                if self._stop.wait(retries.backoff):
                    raise TransmitterError("transmitter closed while retrying") from exc
                retries.backoff = min(retries.backoff * 2, BACKOFF_S[1])

    def _upload(self, job: Update) -> _Uploaded:
        """Encode and upload a hand-off (nothing for a fetch-only round), within ``timeout_s``."""
        sent_at = time.time()
        job.encode()  # a lossy codec's work happens here, on this thread, not on the training thread
        deadline = time.monotonic() + self.timeout_s
        header: Mapping[str, Any] = {
            "client_id": self.client_id,
            "round": job.round,
            "block": job.block,
            "kind": job.kind,
            "base_version": job.base_version,
            "weight": job.weight,
            "loss": job.loss,
            "codec": job.codec,
        }
        retries = _Retries()

        def push(left: float) -> Pushed:
            assert job.tensors is not None
            reply = self.transport.push(header, job.tensors, left)
            self._same_server(reply.instance)
            if reply.status in ("accepted", "duplicate", "late"):
                job.tensors = None  # uploaded: the block is not held while the aggregate is awaited
                if reply.status == "late":
                    log.warning("client %d: round %d update arrived late and was dropped; taking the aggregate", self.client_id, job.round)
                return reply
            if reply.retry:
                raise TransportError(reply.reason)
            raise TransmitterError(f"the server rejected the update of round {job.round}: {reply.reason}")

        pushed = self._retrying(job, deadline, retries, push) if job.tensors is not None else None
        return _Uploaded(job, pushed, sent_at, retries, deadline)

    def _download(self, up: _Uploaded, deadline: float) -> Arrival:
        """Wait for an uploaded round's aggregate and download it."""
        job = up.job

        def pull(left: float) -> Pulled:
            pulled = self.transport.pull(self.client_id, job.round, max(deadline - time.monotonic(), 1.0))
            self._same_server(pulled.instance)
            return pulled

        pulled = self._retrying(job, deadline, up.retries, pull)
        if pulled.block != job.block:
            raise TransmitterError(f"round {job.round}: the server sent block {pulled.block}, expected {job.block}")
        pushed = up.pushed
        return Arrival(
            round=job.round,
            block=job.block,
            version=pulled.version,
            tensors=pulled.tensors,
            upload_s=pushed.upload_s if pushed else 0.0,
            server_wait_s=pulled.server_wait_s,
            download_s=pulled.download_s,
            bytes_up=pushed.nbytes if pushed else 0,
            bytes_down=pulled.nbytes,
            sent_at=up.sent_at,
            arrived_at=time.time(),
            late=pushed is not None and pushed.status == "late",
            retries=up.retries.count,
            kind=pulled.kind,
            base_versions=pulled.base_versions,
        )

    def close(self, timeout: float = 10.0, *, cancel_pending: bool = False) -> None:
        """Stop after the queued hand-offs and join the thread(s) (bounded by ``timeout`` in all).

        Args:
            timeout: longest wait for the threads to end.
            cancel_pending: drop hand-offs not yet started and stop retrying
                (after a failure or a server restart).
        """
        if self._closed:
            return
        self._closed = True
        if self._started:
            if cancel_pending:
                self._stop.set()
                queues: tuple[queue.Queue[Any], ...] = (self._jobs, self._uploaded)
                for q in queues:
                    while True:
                        try:
                            q.get_nowait()
                        except queue.Empty:
                            break
                if self.duplex:
                    self._uploaded.put(None)
            self._jobs.put(None)
            deadline = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(deadline - time.monotonic(), 0.0))
            busy = [t.name for t in self._threads if t.is_alive()]
            if busy:
                log.warning(
                    "client %d: transmitter thread %s still busy after %g s; it is a daemon and ends with the process",
                    self.client_id,
                    ", ".join(busy),
                    timeout,
                )
