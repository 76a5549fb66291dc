"""A federation inside one process: the client's transport calls the server's service directly.

:class:`InProcessTransport` is the in-process twin of
:class:`~pl_parablock.client.transport.GrpcTransport`: the same client
protocol (:class:`~pl_parablock.client.transport.Transport`), the same
messages and the same link pacing, handed to a
:class:`~pl_parablock.server.service.FederationService` in the same
process instead of a gRPC channel. It is the client half of the
in-process carrier; its server half is the service itself, which it calls
by the protocol's method names, so it imports nothing of the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pl_parablock.client.transport import Transport

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    """Calls a :class:`FederationService` in the same process.

    Example::

        >>> from pl_parablock import Aggregator, FederationService, InProcessTransport
        >>> service = FederationService(Aggregator(clients=1, rounds=2))
        >>> transport = InProcessTransport(service)
    """

    def __init__(self, service: Any, **kwargs: Any) -> None:
        """``service``: a :class:`~pl_parablock.server.service.FederationService` (anything with the protocol's handlers)."""
        super().__init__(**kwargs)
        self.service = service

    def _unary(self, method: str, request: bytes, timeout: float) -> bytes:
        return getattr(self.service, method)(request, self.token)  # type: ignore[no-any-return]

    def _stream_unary(self, method: str, messages: Iterator[bytes], timeout: float) -> bytes:
        return getattr(self.service, method)(messages, self.token)  # type: ignore[no-any-return]

    def _unary_stream(self, method: str, request: bytes, timeout: float) -> Iterator[bytes]:
        return getattr(self.service, method)(request, self.token)  # type: ignore[no-any-return]

    def describe(self) -> str:
        return "in-process"
