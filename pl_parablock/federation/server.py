"""gRPC server of a federation.

Serves a :class:`~pl_parablock.federation.service.FederationService` with
generic handlers whose messages are raw bytes (the project's own framing, see
:mod:`pl_parablock.federation.wire`), so no generated protobuf code is
needed. Binds to 127.0.0.1 unless told otherwise.

Example::

    >>> from pl_parablock.federation import Aggregator, FederationServer, FederationService
    >>> server = FederationServer(FederationService(Aggregator(clients=1, rounds=1)))
    >>> address = server.start()          # '127.0.0.1:PORT'
    >>> server.stop()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from pl_parablock.errors import FederationError, ParaBlockError
from pl_parablock.federation.aggregator import RefusedError
from pl_parablock.federation.service import METHODS, SERVICE_NAME, FederationService
from pl_parablock.federation.transport import SERVER_OPTIONS

__all__ = ["FederationServer"]

log = logging.getLogger(__name__)

_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "refused": grpc.StatusCode.FAILED_PRECONDITION,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
}


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
                yield from fn(request)
            except Exception as exc:
                _abort(context, exc, method)

        return grpc.unary_stream_rpc_method_handler(stream_handler)

    def handler(request: Any, context: grpc.ServicerContext) -> bytes:
        try:
            return fn(request)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:  # the client went away mid-stream
            raise FederationError(f"{method}: client stream broke off") from exc
        except Exception as exc:
            _abort(context, exc, method)
            raise  # unreachable: abort raises

    if kind == "unary":
        return grpc.unary_unary_rpc_method_handler(handler)
    return grpc.stream_unary_rpc_method_handler(handler)


class FederationServer:
    """A gRPC server around a federation service.

    Args:
        service: the protocol handlers and their aggregator.
        listen: ``HOST:PORT`` to bind; port 0 picks a free one.
        max_workers: handler threads; each waiting pull holds one.
    """

    def __init__(self, service: FederationService, *, listen: str = "127.0.0.1:0", max_workers: int | None = None) -> None:
        self.service = service
        self.listen = listen
        workers = max_workers or max(8, 4 * service.aggregator.clients + 4)
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pl_parablock-server")
        self._server = grpc.server(self._executor, options=SERVER_OPTIONS)
        handlers = {m: _wrap(m, kind, getattr(service, m)) for m, kind in METHODS.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.address: str | None = None

    def start(self) -> str:
        """Bind and start serving; returns the ``HOST:PORT`` clients should use."""
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise FederationError(f"listen address {self.listen!r} is not HOST:PORT (e.g. 127.0.0.1:50051 or 0.0.0.0:50051)")
        try:
            bound = self._server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise FederationError(f"cannot listen on {self.listen}: {exc}") from None
        if bound == 0:
            raise FederationError(f"cannot listen on {self.listen}: the port is taken or the host is not this machine's")
        self._server.start()
        self.address = f"{host}:{bound}"
        log.info("federation server listening on %s", self.address)
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
