"""gRPC server of a federation.

Serves a :class:`~pl_parablock.server.service.FederationService` with
generic handlers whose messages are raw bytes (the project's own framing, see
:mod:`pl_parablock.wire.framing`), so no generated protobuf code is
needed. Binds to 127.0.0.1 unless told otherwise; with a
:class:`~pl_parablock.wire.channel.TLS` certificate and key it serves
TLS only. Clients authenticate with a bearer token in the ``authorization``
metadata. The service name, the methods, the channel options and the token
metadata are those of :mod:`pl_parablock.wire.channel`, which the
clients' transports share; this module imports nothing of the client side.

Against an untrusted network peer (README: "What the server defends against"):

* **Authentication before work.** Every method is served as a
  request-streaming handler (on the wire the same as the unary calls
  clients make), so the handler runs as soon as a call's metadata arrives:
  it checks the token there, before it reads any message, and an
  unauthenticated call holds a handler thread only for that check.
* **Bounded calls.** At most ``max_calls`` calls run at once (gRPC's
  ``maximum_concurrent_rpcs``: the rest are refused at once with
  ``RESOURCE_EXHAUSTED``, never queued) and at most ``max_calls_per_peer``
  per peer (a client id with per-client tokens, else a host).
* **Bounded uploads.** At most ``max_uploads`` uploads (``Push``,
  ``UploadState``) are read at once, one per client id when every client
  has its own token; the others wait their turn and give up at their call's
  deadline. The project's clients send nothing while they wait: on the
  data plane (:mod:`pl_parablock.wire.dataplane`) until the server's
  go, over gRPC in a small ``Admit`` call before they open the upload (the
  turn is then reserved for the upload for :data:`ADMIT_LEASE_S`). A gRPC
  upload opened without a turn waits with its stream open, the server
  reading none of its bytes: it is held back by HTTP/2 flow control, one
  receive window per connection at most.
* **Bounded downloads.** A download's next chunk is produced only once
  gRPC has taken the previous one, which it does as the client's receive
  window allows: a peer that stops reading holds about its window and a
  chunk of the server's memory, not the block (tested with a real client
  that stops reading), until the call's deadline cuts it.
* **Deadlines of the server's own.** A call whose peer sends nothing for
  ``idle_timeout_s`` while the server waits for its next message (a
  half-open or trickling stream) is cut, and so is every call still running
  ``call_timeout_s`` after it began; waits inside the service end when the
  caller cancels or goes away.
* **One line per bad request.** Refusals map to gRPC status codes with a
  one-line reason; only a bug in the server logs a traceback, and warnings
  about a peer are rate-limited.

Example::

    >>> from pl_parablock.federation import Aggregator, FederationServer, FederationService
    >>> server = FederationServer(FederationService(Aggregator(clients=1, rounds=1)))
    >>> address = server.start()          # '127.0.0.1:PORT'
    >>> server.stop()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import platform
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from pl_parablock.errors import FederationError, ParaBlockError
from pl_parablock.server._ratelimit import RateLimitedLog
from pl_parablock.server.dataplane import DataPlaneServer
from pl_parablock.server.service import Caller, FederationService
from pl_parablock.server.validation import RefusedError
from pl_parablock.wire.channel import MESSAGE_OPTIONS, METHODS, SERVER_OPTIONS, SERVICE_NAME, TLS, UPLOAD_SLOT, UPLOADS, bearer_token
from pl_parablock.wire.dataplane import DATA_METHODS
from pl_parablock.wire.framing import header_bytes

__all__ = ["FederationServer", "peer_host", "token_of", "tune_server_memory"]

log = logging.getLogger(__name__)
warn = RateLimitedLog(log)

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "refused": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
IDLE_TIMEOUT_S = 60.0
"""Default of ``federation.idle_timeout_s``."""


def token_of(context: grpc.ServicerContext) -> str | None:
    """The bearer token of a call's metadata, if any."""
    return bearer_token(context.invocation_metadata())


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:10.0.0.5:4321`` -> ``ipv4:10.0.0.5``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer[:200]


class _Call:
    """One call the server admitted: who, since when, until when, and whether it waits for the peer."""

    __slots__ = ("caller", "context", "deadline", "key", "method", "reading_since")

    def __init__(self, method: str, key: str, caller: Caller, context: grpc.ServicerContext, deadline: float) -> None:
        self.method = method
        self.key = key
        self.caller = caller
        self.context = context
        self.deadline = deadline
        self.reading_since: float | None = None


class _Guard:
    """Admission per peer and the watchdog that cuts idle and overdue calls."""

    def __init__(self, *, per_peer: int, idle_timeout_s: float, call_timeout_s: float, on_cut: Callable[[], None]) -> None:
        self.per_peer = per_peer
        self.idle_timeout_s = idle_timeout_s
        self.call_timeout_s = call_timeout_s
        self._on_cut = on_cut
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._per_key: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pl_parablock-server-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def admit(self, method: str, key: str, caller: Caller, context: grpc.ServicerContext) -> _Call:
        with self._lock:
            if self._per_key.get(key, 0) >= self.per_peer:
                warn.warning(key, "refused a %s call from %s: it already has %d calls running", method, key, self.per_peer)
                raise RefusedError(f"too many calls at once from {key} (at most {self.per_peer}); retry later", "exhausted")
            call = _Call(method, key, caller, context, time.monotonic() + self.call_timeout_s)
            caller.deadline = call.deadline
            self._calls.add(call)
            self._per_key[key] = self._per_key.get(key, 0) + 1
        return call

    def release(self, call: _Call) -> None:
        with self._lock:
            if call in self._calls:
                self._calls.discard(call)
                left = self._per_key.get(call.key, 1) - 1
                if left:
                    self._per_key[call.key] = left
                else:
                    self._per_key.pop(call.key, None)

    def active(self) -> int:
        with self._lock:
            return len(self._calls)

    def methods(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for call in self._calls:
                counts[call.method] = counts.get(call.method, 0) + 1
            return counts

    def _watch(self) -> None:
        tick = max(0.05, min(0.5, self.idle_timeout_s / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                reading = call.reading_since
                if reading is not None and now - reading > self.idle_timeout_s:
                    self._cut(call, f"sent nothing for {self.idle_timeout_s:g} s (federation.idle_timeout_s)")
                elif now > call.deadline:
                    self._cut(call, f"ran past the server's limit of {self.call_timeout_s:g} s per call")

    def _cut(self, call: _Call, why: str) -> None:
        with self._lock:
            if call not in self._calls:
                return
            call.deadline = math.inf  # cut once
            call.reading_since = None
        warn.warning(call.key, "cut a %s call from %s: it %s", call.method, call.key, why)
        call.caller.cancelled.set()
        call.context.cancel()
        self._on_cut()


def _reading(messages: Iterator[bytes], call: _Call) -> Iterator[bytes]:
    """The call's messages; while it waits for the next one, the watchdog may cut an idle peer."""
    while True:
        call.reading_since = time.monotonic()
        try:
            message = next(messages)
        except StopIteration:
            return
        finally:
            call.reading_since = None
        yield message


def _metadata(context: grpc.ServicerContext, key: str) -> str | None:
    for k, value in context.invocation_metadata() or ():
        if k == key and isinstance(value, str):
            return value[:64]
    return None


def _one(messages: Iterator[bytes], method: str) -> bytes:
    for message in messages:
        return message
    raise RefusedError(f"{method}: empty request", "invalid")


ADMIT_LEASE_S = 10.0
"""How long a turn granted by ``Admit`` waits for the upload that uses it before it goes to the next client."""


class _Uploads:
    """At most ``limit`` uploads read at once, at most ``per_client`` of one client id; the others wait, first come first served.

    A turn is taken either by the upload itself or, before a gRPC upload
    opens, by an ``Admit`` call: the turn is then reserved for ``lease_s``
    under a slot name the upload presents in its metadata. An upload on the
    data plane sends nothing until the server's go, which comes when its
    handler has a turn; a gRPC upload opened without a turn waits with its
    first bytes held in the server's HTTP/2 receive window.
    """

    def __init__(self, limit: int, per_client: int = 1, lease_s: float = ADMIT_LEASE_S) -> None:
        self.limit = limit
        self.per_client = per_client
        self.lease_s = lease_s
        self._cond = threading.Condition()
        self._reading: dict[object, int] = {}  # turns taken per peer key: uploads being read and reserved slots
        self._queue: list[tuple[object, object, float]] = []  # (ticket, key, the key's limit)
        self._slots: dict[str, tuple[str, float]] = {}  # reserved slot -> (key, when the reservation lapses)

    def _taken(self, key: object, by: int) -> None:
        left = self._reading.get(key, 0) + by
        if left > 0:
            self._reading[key] = left
        else:
            self._reading.pop(key, None)

    def _lapse(self) -> None:
        """Give back the turns of slots whose upload did not come within the lease."""
        now = time.monotonic()
        for slot, (key, until) in list(self._slots.items()):
            if until <= now:
                del self._slots[slot]
                self._taken(key, -1)
                warn.warning(key, "%s was granted a turn to upload and did not use it within %g s", key, self.lease_s)

    def _may_go(self, ticket: object) -> bool:
        """Whether ``ticket`` is the first waiting upload that may be read now."""
        self._lapse()
        if sum(self._reading.values()) >= self.limit:
            return False
        for t, key, cap in self._queue:
            if self._reading.get(key, 0) < cap:
                return t is ticket
        return False

    def enter(self, key: str, caller: Caller, slot: str | None = None) -> None:
        """Wait for a turn until the call is cancelled or cut (its deadline); raises ``RefusedError`` then.

        ``slot``: a turn this key reserved with :meth:`reserve`; the upload
        takes it without waiting (a lapsed or unknown slot: it waits).
        A client id (per-client tokens) has at most ``per_client`` uploads
        read at once, so that one token holder's stalled streams cannot take
        the turns of the others; a host (shared token) is bounded by the
        total only, since its clients are indistinguishable.
        """
        with self._cond:
            if slot is not None and self._slots.get(slot, ("", 0.0))[0] == key:
                del self._slots[slot]  # the reserved turn, already counted, is this upload's
                return
        ticket = object()
        cap = self.per_client if caller.client is not None else math.inf
        with self._cond:
            self._queue.append((ticket, key, cap))
            try:
                while not self._may_go(ticket):
                    if caller.cancelled.is_set() or time.monotonic() >= caller.deadline:
                        raise RefusedError(f"waited for a turn to upload (at most {self.limit} at once) until the call ended", "exhausted")
                    self._cond.wait(0.25)
            finally:
                self._queue = [q for q in self._queue if q[0] is not ticket]
                self._cond.notify_all()
            self._taken(key, 1)

    def reserve(self, key: str, caller: Caller) -> str:
        """Wait for a turn as :meth:`enter` does and reserve it for ``lease_s``; returns the slot's name."""
        self.enter(key, caller)
        slot = secrets.token_urlsafe(18)
        with self._cond:
            self._slots[slot] = (key, time.monotonic() + self.lease_s)
        return slot

    def leave(self, key: str) -> None:
        with self._cond:
            self._taken(key, -1)
            self._cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(turns taken: uploads being read and reserved slots, uploads waiting)."""
        with self._cond:
            return sum(self._reading.values()), len(self._queue)


MAX_UPLOADS = 4
"""Default of ``federation.max_uploads`` (fewer when the federation has fewer clients)."""
RECEIVE_WINDOW_KB: int | None = None
"""Default HTTP/2 receive window of each upload (``federation.receive_window_kb``): gRPC's adaptive one."""
MMAP_THRESHOLD = 2 << 20
"""Allocations of this many bytes or more get their own memory mapping in a tuned server process."""
MALLOC_ARENAS = 2
"""The most glibc allocation arenas a tuned server process uses, however many handler threads it runs."""


def tune_server_memory() -> bool:
    """Have this process return large freed buffers to the OS at once (glibc only).

    A server receives many clients' updates at once on many handler threads,
    pieces of updates and sums allocated and freed on every thread. glibc
    keeps such freed memory in its per-thread arenas (its mmap threshold
    rises after the first large free), so the server's resident memory grew
    with clients x block even though what it holds at any moment is
    O(block). Fixing the threshold at :data:`MMAP_THRESHOLD` (above the
    1 MiB messages, below the pieces) serves those buffers from their own
    mappings, unmapped when freed; and at most :data:`MALLOC_ARENAS` arenas
    serve the smaller ones, so that the messages one handler thread freed
    are reused by the next instead of kept in an arena per thread (32
    clients and a 16 MB block over the data plane: the round's peak fell
    from 5.8 to 4.4 blocks, loopback speed unchanged). Measured with ``benchmarks/memory.py``'s
    server part on a 2-core machine: 8 clients pushing a 64 MB block at
    once, the round's peak fell from about 15 blocks to about 3; 32 clients
    and a 16 MB block, from about 80 to about 12 (what remains there is
    each stream's HTTP/2 flow-control window, independent of the block
    size). Loopback transfers of large blocks lose about a tenth of their
    speed to the extra page faults.

    Call it in a process that serves a federation, not in one that trains
    (a training loop's large tensors would fault their pages on every step).
    Returns whether the setting was applied.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold, m_arena_max = -3, -8  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_arena_max, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


class FederationServer:
    """A gRPC server around a federation service.

    Args:
        service: the protocol handlers and their aggregator.
        listen: ``HOST:PORT`` to bind; port 0 picks a free one.
        tls: certificate and key to serve TLS; ``None``: plaintext.
        max_workers: the most calls served at once (``federation.max_calls``;
            one handler thread each, every waiting pull holds one); the rest
            are refused at once with ``RESOURCE_EXHAUSTED``. ``None``:
            ``6 x clients + 16``.
        max_calls_per_peer: the most calls of one peer at once
            (``federation.max_calls_per_peer``): a client id when every
            client has its own token, else a host. ``None``: 8 per client
            id, ``4 x clients + 4`` per host (a local run's clients share one).
        idle_timeout_s: cut a call whose peer sent nothing for this long
            while the server waits for its next message.
        call_timeout_s: cut any call still running this long after it began.
        max_message_bytes: the largest message the server receives.
        receive_window_kb: fixed HTTP/2 receive window of each upload, KiB:
            the server buffers about two windows per upload in flight, and
            an upload moves at most one window per round trip (1024 KiB at
            100 ms: 84 Mbit/s). ``None`` (the default): gRPC's adaptive
            window (BDP probing), at least 4 MiB and growing to twice the
            bandwidth-delay product, so that one upload keeps up with its
            link (``benchmarks/links.py``); measured on loopback about 8 MB
            per upload in flight, against about 2 MB with 1024 KiB.
        data_port: port of the data plane (``federation.data_port``,
            :mod:`pl_parablock.wire.dataplane`): block transfers over
            plain TCP (TLS with ``tls``) beside gRPC, announced to clients
            when they join; 0 picks a free port, ``None`` serves none.
        max_uploads: uploads read at once (``federation.max_uploads``); the
            others wait their turn unread. ``None``: :data:`MAX_UPLOADS`,
            or one per client when there are fewer. Every upload read holds
            what it has in flight (a message and its socket's buffers on the
            data plane, its receive window over gRPC), so memory grows with
            this number (``benchmarks/memory.py``); uploads from clients whose
            links are slower than the server's add up their rates only when
            admitted together, so raise it for many clients on slow links.
    """

    def __init__(
        self,
        service: FederationService,
        *,
        listen: str = "127.0.0.1:0",
        tls: TLS | None = None,
        max_workers: int | None = None,
        max_calls_per_peer: int | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        call_timeout_s: float | None = None,
        max_message_bytes: int | None = None,
        receive_window_kb: int | None = RECEIVE_WINDOW_KB,
        max_uploads: int | None = None,
        data_port: int | None = 0,
    ) -> None:
        self.service = service
        self.listen = listen
        self.tls = tls
        clients = service.aggregator.clients
        self.max_calls = max_workers or 6 * clients + 16
        if max_calls_per_peer is None:
            max_calls_per_peer = 8 if service.per_client_tokens else 4 * clients + 4
        self.call_timeout_s = call_timeout_s if call_timeout_s is not None else service.max_wait_s + 60.0
        self._guard = _Guard(
            per_peer=max_calls_per_peer,
            idle_timeout_s=idle_timeout_s,
            call_timeout_s=self.call_timeout_s,
            on_cut=service.aggregator.wake,
        )
        self.max_uploads = max_uploads or max(min(clients, MAX_UPLOADS), 1)
        self._uploads = _Uploads(self.max_uploads)
        self._executor = futures.ThreadPoolExecutor(max_workers=self.max_calls, thread_name_prefix="pl_parablock-server")
        options = list(SERVER_OPTIONS)
        if max_message_bytes is not None:
            options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
            options.append(("grpc.max_receive_message_length", max_message_bytes))
        if receive_window_kb is not None:
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", receive_window_kb * 1024)]
        self.options = options
        self._server = grpc.server(self._executor, options=options, maximum_concurrent_rpcs=self.max_calls)
        handlers = {m: self._handler(m, kind, getattr(service, m, None)) for m, kind in METHODS.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.address: str | None = None
        self.data_port = data_port
        self.data_plane: DataPlaneServer | None = None  # block transfers beside gRPC
        if data_port is not None:
            self.data_plane = DataPlaneServer(
                {m: handlers[m].stream_stream or handlers[m].stream_unary for m in DATA_METHODS},
                {m for m in DATA_METHODS if METHODS[m] == "unary_stream"},
                host=listen.rpartition(":")[0] or "127.0.0.1",
                port=data_port,
                tls=tls,
                max_connections=self.max_calls,
                max_per_host=4 * clients + 4,
                idle_timeout_s=idle_timeout_s,
                max_message_bytes=max_message_bytes or dict(MESSAGE_OPTIONS)["grpc.max_receive_message_length"],
            )

    # ------------------------------------------------------------ calls

    def _enter(self, method: str, context: grpc.ServicerContext) -> _Call:
        """Identify the caller from the metadata and admit the call; nothing of the request is read yet."""
        host = peer_host(context.peer())
        caller = self.service.identify(token_of(context), host)
        call = self._guard.admit(method, f"client {caller.client}" if caller.client is not None else host, caller, context)

        def ended() -> None:
            caller.cancelled.set()
            self.service.aggregator.wake()

        if not context.add_callback(ended):  # the call is already over
            caller.cancelled.set()
        return call

    def _abort(self, context: grpc.ServicerContext, exc: Exception, method: str, call: _Call | None) -> None:
        if isinstance(exc, RefusedError):
            context.abort(_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
        if isinstance(exc, ParaBlockError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if call is not None and call.caller.cancelled.is_set():
            context.abort(grpc.StatusCode.CANCELLED, f"{method}: the call was cut or cancelled")
        key = call.key if call is not None else peer_host(context.peer())
        if warn.log(logging.ERROR, key, "internal error in %s (a call from %s)", method, key):
            log.error("internal error in %s", method, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal server error in {method} (see the server log)")

    def _handler(self, method: str, kind: str, fn: Callable[..., Any] | None) -> grpc.RpcMethodHandler:
        """A request-streaming handler, whatever the method's kind: it runs before any message is read."""
        if kind == "unary_stream":

            def stream_handler(messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
                call = None
                try:
                    call = self._enter(method, context)
                    request = _one(_reading(messages, call), method)
                    views = getattr(context, "sends_views", False)  # the data plane sends from memory; gRPC sends bytes objects
                    for reply in fn(request, caller=call.caller):  # type: ignore[misc]
                        yield reply if views or isinstance(reply, bytes) else bytes(reply)
                except grpc.RpcError:
                    raise  # the peer went away (or was cut): gRPC ends the call quietly
                except Exception as exc:
                    self._abort(context, exc, method, call)
                finally:
                    if call is not None:
                        self._guard.release(call)

            return grpc.stream_stream_rpc_method_handler(stream_handler)

        upload = method in UPLOADS

        def handler(messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            call = None
            admitted = False
            try:
                call = self._enter(method, context)
                if upload:  # before any of its bytes is read
                    self._uploads.enter(call.key, call.caller, _metadata(context, UPLOAD_SLOT))
                    admitted = True
                reading = _reading(messages, call)
                request: Any = _one(reading, method) if kind == "unary" else reading
                if method == "Admit":
                    return self._admit(call)
                return fn(request, caller=call.caller)  # type: ignore[no-any-return,misc]
            except grpc.RpcError:
                raise
            except Exception as exc:
                self._abort(context, exc, method, call)
                raise  # unreachable: abort raises
            finally:
                if admitted and call is not None:
                    self._uploads.leave(call.key)
                if call is not None:
                    self._guard.release(call)

        return grpc.stream_unary_rpc_method_handler(handler)

    def _admit(self, call: _Call) -> bytes:
        """``Admit``: wait for a turn to upload and reserve it; the reply names the slot the upload presents."""
        slot = self._uploads.reserve(call.key, call.caller)
        return header_bytes({"slot": slot, "lease_s": self._uploads.lease_s})

    def active_calls(self) -> int:
        """Calls the server is serving now."""
        return self._guard.active()

    def active_methods(self) -> dict[str, int]:
        """Calls the server is serving now, per method."""
        return self._guard.methods()

    def uploads(self) -> tuple[int, int]:
        """Uploads the server reads now, and uploads waiting for their turn."""
        return self._uploads.counts()

    # ------------------------------------------------------------ life

    def start(self) -> str:
        """Bind and start serving; returns the ``HOST:PORT`` clients should use."""
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise FederationError(f"listen address {self.listen!r} is not HOST:PORT (e.g. 127.0.0.1:50051 or 0.0.0.0:50051)")
        try:
            if self.tls is not None:
                bound = self._server.add_secure_port(self.listen, self.tls.server_credentials())
            else:
                bound = self._server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise FederationError(f"cannot listen on {self.listen}: {exc}") from None
        if bound == 0:
            raise FederationError(f"cannot listen on {self.listen}: the port is taken or the host is not this machine's")
        if self.data_plane is not None:
            try:
                self.data_port = self.data_plane.start()
            except OSError as exc:
                self._server.stop(None)
                raise FederationError(
                    f"cannot listen on {host}:{self.data_plane.port} for the data plane (federation.data_port): {exc.strerror}"
                ) from None
            self.service.announce["data_port"] = self.data_port
        self._server.start()
        self._guard.start()
        self.address = f"{host}:{bound}"
        data = f", data plane on port {self.data_port}" if self.data_plane is not None else ""
        log.info("federation server listening on %s%s%s", self.address, " (TLS)" if self.tls else "", data)
        return self.address

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving, wake waiting handlers and join every server thread."""
        self.service.aggregator.shutdown()
        if self.data_plane is not None:
            self.data_plane.stop()
        self._server.stop(grace).wait(grace + 5.0)
        self._guard.stop()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> FederationServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
