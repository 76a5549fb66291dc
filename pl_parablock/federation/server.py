"""gRPC server of a federation.

Serves a :class:`~pl_parablock.federation.service.FederationService` with
generic handlers whose messages are raw bytes (the project's own framing, see
:mod:`pl_parablock.federation.wire`), so no generated protobuf code is
needed. Binds to 127.0.0.1 unless told otherwise; with a
:class:`~pl_parablock.federation.channel.TLS` certificate and key it serves
TLS only. Clients authenticate with a bearer token in the ``authorization``
metadata. The service name, the methods, the channel options and the token
metadata are those of :mod:`pl_parablock.federation.channel`, which the
clients' transports share; this module imports nothing of the client side.

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
from pl_parablock.federation.aggregator import RefusedError
from pl_parablock.federation.channel import METHODS, SERVER_OPTIONS, SERVICE_NAME, TLS, bearer_token
from pl_parablock.federation.service import FederationService

__all__ = ["FederationServer", "token_of", "tune_server_memory"]

log = logging.getLogger(__name__)

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "refused": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
}


def token_of(context: grpc.ServicerContext) -> str | None:
    """The bearer token of a call's metadata, if any."""
    return bearer_token(context.invocation_metadata())


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, RefusedError):
        context.abort(_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
    if isinstance(exc, ParaBlockError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal server error in {method}: {exc!r} (see the server log)")


def _wrap(method: str, kind: str, fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
    if kind == "unary_stream":

        def stream_handler(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            try:
                yield from fn(request, token_of(context))
            except Exception as exc:
                _abort(context, exc, method)

        return grpc.unary_stream_rpc_method_handler(stream_handler)

    def handler(request: Any, context: grpc.ServicerContext) -> bytes:
        try:
            return fn(request, token_of(context))  # type: ignore[no-any-return]
        except grpc.RpcError as exc:  # the client went away mid-stream
            raise FederationError(f"{method}: client stream broke off") from exc
        except Exception as exc:
            _abort(context, exc, method)
            raise  # unreachable: abort raises

    if kind == "unary":
        return grpc.unary_unary_rpc_method_handler(handler)
    return grpc.stream_unary_rpc_method_handler(handler)


RECEIVE_WINDOW_KB = 1024
"""Default HTTP/2 receive window of each upload (``federation.receive_window_kb``)."""
MMAP_THRESHOLD = 2 << 20
"""Allocations of this many bytes or more get their own memory mapping in a tuned server process."""


def tune_server_memory() -> bool:
    """Have this process return large freed buffers to the OS at once (glibc only).

    A server receives many clients' updates at once on many handler threads,
    pieces of updates and sums allocated and freed on every thread. glibc
    keeps such freed memory in its per-thread arenas (its mmap threshold
    rises after the first large free), so the server's resident memory grew
    with clients x block even though what it holds at any moment is
    O(block). Fixing the threshold at :data:`MMAP_THRESHOLD` (above the
    1 MiB messages, below the pieces) serves those buffers from their own
    mappings, unmapped when freed. Measured with ``benchmarks/memory.py``'s
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
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class FederationServer:
    """A gRPC server around a federation service.

    Args:
        service: the protocol handlers and their aggregator.
        listen: ``HOST:PORT`` to bind; port 0 picks a free one.
        tls: certificate and key to serve TLS; ``None``: plaintext.
        max_workers: handler threads; each waiting pull holds one.
        receive_window_kb: fixed HTTP/2 receive window of each upload, KiB:
            the server buffers about two windows per upload in flight, and
            an upload moves at most one window per round trip. ``None``:
            gRPC's adaptive window, which on a fast link grows to the
            bandwidth-delay product (measured on loopback: about 8 MB per
            upload in flight, against about 2 MB with 1024 KiB).
    """

    def __init__(
        self,
        service: FederationService,
        *,
        listen: str = "127.0.0.1:0",
        tls: TLS | None = None,
        max_workers: int | None = None,
        receive_window_kb: int | None = RECEIVE_WINDOW_KB,
    ) -> None:
        self.service = service
        self.listen = listen
        self.tls = tls
        workers = max_workers or max(8, 4 * service.aggregator.clients + 4)
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pl_parablock-server")
        options = list(SERVER_OPTIONS)
        if receive_window_kb is not None:
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", receive_window_kb * 1024)]
        self._server = grpc.server(self._executor, options=options)
        handlers = {m: _wrap(m, kind, getattr(service, m)) for m, kind in METHODS.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.address: str | None = None

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
        self._server.start()
        self.address = f"{host}:{bound}"
        log.info("federation server listening on %s%s", self.address, " (TLS)" if self.tls else "")
        return self.address

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving, wake waiting handlers and join every server thread."""
        self.service.aggregator.shutdown()
        self._server.stop(grace).wait(grace + 5.0)
        self._executor.shutdown(wait=True)

    def __enter__(self) -> FederationServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
