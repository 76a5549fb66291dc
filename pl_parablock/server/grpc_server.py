"""The federation server: the service behind its guards, on every carrier.

:class:`FederationServer` wraps each method of a
:class:`~pl_parablock.server.service.FederationService` in the guards of
:mod:`~pl_parablock.server.guards` (token before work, limits per peer,
turns to upload, the watchdog) and serves the same handlers on every carrier
of :mod:`~pl_parablock.server.carriers`: gRPC, with generic handlers whose
messages are raw bytes (the project's own framing, see
:mod:`pl_parablock.wire.framing`, so no generated protobuf code is needed),
and the data plane (:class:`~pl_parablock.server.dataplane.DataPlaneServer`)
unless ``data_port`` is ``None``. Binds to 127.0.0.1 unless told otherwise;
with a :class:`~pl_parablock.wire.channel.TLS` certificate and key it serves
TLS only. Clients authenticate with a bearer token in the ``authorization``
metadata. The service name, the methods, the channel options and the token
metadata are those of :mod:`pl_parablock.wire.channel`, which the
clients' transports share; this module imports nothing of the client side.

Against an untrusted network peer (docs/guides/security.md, "What it defends against"):

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
  has its own token, at most ``max_uploads - 1`` per host under a shared
  token (or none) once more than one host uploads, the next free turn going
  to the waiting peer that holds fewest
  (:class:`~pl_parablock.server.guards.UploadTurns`); the others wait their
  turn, at most ``turn_wait_s`` (less than the clients' own deadline), and
  are then refused with the reason. The project's clients send nothing
  while they wait: on the data plane (:mod:`pl_parablock.wire.dataplane`)
  until the server's go, over gRPC in a small ``Admit`` call before they
  open the upload (the turn is then reserved for the upload for
  :data:`ADMIT_LEASE_S`, or ``body_timeout_s`` when shorter). A gRPC
  upload opened without a turn waits with its stream open, the server
  reading none of its bytes: it is held back by HTTP/2 flow control, one
  receive window per connection at most.
* **Turns that cannot be hoarded.** An upload holding a turn is cut, and
  its turn freed, when it sends no body bytes for ``body_timeout_s``, or
  its body arrives slower than ``min_upload_bps`` (counting only the time
  the server waits for it, after a short grace, one chunk in flight
  allowed: :class:`~pl_parablock.server.guards.CallGuard`); an empty
  message, or a message under ``min_message_bytes`` anywhere but at the
  body's end, is refused at once (``INVALID_ARGUMENT``), and no such
  message counts as progress.
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
import platform
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from pl_parablock.errors import FederationError, ParaBlockError
from pl_parablock.server._ratelimit import RateLimitedLog
from pl_parablock.server.carriers import Carrier, GrpcCarrier, Handler, Handlers
from pl_parablock.server.dataplane import DataPlaneServer
from pl_parablock.server.guards import ADMIT_LEASE_S as ADMIT_LEASE_S  # still importable from here
from pl_parablock.server.guards import (
    BODY_TIMEOUT_S,
    MIN_MESSAGE_BYTES,
    MIN_UPLOAD_BPS,
    UPLOAD_GRACE_S,
    Call,
    CallGuard,
    UploadTurns,
    metadata_of,
    one_message,
    peer_host,
    reading,
    token_of,
)
from pl_parablock.server.guards import turn_wait_s as default_turn_wait_s
from pl_parablock.server.service import FederationService
from pl_parablock.server.validation import RefusedError
from pl_parablock.wire.channel import MESSAGE_OPTIONS, METHODS, SERVER_OPTIONS, TLS, UPLOAD_SLOT, UPLOADS
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
        body_timeout_s: cut an upload holding a turn that sent no body
            bytes for this long (``federation.body_timeout_s``), counting
            only the time the server waits for its messages.
        min_upload_bps: cut an upload holding a turn whose body arrives
            slower than this, bytes per second (``federation.min_upload_mbps``;
            0: no floor): measured over the time the server waits for it, once
            that passes ``upload_grace_s``, allowing one chunk of the
            service's ``chunk_bytes`` in flight.
        upload_grace_s: see ``min_upload_bps``.
        min_message_bytes: smallest message of an upload's body but its
            last (:data:`~pl_parablock.server.guards.MIN_MESSAGE_BYTES`,
            the smallest chunk a client sends).
        turn_wait_s: the longest a call waits for a turn to upload; ``None``:
            :func:`~pl_parablock.server.guards.turn_wait_s` of the service's
            ``max_wait_s`` (``federation.timeout_s``), less than a client's own deadline.
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
        body_timeout_s: float = BODY_TIMEOUT_S,
        min_upload_bps: float = MIN_UPLOAD_BPS,
        upload_grace_s: float = UPLOAD_GRACE_S,
        min_message_bytes: int = MIN_MESSAGE_BYTES,
        turn_wait_s: float | None = None,
    ) -> None:
        self.service = service
        self.listen = listen
        self.tls = tls
        clients = service.aggregator.clients
        self.max_calls = max_workers or 6 * clients + 16
        if max_calls_per_peer is None:
            max_calls_per_peer = 8 if service.per_client_tokens else 4 * clients + 4
        self.call_timeout_s = call_timeout_s if call_timeout_s is not None else service.max_wait_s + 60.0
        self._guard = CallGuard(
            per_peer=max_calls_per_peer,
            idle_timeout_s=idle_timeout_s,
            call_timeout_s=self.call_timeout_s,
            on_cut=service.aggregator.wake,
            body_timeout_s=body_timeout_s,
            min_upload_bps=min_upload_bps,
            chunk_bytes=service.chunk_bytes,
            min_message_bytes=min_message_bytes,
            grace_s=upload_grace_s,
        )
        self.max_uploads = max_uploads or max(min(clients, MAX_UPLOADS), 1)
        self.turn_wait_s = turn_wait_s if turn_wait_s is not None else default_turn_wait_s(service.max_wait_s)
        self._uploads = UploadTurns(self.max_uploads, lease_s=min(ADMIT_LEASE_S, body_timeout_s), wait_s=self.turn_wait_s)
        self._executor = futures.ThreadPoolExecutor(max_workers=self.max_calls, thread_name_prefix="pl_parablock-server")
        options = list(SERVER_OPTIONS)
        if max_message_bytes is not None:
            options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
            options.append(("grpc.max_receive_message_length", max_message_bytes))
        if receive_window_kb is not None:
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", receive_window_kb * 1024)]
        self.options = options
        self.handlers = Handlers(
            {m: self._handler(m, kind, getattr(service, m, None)) for m, kind in METHODS.items()},
            frozenset(m for m, kind in METHODS.items() if kind == "unary_stream"),
        )
        self.address: str | None = None
        # the carriers, every one serving the same handlers: gRPC, and the data plane for block transfers beside it
        self._grpc = GrpcCarrier(self.handlers, listen=listen, tls=tls, executor=self._executor, options=options, max_calls=self.max_calls)
        self.carriers: list[Carrier] = [self._grpc]
        self.data_plane: DataPlaneServer | None = None
        if data_port is not None:
            self.data_plane = DataPlaneServer(
                self.handlers.only(DATA_METHODS),
                host=listen.rpartition(":")[0] or "127.0.0.1",
                port=data_port,
                tls=tls,
                max_connections=self.max_calls,
                max_per_host=4 * clients + 4,
                idle_timeout_s=idle_timeout_s,
                max_message_bytes=max_message_bytes or dict(MESSAGE_OPTIONS)["grpc.max_receive_message_length"],
            )
            self.carriers.append(self.data_plane)

    @property
    def data_port(self) -> int | None:
        """The data plane's port: the one asked for (0: any) until :meth:`start`, then the one it listens on; ``None``: no data plane."""
        return self.data_plane.port if self.data_plane is not None else None

    # ------------------------------------------------------------ calls

    def _enter(self, method: str, context: grpc.ServicerContext) -> Call:
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

    def _abort(self, context: grpc.ServicerContext, exc: Exception, method: str, call: Call | None) -> None:
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

    def _handler(self, method: str, kind: str, fn: Callable[..., Any] | None) -> Handler:
        """A request-streaming handler, whatever the method's kind: it runs before any message is read (on every carrier)."""
        if kind == "unary_stream":

            def stream_handler(messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
                call = None
                try:
                    call = self._enter(method, context)
                    request = one_message(reading(messages, call), method)
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

            return stream_handler

        upload = method in UPLOADS

        def handler(messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            call = None
            admitted = False
            try:
                call = self._enter(method, context)
                if upload:  # before any of its bytes is read
                    self._uploads.enter(call.key, call.caller, metadata_of(context, UPLOAD_SLOT))
                    admitted = True
                    self._guard.uploading(call)  # from now on its messages are checked and its progress watched
                incoming = reading(messages, call)
                request: Any = one_message(incoming, method) if kind == "unary" else incoming
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

        return handler

    def _admit(self, call: Call) -> bytes:
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
        """Open every carrier, announce them and start serving; returns the ``HOST:PORT`` clients should use."""
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise FederationError(f"listen address {self.listen!r} is not HOST:PORT (e.g. 127.0.0.1:50051 or 0.0.0.0:50051)")
        opened: list[Carrier] = []
        try:
            for carrier in self.carriers:
                carrier.open()
                opened.append(carrier)
        except FederationError:
            for carrier in opened:
                carrier.close(None)
            raise
        for carrier in self.carriers:
            self.service.announce.update(carrier.announce())
        for carrier in self.carriers:
            carrier.serve()
        self._guard.start()
        self.address = f"{host}:{self._grpc.port}"
        others = "".join(f", {c.name} on port {c.port}" for c in self.carriers if c is not self._grpc)
        log.info("federation server listening on %s%s%s", self.address, " (TLS)" if self.tls else "", others)
        return self.address

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving, wake waiting handlers and join every server thread."""
        self.service.aggregator.shutdown()
        for carrier in reversed(self.carriers):  # the data plane first, as ever
            carrier.close(grace)
        self._guard.stop()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> FederationServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
