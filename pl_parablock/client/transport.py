"""Client side of the federation protocol.

:class:`Transport` implements the protocol (join, upload the initial state,
push an update, long-poll pull an aggregate, leave) once, on top of three raw
calls that its subclasses provide:

* :class:`GrpcTransport` talks to a :class:`~pl_parablock.server.grpc_server.FederationServer`
  over gRPC (separate processes or machines), with a bearer token and
  optional TLS;
* :class:`~pl_parablock.client.inprocess.InProcessTransport` calls a
  :class:`~pl_parablock.server.service.FederationService` in the same
  process (unit tests, one-process debugging); it lives in its own module
  because it holds the server side.

This module is the client side only: it shares the protocol's names, the
channel options, the token metadata and :class:`~pl_parablock.wire.channel.TLS`
with the server through :mod:`pl_parablock.wire.channel` and imports
nothing of the server side.

Both encode and decode the same messages and pace them through the client's
emulated :class:`~pl_parablock.wire.link.Link`, so byte counts and
timings mean the same thing. Every call has a timeout. A lost or corrupted
connection raises :class:`~pl_parablock.errors.TransportError` (retrying may
help); a refusal raises :class:`~pl_parablock.errors.FederationError`.

For fault-injection tests only, the environment variable
``PL_PARABLOCK_TEST_FAULTS`` (e.g. ``drop_after_push=2,corrupt_push=3,drop_pull=1,delay_push_s=0.5``)
makes the N-th push or pull of every transport in the process fail in that
way. It is off unless set, no recipe key reaches it, and it logs a warning.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from torch import Tensor

from pl_parablock.client.dataplane import DataPlaneClient
from pl_parablock.core.codecs import NO_COMPRESSION, CodecError, Compression, decode_broadcast
from pl_parablock.errors import FederationError, ServerRestarted, TransportError, VersionSuperseded
from pl_parablock.wire.channel import CLIENT_OPTIONS, METHODS, SERVICE_NAME, TLS, UPLOAD_SLOT, UPLOADS, token_metadata
from pl_parablock.wire.dataplane import DATA_METHODS, DataPlaneUnavailableError
from pl_parablock.wire.framing import (
    MAX_LARGE_HEADER_BYTES,
    MAX_REPLY_HEADER_BYTES,
    CorruptStream,
    decode,
    encode,
    header_bytes,
    parse_header,
)
from pl_parablock.wire.link import Link

__all__ = ["Faults", "GrpcTransport", "Pulled", "Pushed", "Transport"]

log = logging.getLogger(__name__)

POLL_S = 20.0
FAULTS_ENV = "PL_PARABLOCK_TEST_FAULTS"


@dataclass
class Pushed:
    """Outcome of an upload: ``status`` is accepted, duplicate, late, rejected or corrupt."""

    accepted: bool
    reason: str
    upload_s: float
    nbytes: int
    status: str = "accepted"
    retry: bool = False
    instance: str | None = None


@dataclass
class Pulled:
    """A global block value as downloaded, or (``kind="delta"``) the decoded broadcast ``D`` of a round's aggregate.

    ``base_versions``: for a delta, the version of each block ``D`` applies to.
    """

    block: int
    version: int
    tensors: dict[str, Tensor] = field(repr=False)
    server_wait_s: float
    download_s: float
    nbytes: int
    instance: str | None = None
    kind: str = "value"
    base_versions: dict[int, int] = field(default_factory=dict)


@dataclass
class Faults:
    """Injected transport faults (tests only): the N-th push/pull of a transport fails."""

    drop_after_push: int = 0
    drop_before_push: int = 0
    corrupt_push: int = 0
    drop_pull: int = 0
    delay_push_s: float = 0.0

    @classmethod
    def from_env(cls) -> Faults | None:
        raw = os.environ.get(FAULTS_ENV, "").strip()
        if not raw:
            return None
        values: dict[str, Any] = {}
        for item in raw.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in cls.__dataclass_fields__:
                raise FederationError(f"{FAULTS_ENV}: unknown fault {key!r}")
            values[key] = float(value) if key == "delay_push_s" else int(value)
        log.warning("%s is set: injecting transport faults %s (tests only)", FAULTS_ENV, values)
        return cls(**values)


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


def _corrupt(messages: Iterator[bytes]) -> Iterator[bytes]:
    """Flip one byte of the first body chunk (fault injection)."""
    for i, m in enumerate(messages):
        if i == 1 and m:
            m = bytes([m[0] ^ 0xFF]) + m[1:]
        yield m


class Transport(ABC):
    """Client side of the protocol; subclasses provide the raw calls.

    Args:
        link: emulated link the bytes are paced through (``None``: none).
        chunk_bytes: size of the chunks blocks are cut into.
        token: bearer token sent with every call (``None``: none).
        compression: the federation's codecs; with a lossy download codec
            and ``delta_downloads``, a round's pull asks for the compressed
            broadcast ``D`` and decodes it (the client then forms ``g + D``).
        delta_downloads: ask for compressed broadcasts (``False`` in cyclic
            mode, where a client does not hold every version).
    """

    def __init__(
        self,
        *,
        link: Link | None = None,
        chunk_bytes: int = 1 << 20,
        token: str | None = None,
        compression: Compression = NO_COMPRESSION,
        delta_downloads: bool = True,
    ) -> None:
        self.link = link or Link()
        self.chunk_bytes = chunk_bytes
        self.token = token
        self.compression = compression
        self.delta_downloads = delta_downloads and compression.lossy_download
        self.instance: str | None = None  # the server instance joined; set by the client after join
        self.faults = Faults.from_env()
        self._pushes = 0
        self._pulls = 0

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
        """Join the federation; returns the schedule, rounds, versions and next round."""
        req = header_bytes({"client_id": client_id, "fingerprint": dict(fingerprint), "timeout_s": timeout})
        return parse_header(self._unary("Join", req, timeout + 5.0), "join reply", max_bytes=MAX_REPLY_HEADER_BYTES)

    def upload_state(self, client_id: int, tensors: Mapping[str, Tensor], timeout: float) -> int:
        """Send the initial global state (first client only); returns bytes sent."""
        counter = _Counter(self.link.pace_up(encode({"client_id": client_id}, tensors, chunk_bytes=self.chunk_bytes, zero_copy=True)))
        parse_header(self._stream_unary("UploadState", iter(counter), timeout), "upload reply", max_bytes=MAX_REPLY_HEADER_BYTES)
        return counter.nbytes

    def push(self, header: Mapping[str, Any], tensors: Mapping[str, Tensor], timeout: float) -> Pushed:
        """Upload one round's update of a block."""
        self._pushes += 1
        f = self.faults
        if f and f.delay_push_s:
            time.sleep(f.delay_push_s)
        if f and self._pushes == f.drop_before_push:
            raise TransportError(f"injected fault: connection dropped before push {self._pushes}")
        messages: Iterator[bytes] = encode(header, tensors, chunk_bytes=self.chunk_bytes, zero_copy=True)
        if f and self._pushes == f.corrupt_push:
            messages = _corrupt(messages)
        counter = _Counter(self.link.pace_up(messages))
        t0 = time.perf_counter()
        reply = parse_header(self._stream_unary("Push", iter(counter), timeout), "push reply", max_bytes=MAX_REPLY_HEADER_BYTES)
        if f and self._pushes == f.drop_after_push:
            raise TransportError(f"injected fault: connection dropped after push {self._pushes}")
        return Pushed(
            bool(reply.get("accepted")),
            str(reply.get("reason", "")),
            time.perf_counter() - t0,
            counter.nbytes,
            status=str(reply.get("status", "accepted" if reply.get("accepted") else "rejected")),
            retry=bool(reply.get("retry")),
            instance=reply.get("instance"),
        )

    def _download(self, request: dict[str, Any], timeout: float, what: str) -> Pulled:
        self._pulls += 1
        if self.faults and self._pulls == self.faults.drop_pull:
            raise TransportError(f"injected fault: connection dropped before pull {self._pulls}")
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        nbytes = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"{what} did not arrive within {timeout:g} s (federation.timeout_s)")
            req = header_bytes({**request, "wait_s": min(left, POLL_S), "instance": self.instance})
            counter = _Counter(self._unary_stream("Pull", req, left + 5.0))
            try:
                header, tensors = decode(self.link.pace_down(iter(counter)), what=what)
            except CorruptStream as exc:
                raise TransportError(str(exc)) from None
            nbytes += counter.nbytes
            if self.instance is not None and header.get("instance") not in (None, self.instance):
                raise ServerRestarted(f"the server restarted (instance {str(header['instance'])[:8]}, joined {self.instance[:8]})")
            if header.get("superseded"):
                raise VersionSuperseded(f"{what}: the server no longer holds that version (a later round replaced it)")
            if header.get("ready"):
                kind, bases = "value", {}
                if header.get("kind") == "delta":
                    kind, tensors, bases = "delta", *self._decoded(header, tensors, what)
                end = time.perf_counter()
                first = counter.first_at or end
                return Pulled(
                    int(header["block"]),
                    int(header["version"]),
                    tensors,
                    first - t0,
                    end - first,
                    nbytes,
                    header.get("instance"),
                    kind=kind,
                    base_versions=bases,
                )

    def _decoded(self, header: Mapping[str, Any], parts: dict[str, Tensor], what: str) -> tuple[dict[str, Tensor], dict[int, int]]:
        """The broadcast ``D`` a compressed answer carries, and the block versions it applies to."""
        codec = self.compression.download.name
        if header.get("codec") != codec:
            raise FederationError(f"{what}: the server compresses with {header.get('codec')!r}, this client decodes {codec!r}")
        try:
            shapes = {str(n): [int(d) for d in v] for n, v in dict(header["shapes"]).items()}
            bases = {int(b): int(v) for b, v in dict(header["base_versions"]).items()}
            return decode_broadcast(self.compression, parts, shapes), bases
        except (KeyError, TypeError, ValueError) as exc:
            raise FederationError(f"{what}: malformed compressed answer ({exc})") from None
        except CodecError as exc:
            raise TransportError(f"{what}: {exc}") from None

    def pull(self, client_id: int, round_index: int, timeout: float) -> Pulled:
        """Wait for the aggregate of a round and download the block's new global value."""
        request: dict[str, Any] = {"client_id": client_id, "round": round_index}
        if self.delta_downloads:
            request["delta"] = True
        return self._download(request, timeout, f"the aggregate of round {round_index}")

    def fetch(self, client_id: int, block: int, timeout: float) -> Pulled:
        """Download a block's current global value without waiting."""
        return self._download({"client_id": client_id, "block": block}, timeout, f"block {block}")

    def evaluator_pull(self, after: int, block: int, timeout: float) -> tuple[int, int, dict[str, Tensor]]:
        """An evaluator's read: block ``block`` of the global after ``after`` rounds (or after a later point, if the server
        could not hold that one); waits for those rounds. Returns the point read, the number of blocks and the tensors."""
        deadline = time.monotonic() + timeout
        what = f"block {block} of the global model after {after} rounds"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"{what} did not arrive within {timeout:g} s (federation.timeout_s)")
            t0 = time.monotonic()
            req = header_bytes({"evaluator": True, "after": after, "block": block, "wait_s": min(left, POLL_S)})
            try:
                header, tensors = decode(self.link.pace_down(self._unary_stream("Pull", req, left + 5.0)), what=what)
            except CorruptStream as exc:
                raise TransportError(str(exc)) from None
            if header.get("ready"):
                return int(header["after"]), int(header["blocks"]), tensors
            time.sleep(max(0.0, min(deadline - time.monotonic(), 0.5 - (time.monotonic() - t0))))  # answered at once: not a busy loop

    def evaluator_leave(self, report: Mapping[str, Any], timeout: float) -> None:
        """The evaluator is done: its report (curve, final metrics, where the model went) goes to the server."""
        req = header_bytes({"evaluator": True, "report": dict(report)})
        parse_header(self._unary("Leave", req, timeout), "leave reply", max_bytes=MAX_REPLY_HEADER_BYTES)

    def versions(self, client_id: int, timeout: float) -> dict[str, Any]:
        return parse_header(
            self._unary("Versions", header_bytes({"client_id": client_id}), timeout), "versions reply", max_bytes=MAX_REPLY_HEADER_BYTES
        )

    def leave(self, client_id: int, report: Mapping[str, Any] | None, timeout: float) -> None:
        """Tell the server this client is done, with its report.

        A report too large for the server's limit on a header
        (:data:`~pl_parablock.wire.framing.MAX_LARGE_HEADER_BYTES`) goes
        without its per-round records (``"truncated": true``), the client's
        own report file keeps them.
        """
        req = header_bytes({"client_id": client_id, "report": dict(report) if report else None})
        if len(req) > MAX_LARGE_HEADER_BYTES and report:
            slim = {k: v for k, v in report.items() if k not in ("rounds", "events")}
            req = header_bytes({"client_id": client_id, "report": {**slim, "truncated": True}})
            if len(req) > MAX_LARGE_HEADER_BYTES:
                req = header_bytes({"client_id": client_id, "report": {"truncated": True}})
        parse_header(self._unary("Leave", req, timeout), "leave reply", max_bytes=MAX_REPLY_HEADER_BYTES)


# RESOURCE_EXHAUSTED: the server is at its limit of calls at once (it refuses the rest rather than queue them)
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class GrpcTransport(Transport):
    """gRPC client of a federation server.

    Args:
        address: ``HOST:PORT`` of the server.
        connect_timeout_s: how long to wait for the server to answer at first.
        tls: CA (and optional client certificate) for a TLS server; ``None``: plaintext.
        data_plane: move blocks over the server's data plane when its join
            reply announces one (:mod:`pl_parablock.wire.dataplane`);
            calls it cannot take go over gRPC.
        **kwargs: see :class:`Transport`.

    Raises:
        FederationError: on the first call, when the server cannot be reached.
    """

    def __init__(
        self, address: str, *, connect_timeout_s: float = 30.0, tls: TLS | None = None, data_plane: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.tls = tls
        self.data_plane = data_plane
        self._data: DataPlaneClient | None = None  # the server's data plane, once a join announced it
        if tls is not None:
            self._channel = grpc.secure_channel(address, tls.channel_credentials(), options=CLIENT_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=CLIENT_OPTIONS)
        self._metadata = token_metadata(self.token)
        self._ready = False
        self._admits = True  # the server grants turns to upload (``Admit``)
        self._calls: dict[str, Any] = {}
        for method, kind in METHODS.items():
            factory = getattr(self._channel, "unary_unary" if kind == "unary" else kind)
            self._calls[method] = factory(f"/{SERVICE_NAME}/{method}")

    def describe(self) -> str:
        data = f", blocks over its data plane (port {self._data.port})" if self._data is not None else ""
        return f"gRPC{' (TLS)' if self.tls else ''} to {self.address}{data}"

    def join(self, client_id: int, fingerprint: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        reply = super().join(client_id, fingerprint, timeout)
        port = reply.get("data_port")
        if self.data_plane and isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            host = self.address.rpartition(":")[0]
            self._data = DataPlaneClient(host, port, tls=self.tls, connect_timeout_s=min(3.0, self.connect_timeout_s))
        else:
            self._data = None
        return reply

    def _data_call(self, method: str) -> DataPlaneClient | None:
        return self._data if method in DATA_METHODS else None

    def _data_unavailable(self, exc: DataPlaneUnavailableError) -> None:
        if exc.lasting and self._data is not None:
            log.warning("%s; blocks go over gRPC until this client joins again", exc)
            self._data = None
        else:
            log.debug("%s; this call goes over gRPC", exc)

    def _connect(self) -> None:
        if self._ready:
            return
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout_s)
        except grpc.FutureTimeoutError:
            hint = " and its TLS certificate (federation.tls.ca)" if self.tls else ""
            raise FederationError(
                f"cannot reach the federation server at {self.address} within {self.connect_timeout_s:g} s: "
                f"check that it runs (python -m pl_parablock.fit RECIPE --role server), the --server address{hint}"
            ) from None
        self._ready = True

    def _error(self, exc: grpc.RpcError, method: str) -> FederationError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TransportError(f"server at {self.address} did not answer {method} in time")
        if code in _RETRYABLE:
            return TransportError(f"lost the federation server at {self.address} during {method}: {details}")
        return FederationError(f"server at {self.address} refused {method}: {details}")

    def _unary(self, method: str, request: bytes, timeout: float) -> bytes:
        self._connect()
        try:
            return self._calls[method](request, timeout=timeout, metadata=self._metadata)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise self._error(exc, method) from None

    def _turn(self, method: str, timeout: float) -> tuple[tuple[str, str], ...]:
        """Wait for the server's turn to upload (``Admit``); the metadata that presents it.

        A server without ``Admit`` (an older version) lets the upload wait for its turn itself.
        """
        if not self._admits:
            return ()
        try:
            reply = self._calls["Admit"](header_bytes({"for": method}), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                self._admits = False
                return ()
            raise self._error(exc, f"{method} (waiting for a turn to upload)") from None
        slot = parse_header(reply, "admit reply", max_bytes=MAX_REPLY_HEADER_BYTES).get("slot")
        return ((UPLOAD_SLOT, slot),) if isinstance(slot, str) else ()

    def _stream_unary(self, method: str, messages: Iterator[bytes], timeout: float) -> bytes:
        self._connect()
        deadline = time.monotonic() + timeout
        try:
            data = self._data_call(method)
            if data is not None:  # an upload waits for its turn within the call, having sent nothing
                try:
                    return data.stream_unary(method, messages, timeout, self._metadata or ())
                except DataPlaneUnavailableError as exc:  # nothing of the call was sent
                    self._data_unavailable(exc)
            metadata = self._metadata
            if method in UPLOADS:
                metadata = (*(metadata or ()), *self._turn(method, max(deadline - time.monotonic(), 1.0))) or None
            left = max(deadline - time.monotonic(), 1.0)
            as_bytes = (m if isinstance(m, bytes) else bytes(m) for m in messages)  # gRPC sends bytes objects
            return self._calls[method](as_bytes, timeout=left, metadata=metadata)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise self._error(exc, method) from None

    def _unary_stream(self, method: str, request: bytes, timeout: float) -> Iterator[bytes]:
        self._connect()
        data = self._data_call(method)
        if data is not None:
            try:
                replies = data.unary_stream(method, request, timeout, self._metadata or ())
            except DataPlaneUnavailableError as exc:
                self._data_unavailable(exc)
            except grpc.RpcError as exc:
                raise self._error(exc, method) from None
            else:

                def _data_iter() -> Iterator[bytes]:
                    try:
                        yield from replies
                    except grpc.RpcError as exc:
                        raise self._error(exc, method) from None

                return _data_iter()
        call = self._calls[method](request, timeout=timeout, metadata=self._metadata)

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
