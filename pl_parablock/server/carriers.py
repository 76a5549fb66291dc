"""Carriers: the transports a federation server's calls arrive on, each serving the same handlers.

A :class:`~pl_parablock.server.grpc_server.FederationServer` builds one
handler per method of :data:`~pl_parablock.wire.channel.METHODS` (the
guards, then the service's protocol handler: :class:`Handlers`) and hands
them to every carrier it runs; a carrier only moves a call's messages and
knows nothing of tokens, limits, turns or the federation's state. Two
carriers:

* :class:`GrpcCarrier`: gRPC (every method), on the federation's address.
* :class:`~pl_parablock.server.dataplane.DataPlaneServer`: the data plane
  (the block transfers, :data:`~pl_parablock.wire.dataplane.DATA_METHODS`)
  on ``federation.data_port``, announced to clients when they join.

Every carrier has the same life (:class:`Carrier`): :meth:`~Carrier.open`
takes its port (a :class:`~pl_parablock.errors.FederationError` names the
setting when it cannot), :meth:`~Carrier.serve` begins serving once every
carrier is open, :meth:`~Carrier.announce` says what clients learn of it at
join, and :meth:`~Carrier.close` ends it. A new carrier is one more class
here; the server starts it like the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from pl_parablock.errors import FederationError
from pl_parablock.wire.channel import SERVICE_NAME, TLS

__all__ = ["Carrier", "GrpcCarrier", "Handler", "Handlers"]

Handler = Callable[[Iterator[bytes], Any], Any]
"""``handler(messages, context)``: a call's request messages and its context (a ``grpc.ServicerContext`` or the
same methods); returns the reply, or yields the replies of a streaming method."""


@dataclass(frozen=True)
class Handlers:
    """The server's handler of every method, as each carrier serves them.

    Attributes:
        calls: method -> its handler (runs as soon as a call arrives, before
            any message is read).
        streaming: the methods whose handler yields replies.
    """

    calls: Mapping[str, Handler]
    streaming: frozenset[str]

    def only(self, methods: Iterable[str]) -> Handlers:
        """These handlers for ``methods`` only (a carrier that carries some methods)."""
        keep = set(methods)
        return Handlers({m: fn for m, fn in self.calls.items() if m in keep}, frozenset(self.streaming & keep))


class Carrier(ABC):
    """One transport of the server's calls (see the module)."""

    name: str
    """What the server's log calls it."""
    port: int | None
    """Its port: the one asked for until :meth:`open`, then the one it listens on."""

    @abstractmethod
    def open(self) -> int:
        """Take the port (listening, or accepting already); returns it.

        Raises:
            FederationError: the port cannot be taken (naming the setting).
        """

    def serve(self) -> None:  # noqa: B027 - a carrier that serves once open has nothing to do
        """Begin serving, once every carrier of the server is open."""

    @abstractmethod
    def close(self, grace: float | None) -> None:
        """Stop serving and join its threads; ``grace``: seconds calls may take to end (``None``: none, at once)."""

    def announce(self) -> dict[str, Any]:
        """What a joining client learns of this carrier (merged into the ``Join`` reply)."""
        return {}


class GrpcCarrier(Carrier):
    """gRPC: every method as a request-streaming generic handler of raw bytes (no generated code).

    Args:
        handlers: the server's handlers.
        listen: ``HOST:PORT`` to bind; port 0 picks a free one.
        tls: certificate and key to serve TLS only; ``None``: plaintext.
        executor: the threads that run the handlers.
        options: the gRPC server's channel options.
        max_calls: the most calls at once; the rest are refused with
            ``RESOURCE_EXHAUSTED`` (never queued).
    """

    name = "gRPC"

    def __init__(
        self,
        handlers: Handlers,
        *,
        listen: str,
        tls: TLS | None,
        executor: futures.ThreadPoolExecutor,
        options: list[tuple[str, Any]],
        max_calls: int,
    ) -> None:
        self.listen = listen
        self.tls = tls
        self.port = None
        self.server = grpc.server(executor, options=options, maximum_concurrent_rpcs=max_calls)
        methods = {
            m: grpc.stream_stream_rpc_method_handler(fn) if m in handlers.streaming else grpc.stream_unary_rpc_method_handler(fn)
            for m, fn in handlers.calls.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))

    def open(self) -> int:
        try:
            if self.tls is not None:
                bound = self.server.add_secure_port(self.listen, self.tls.server_credentials())
            else:
                bound = self.server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise FederationError(f"cannot listen on {self.listen}: {exc}") from None
        if bound == 0:
            raise FederationError(f"cannot listen on {self.listen}: the port is taken or the host is not this machine's")
        self.port = bound
        return bound

    def serve(self) -> None:
        self.server.start()

    def close(self, grace: float | None) -> None:
        stopped = self.server.stop(grace)
        if grace is not None:
            stopped.wait(grace + 5.0)
