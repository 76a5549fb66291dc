"""The data plane's client half: a block transfer as one TCP (or TLS) connection, falling back to gRPC when refused.

The frames and the protocol are :mod:`pl_parablock.wire.dataplane`'s; the
server half is :mod:`pl_parablock.server.dataplane`.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import time
from collections.abc import Iterator

import grpc

from pl_parablock.wire.channel import TLS
from pl_parablock.wire.dataplane import CALL, END, ERROR, GO, MESSAGE, READY, DataPlaneError, DataPlaneUnavailableError, _left, _recv, _send


def _answered(sock: socket.socket) -> bool:
    """Whether the server has sent something while the request is still going out: after its go it answers only once
    it has read the whole request, unless it refuses it early; the server then stops reading it (it drains at most
    :data:`~pl_parablock.wire.dataplane.DRAIN_BYTES`), so the client stops sending."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


class DataPlaneClient:
    """The client's end of the data plane: one connection per call, to ``host:port``."""

    def __init__(self, host: str, port: int, *, tls: TLS | None = None, connect_timeout_s: float = 3.0) -> None:
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            ctx = ssl.create_default_context(cafile=tls.ca) if tls.ca else ssl.create_default_context()
            if tls.cert and tls.key:
                ctx.load_cert_chain(tls.cert, tls.key)
            self._tls = ctx

    def describe(self) -> str:
        return f"{self.host}:{self.port}"

    def _open(self, method: str, metadata: tuple[tuple[str, str], ...], deadline: float, request: bytes | None = None) -> socket.socket:
        """A connection the server took, with the call (and a download's ``request``) sent.

        The call goes with the connection's first bytes, before the server
        said it took the connection, so that taking it costs no round trip
        of its own. Raises :class:`DataPlaneUnavailableError` (use gRPC) when
        the server cannot be reached or turns the connection away: it has
        then read nothing of the call.
        """
        try:
            raw = socket.create_connection((self.host.strip("[]"), self.port), timeout=min(self.connect_timeout_s, _left(deadline)))
        except OSError as exc:
            raise DataPlaneUnavailableError(f"cannot connect to the data plane at {self.describe()}: {exc}", lasting=True) from None
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_hostname=self.host.strip("[]"))
            sock.settimeout(min(self.connect_timeout_s, _left(deadline)))
            _send(sock, CALL, json.dumps({"method": method, "metadata": [list(m) for m in metadata]}).encode())
            if request is not None:
                _send(sock, MESSAGE, request)
                _send(sock, END)
            kind, _ = _recv(sock, 0)
            if kind != READY:
                raise ConnectionError("turned away (too many connections at once)")
        except (OSError, ConnectionError, ValueError, ssl.SSLError) as exc:
            sock.close()
            raise DataPlaneUnavailableError(f"the data plane at {self.describe()} did not take the call: {exc}", lasting=False) from None
        return sock

    def _read(self, sock: socket.socket, deadline: float, max_bytes: int) -> tuple[bytes, bytearray]:
        sock.settimeout(_left(deadline))
        try:
            return _recv(sock, max_bytes)
        except TimeoutError:
            raise DataPlaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except (OSError, ConnectionError, ValueError) as exc:
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"the data connection broke: {exc}") from None

    @staticmethod
    def _failed(payload: bytearray) -> DataPlaneError:
        try:
            e = json.loads(payload) if payload else {}
            code = grpc.StatusCode[str(e.get("code"))]
            return DataPlaneError(code, str(e.get("details", ""))[:2000])
        except (ValueError, KeyError, AttributeError):
            return DataPlaneError(grpc.StatusCode.UNKNOWN, "the data plane answered an error it did not describe")

    def stream_unary(self, method: str, messages: Iterator[bytes], timeout: float, metadata: tuple[tuple[str, str], ...]) -> bytes:
        """Send the request messages, return the reply.

        Raises ``DataPlaneError`` (as a gRPC call's ``RpcError``), or
        :class:`DataPlaneUnavailableError` before anything was sent.
        """
        deadline = time.monotonic() + timeout
        sock = self._open(method, metadata, deadline)
        try:
            # nothing of the request goes before the server asks for it (its token check passed, an upload's turn came)
            kind, payload = self._read(sock, deadline, 64 << 20)
            if kind != GO:
                return self._answer(sock, deadline, (kind, payload))
            try:
                for m in messages:
                    sock.settimeout(_left(deadline))
                    _send(sock, MESSAGE, m)
                    if _answered(sock):  # refused early (a bad update): the rest would be read only to be dropped
                        break
                else:
                    sock.settimeout(_left(deadline))
                    _send(sock, END)
            except TimeoutError:
                raise DataPlaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
            except OSError as exc:  # the server may have answered (and closed) early: its answer may be waiting
                deadline = min(deadline, time.monotonic() + 1.0)
                broke = f"the data connection broke: {exc}"
            else:
                broke = ""
            try:
                return self._answer(sock, deadline)
            except DataPlaneError as exc:
                if broke and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, broke) from None
                raise
        finally:
            sock.close()

    def _answer(self, sock: socket.socket, deadline: float, first: tuple[bytes, bytearray] | None = None) -> bytes:
        """The reply of a call: one message and the end, or an error."""
        reply: bytes | None = None
        while True:
            kind, payload = first or self._read(sock, deadline, 64 << 20)
            first = None
            if kind == MESSAGE and reply is None:
                reply = bytes(payload)
            elif kind == END and reply is not None:
                return reply
            elif kind == ERROR:
                raise self._failed(payload)
            else:
                raise DataPlaneError(grpc.StatusCode.INTERNAL, f"unexpected frame {kind!r} from the data plane")

    def unary_stream(self, method: str, request: bytes, timeout: float, metadata: tuple[tuple[str, str], ...]) -> Iterator[bytes]:
        """Send the request; the returned iterator yields the reply messages (raises as :meth:`stream_unary`)."""
        deadline = time.monotonic() + timeout
        sock = self._open(method, metadata, deadline, request)

        def replies() -> Iterator[bytes]:
            try:
                while True:
                    kind, payload = self._read(sock, deadline, 64 << 20)
                    if kind == GO:  # the server read the request
                        continue
                    if kind == MESSAGE:
                        yield payload  # type: ignore[misc]
                    elif kind == END:
                        return
                    elif kind == ERROR:
                        raise self._failed(payload)
                    else:
                        raise DataPlaneError(grpc.StatusCode.INTERNAL, f"unexpected frame {kind!r} from the data plane")
            finally:
                sock.close()

        return replies()
