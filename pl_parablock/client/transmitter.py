"""The transmitter thread of a client and its mailbox.

The training thread hands each finished block to :meth:`Transmitter.send`
and goes on. The transmitter thread takes hand-offs in order (FIFO), uploads
each, waits for the server's aggregate of that round, downloads the block's
new global value and posts it to the mailbox, where the training thread picks
it up with :meth:`Transmitter.wait` (blocking, with a timeout) or
:meth:`Transmitter.poll`. A hand-off without tensors (a round this client
was not sampled for) only fetches the aggregate.

Faults. A lost or corrupted connection is retried with exponential backoff
(0.5 s doubling to 10 s) until ``timeout_s`` has passed: an upload the server
did not acknowledge is sent again (the server ignores a repeat it already
applied), a download is asked for again. An update that arrives after its
round closed is dropped by the server and counted as late; the client then
takes the aggregate without it. If the server answering is another instance
than the one joined (it restarted), the thread stops with
:class:`~pl_parablock.errors.ServerRestarted` so the client can rejoin.

Any error is kept with its traceback and raised on the training thread at
its next call, as a :class:`~pl_parablock.errors.TransmitterError` whose
``__cause__`` is the original error. The thread is a daemon, so a crashed
training loop never hangs the interpreter, and :meth:`close` joins it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
    """The global value of a round's block, with the transfer's measurements."""

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


class Transmitter:
    """The communication thread of one client.

    Args:
        transport: how to reach the server.
        client_id: this client's id.
        timeout_s: longest single network wait (upload, aggregate, download),
            retries included.
        instance: the server instance joined; a reply from another one stops
            the thread with :class:`ServerRestarted`.
    """

    def __init__(self, transport: Transport, client_id: int, *, timeout_s: float = 600.0, instance: str | None = None) -> None:
        self.transport = transport
        self.client_id = client_id
        self.timeout_s = timeout_s
        self.instance = instance
        self._jobs: queue.Queue[Update | None] = queue.Queue()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._arrivals: dict[int, Arrival] = {}
        self._error: BaseException | None = None
        self._error_round: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"pl_parablock-transmitter-{client_id}", daemon=True)
        self._started = False
        self._closed = False

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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
            TransmitterError: the thread failed, or nothing arrived within ``timeout``.
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

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                return
            try:
                arrival = self._transmit(job)
            except BaseException as exc:  # reported to the training thread
                quiet = isinstance(exc, ParaBlockError)
                log.log(
                    logging.WARNING if isinstance(exc, ServerRestarted) else logging.ERROR,
                    "client %d: transmitter stopped in round %d: %s",
                    self.client_id,
                    job.round,
                    exc,
                    exc_info=not quiet,
                )
                with self._cond:
                    self._error = exc
                    self._error_round = job.round
                    self._cond.notify_all()
                return
            with self._cond:
                self._arrivals[job.round] = arrival
                self._cond.notify_all()

    def _same_server(self, instance: str | None) -> None:
        if self.instance is not None and instance is not None and instance != self.instance:
            raise ServerRestarted(f"the server restarted (instance {instance[:8]}, joined {self.instance[:8]})")

    def _transmit(self, job: Update) -> Arrival:
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
        pushed: Pushed | None = None
        retries = 0
        backoff = BACKOFF_S[0]
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TransportError(f"gave up after {retries} retries within {self.timeout_s:g} s (federation.timeout_s)")
                if job.tensors is not None and pushed is None:
                    reply = self.transport.push(header, job.tensors, left)
                    self._same_server(reply.instance)
                    if reply.status in ("accepted", "duplicate", "late"):
                        pushed = reply
                        job.tensors = None  # uploaded: the block is not held while the aggregate is awaited
                        if reply.status == "late":
                            log.warning(
                                "client %d: round %d update arrived late and was dropped; taking the aggregate", self.client_id, job.round
                            )
                    elif reply.retry:
                        raise TransportError(reply.reason)
                    else:
                        raise TransmitterError(f"the server rejected the update of round {job.round}: {reply.reason}")
                pulled: Pulled = self.transport.pull(self.client_id, job.round, max(deadline - time.monotonic(), 1.0))
                self._same_server(pulled.instance)
                break
            except TransportError as exc:
                if time.monotonic() + backoff > deadline or self._stop.is_set():
                    raise
                retries += 1
                log.warning("client %d round %d: %s; retry %d in %.1f s", self.client_id, job.round, exc, retries, backoff)
                if self._stop.wait(backoff):
                    raise TransmitterError("transmitter closed while retrying") from exc
                backoff = min(backoff * 2, BACKOFF_S[1])
        if pulled.block != job.block:
            raise TransmitterError(f"round {job.round}: the server sent block {pulled.block}, expected {job.block}")
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
            sent_at=sent_at,
            arrived_at=time.time(),
            late=pushed is not None and pushed.status == "late",
            retries=retries,
            kind=pulled.kind,
            base_versions=pulled.base_versions,
        )

    def close(self, timeout: float = 10.0, *, cancel_pending: bool = False) -> None:
        """Stop after the queued hand-offs and join the thread (bounded by ``timeout``).

        Args:
            timeout: longest wait for the thread to end.
            cancel_pending: drop hand-offs not yet started and stop retrying
                (after a failure or a server restart).
        """
        if self._closed:
            return
        self._closed = True
        if self._started:
            if cancel_pending:
                self._stop.set()
                while True:
                    try:
                        self._jobs.get_nowait()
                    except queue.Empty:
                        break
            self._jobs.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "client %d: transmitter thread still busy after %g s; it is a daemon and ends with the process", self.client_id, timeout
                )
