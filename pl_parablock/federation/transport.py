"""Client side of the federation protocol, over gRPC or inside one process.

:class:`Transport` implements the protocol (join, upload the initial state,
push an update, long-poll pull an aggregate, leave) once, on top of three raw
calls that its subclasses provide:

* :class:`GrpcTransport` talks to a :class:`~pl_parablock.federation.server.FederationServer`
  over gRPC (separate processes or machines);
* :class:`InProcessTransport` calls a :class:`~pl_parablock.federation.service.FederationService`
  in the same process (unit tests, one-process debugging).

Both encode and decode the same messages and pace them through the client's
emulated :class:`~pl_parablock.federation.link.Link`, so byte counts and
timings mean the same thing. Every call has a timeout.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch import Tensor

from pl_parablock.errors import FederationError
from pl_parablock.federation.link import Link
from pl_parablock.federation.service import METHODS, SERVICE_NAME, FederationService
from pl_parablock.federation.wire import decode, encode, header_bytes, parse_header

__all__ = ["GrpcTransport", "InProcessTransport", "Pulled", "Pushed", "Transport"]

POLL_S = 20.0
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
# Clients ping every 30 s so a dead peer is noticed during long polls; the
# server accepts pings that often (its default would answer "too many pings").
CLIENT_OPTIONS = [*MESSAGE_OPTIONS, ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000)]
SERVER_OPTIONS = [
    *MESSAGE_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class Pushed:
    """Outcome of an upload."""

    accepted: bool
    reason: str
    upload_s: float
    nbytes: int


@dataclass
class Pulled:
    """A global block value as downloaded."""

    block: int
    version: int
    tensors: dict[str, Tensor] = field(repr=False)
    server_wait_s: float
    download_s: float
    nbytes: int


class _Counter:
    """Counts bytes of a message stream and notes when its first message came."""

    def __init__(self, messages: Iterator[bytes]) -> None:
        self._messages = messages
        self.nbytes = 0
        self.first_at: float | None = None

    def __iter__(self) -> Iterator[bytes]:
        for m in self._messages:
            if self.first_at is None:
                self.first_at = time.perf_counter()
            self.nbytes += len(m)
            yield m


class Transport(ABC):
    """Client side of the protocol; subclasses provide the raw calls.

    Args:
        link: emulated link the bytes are paced through (``None``: none).
        chunk_bytes: size of the chunks blocks are cut into.
        wire_dtype: dtype floating tensors travel in (``None``: their own).
    """

    def __init__(self, *, link: Link | None = None, chunk_bytes: int = 1 << 20, wire_dtype: torch.dtype | None = None) -> None:
        self.link = link or Link()
        self.chunk_bytes = chunk_bytes
        self.wire_dtype = wire_dtype

    # raw calls -------------------------------------------------------------

    @abstractmethod
    def _unary(self, method: str, request: bytes, timeout: float) -> bytes: ...

    @abstractmethod
    def _stream_unary(self, method: str, messages: Iterator[bytes], timeout: float) -> bytes: ...

    @abstractmethod
    def _unary_stream(self, method: str, request: bytes, timeout: float) -> Iterator[bytes]: ...

    def close(self) -> None:  # noqa: B027 - a transport without connections has nothing to release
        """Release connections; the transport cannot be used afterwards."""

    def describe(self) -> str:
        return type(self).__name__

    # protocol --------------------------------------------------------------

    def join(self, client_id: int, fingerprint: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Join the federation; returns the schedule, rounds and versions."""
        req = header_bytes({"client_id": client_id, "fingerprint": dict(fingerprint), "timeout_s": timeout})
        return parse_header(self._unary("Join", req, timeout + 5.0), "join reply")

    def upload_state(self, client_id: int, tensors: Mapping[str, Tensor], timeout: float) -> int:
        """Send the initial global state (first client only); returns bytes sent."""
        counter = _Counter(self.link.pace_up(encode({"client_id": client_id}, tensors, chunk_bytes=self.chunk_bytes)))
        parse_header(self._stream_unary("UploadState", iter(counter), timeout), "upload reply")
        return counter.nbytes

    def push(self, header: Mapping[str, Any], tensors: Mapping[str, Tensor], timeout: float) -> Pushed:
        """Upload one round's update of a block."""
        dtype = self.wire_dtype if header.get("kind") == "delta" else None
        counter = _Counter(self.link.pace_up(encode(header, tensors, chunk_bytes=self.chunk_bytes, dtype=dtype)))
        t0 = time.perf_counter()
        reply = parse_header(self._stream_unary("Push", iter(counter), timeout), "push reply")
        return Pushed(bool(reply.get("accepted")), str(reply.get("reason", "")), time.perf_counter() - t0, counter.nbytes)

    def _download(self, request: dict[str, Any], timeout: float, what: str) -> Pulled:
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        nbytes = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FederationError(f"{what} did not arrive within {timeout:g} s (federation.timeout_s)")
            wire = {"wire_dtype": str(self.wire_dtype).removeprefix("torch.")} if self.wire_dtype else {}
            req = header_bytes({**request, **wire, "wait_s": min(left, POLL_S)})
            counter = _Counter(self._unary_stream("Pull", req, left + 5.0))
            header, tensors = decode(self.link.pace_down(iter(counter)), what=what)
            nbytes += counter.nbytes
            if header.get("ready"):
                end = time.perf_counter()
                first = counter.first_at or end
                return Pulled(int(header["block"]), int(header["version"]), tensors, first - t0, end - first, nbytes)

    def pull(self, client_id: int, round_index: int, timeout: float) -> Pulled:
        """Wait for the aggregate of a round and download the block's new global value."""
        return self._download({"client_id": client_id, "round": round_index}, timeout, f"the aggregate of round {round_index}")

    def fetch(self, client_id: int, block: int, timeout: float) -> Pulled:
        """Download a block's current global value without waiting."""
        return self._download({"client_id": client_id, "block": block}, timeout, f"block {block}")

    def versions(self, client_id: int, timeout: float) -> dict[str, Any]:
        return parse_header(self._unary("Versions", header_bytes({"client_id": client_id}), timeout), "versions reply")

    def leave(self, client_id: int, report: Mapping[str, Any] | None, timeout: float) -> None:
        req = header_bytes({"client_id": client_id, "report": dict(report) if report else None})
        parse_header(self._unary("Leave", req, timeout), "leave reply")


class InProcessTransport(Transport):
    """Calls a :class:`FederationService` in the same process.

    Example::

        >>> from pl_parablock.federation import Aggregator, FederationService, InProcessTransport
        >>> service = FederationService(Aggregator(clients=1, rounds=2))
        >>> transport = InProcessTransport(service)
    """

    def __init__(self, service: FederationService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service

    def _unary(self, method: str, request: bytes, timeout: float) -> bytes:
        return getattr(self.service, method)(request)  # type: ignore[no-any-return]

    def _stream_unary(self, method: str, messages: Iterator[bytes], timeout: float) -> bytes:
        return getattr(self.service, method)(messages)  # type: ignore[no-any-return]

    def _unary_stream(self, method: str, request: bytes, timeout: float) -> Iterator[bytes]:
        return getattr(self.service, method)(request)  # type: ignore[no-any-return]

    def describe(self) -> str:
        return "in-process"


class GrpcTransport(Transport):
    """gRPC client of a federation server.

    Args:
        address: ``HOST:PORT`` of the server.
        connect_timeout_s: how long to wait for the server to answer at first.
        **kwargs: see :class:`Transport`.

    Raises:
        FederationError: on the first call, when the server cannot be reached.
    """

    def __init__(self, address: str, *, connect_timeout_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self._channel = grpc.insecure_channel(address, options=CLIENT_OPTIONS)
        self._ready = False
        self._calls: dict[str, Any] = {}
        for method, kind in METHODS.items():
            path = f"/{SERVICE_NAME}/{method}"
            factory = getattr(self._channel, "unary_unary" if kind == "unary" else kind)
            self._calls[method] = factory(path)

    def describe(self) -> str:
        return f"gRPC to {self.address}"

    def _connect(self) -> None:
        if self._ready:
            return
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise FederationError(
                f"cannot reach the federation server at {self.address} within {self.connect_timeout_s:g} s: "
                "check that it runs (python -m pl_parablock.fit RECIPE --role server) and the --server address"
            ) from None
        self._ready = True

    def _error(self, exc: grpc.RpcError, method: str) -> FederationError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return FederationError(f"server at {self.address} did not answer {method} in time")
        if code == grpc.StatusCode.UNAVAILABLE:
            return FederationError(f"lost the federation server at {self.address} during {method}: {details}")
        return FederationError(f"server at {self.address} refused {method}: {details}")

    def _unary(self, method: str, request: bytes, timeout: float) -> bytes:
        self._connect()
        try:
            return self._calls[method](request, timeout=timeout)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise self._error(exc, method) from None

    def _stream_unary(self, method: str, messages: Iterator[bytes], timeout: float) -> bytes:
        self._connect()
        try:
            return self._calls[method](messages, timeout=timeout)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise self._error(exc, method) from None

    def _unary_stream(self, method: str, request: bytes, timeout: float) -> Iterator[bytes]:
        self._connect()
        call = self._calls[method](request, timeout=timeout)

        def _iter() -> Iterator[bytes]:
            try:
                yield from call
            except grpc.RpcError as exc:
                raise self._error(exc, method) from None
            finally:
                call.cancel()

        return _iter()

    def close(self) -> None:
        self._channel.close()
