"""The data plane: the federation's block transfers over plain TCP (or TLS) beside gRPC.

gRPC's Python bindings move a large message through several copies and
threads; on loopback a push + pull of a 16 MB block took about 2.4 times as
long as the same bytes through a raw socket. The calls that carry blocks
(``UploadState``, ``Push``, ``Pull``) therefore also travel over a second
port, as length-prefixed frames on one TCP connection per call: the same
messages (the framing of :mod:`pl_parablock.federation.wire`), the same
handlers of :class:`~pl_parablock.federation.server.FederationServer` (token
check before any message is read, per-peer call limits, turns to upload,
idle and call deadlines, the same refusals), sent with ``sendmsg`` from the
messages and received with ``recv_into``. Control calls (``Join``,
``Admit``, ``Versions``, ``Leave``) stay on gRPC.

The server announces the port in its ``Join`` reply. A client that cannot
reach it (a firewall that lets only the gRPC port through) says so once and
keeps to gRPC; so does a call the data plane turns away at its door (too many
connections).

A call, both ways a sequence of frames ``kind (1 byte) | length (4 bytes,
big-endian) | payload``:

* server, once it took the connection: ``A`` (or an empty ``E``: turned
  away, too many connections, nothing read; the client then uses gRPC for
  the call);
* client, at once (not waiting for ``A``): ``C`` (the call: a JSON object
  with ``method`` and ``metadata``, at most :data:`MAX_PREFACE_BYTES`);
* server, when the handler begins to read the request (the token checked,
  an upload's turn come): ``G``;
* client: ``M`` per request message, ``Z`` — an upload only once ``G``
  came, so a client waiting for its turn has sent nothing (a download's
  small request goes at once);
* server: ``M`` per reply message, then ``Z`` (done) or ``E`` (a JSON object
  with the gRPC status ``code``'s name and ``details``).

The server closes the connection after each call.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from pl_parablock.errors import FederationError
from pl_parablock.federation.channel import TLS
from pl_parablock.federation.wire import parse_header, short

__all__ = ["DATA_METHODS", "DataPlaneClient", "DataPlaneError", "DataPlaneServer", "DataPlaneUnavailableError"]

log = logging.getLogger(__name__)

DATA_METHODS = ("UploadState", "Push", "Pull")
"""The calls that carry blocks: served on the data plane too."""
CALL, MESSAGE, END, ERROR, READY, GO = b"C", b"M", b"Z", b"E", b"A", b"G"
_FRAME = struct.Struct("!cI")
MAX_PREFACE_BYTES = 64 << 10
"""Largest call frame (method and metadata) the server reads before the handler checks the token."""
PREFACE_TIMEOUT_S = 10.0
"""How long a new connection may take to send its call frame (a TLS handshake included)."""
DRAIN_S = 5.0
"""How long the server keeps reading a request it no longer needs after it answered."""
_STEP = 4 << 20  # a larger message is received in steps of this size, so a frame's claimed length allocates nothing ahead


class DataPlaneError(grpc.RpcError):
    """A data-plane call that failed, with the gRPC status code a gRPC call would have had."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class DataPlaneUnavailableError(Exception):
    """The call could not begin on the data plane; nothing of it was sent, so the client may make it over gRPC.

    ``lasting``: the port could not be reached at all (a firewall, a server
    gone), as opposed to a busy server that turned this connection away.
    """

    def __init__(self, message: str, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


def _send(sock: socket.socket, kind: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
    """Send one frame, its header and payload in one ``sendmsg`` where the socket allows (no copy of the payload)."""
    header = _FRAME.pack(kind, len(payload))
    if not payload:
        sock.sendall(header)
    elif isinstance(sock, ssl.SSLSocket):
        sock.sendall(header)
        sock.sendall(payload)
    else:
        views = [memoryview(header), memoryview(payload).cast("B")]
        while views:
            n = sock.sendmsg(views)
            while n and views:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes; the buffer grows as they arrive. Raises ``ConnectionError`` when the peer closes first."""
    buf = bytearray(min(n, _STEP))
    got = 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(n - got, len(buf))))  # a large message: grown as its bytes come, doubling
        view = memoryview(buf)
        k = sock.recv_into(view[got:])
        del view
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return buf


def _recv(sock: socket.socket, max_bytes: int) -> tuple[bytes, bytearray]:
    kind, length = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if length > max_bytes:
        raise ValueError(f"a frame of {length} bytes (at most {max_bytes})")
    return kind, _recv_exact(sock, length) if length else bytearray()


def _peer(address: Any) -> str:
    """A peer string in gRPC's form (``ipv4:HOST:PORT``)."""
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class _AbortError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _PeerGone(grpc.RpcError):
    """The connection broke or was cut while the handler read the request."""


class _Context:
    """What the server's handlers use of a ``grpc.ServicerContext``, for one data-plane call."""

    sends_views = True  # replies may be memoryviews: sent from memory, without a copy

    def __init__(self, sock: socket.socket, peer: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._sock = sock
        self._peer = peer
        self._metadata = metadata
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def add_callback(self, fn: Callable[[], None]) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(fn)
            return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _AbortError(code, details)

    def cancel(self) -> None:
        """Cut the call: its connection is shut, so a blocked read or write returns."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.end()

    def end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()


Handler = Callable[[Iterator[bytes], Any], Any]


class DataPlaneServer:
    """Serves the data plane's calls with the gRPC server's own handlers.

    Args:
        handlers: method -> the ``FederationServer`` handler function (a
            request-streaming function of ``(messages, context)``; it returns
            the reply, or yields the replies of a streaming method).
        streaming: the methods whose handler yields replies.
        host: the address to bind (the gRPC server's host).
        port: the port; 0 picks a free one.
        tls: certificate and key to serve TLS, as the gRPC server does.
        max_connections: connections served at once; more are turned away.
        max_per_host: connections of one host at once, before any token is checked.
        idle_timeout_s: how long a read or write may wait for the peer.
        max_message_bytes: the largest request message.
    """

    def __init__(
        self,
        handlers: dict[str, Handler],
        streaming: set[str],
        *,
        host: str,
        port: int = 0,
        tls: TLS | None = None,
        max_connections: int,
        max_per_host: int,
        idle_timeout_s: float,
        max_message_bytes: int,
    ) -> None:
        self.handlers = handlers
        self.streaming = streaming
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.max_per_host = max_per_host
        self.idle_timeout_s = idle_timeout_s
        self.max_message_bytes = max_message_bytes
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
            if tls.ca:
                ctx.load_verify_locations(tls.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
            self._tls = ctx
        self._lock = threading.Lock()
        self._live: dict[socket.socket, str] = {}
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="pl_parablock-data")
        self.calls: dict[str, int] = {}  # calls begun, per method

    def start(self) -> int:
        """Bind and accept connections; returns the port."""
        family = socket.AF_INET6 if ":" in self.host.strip("[]") else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host.strip("[]"), self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="pl_parablock-data-accept", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop accepting, cut every connection and join every data-plane thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=True)

    def connections(self) -> int:
        with self._lock:
            return len(self._live)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            host = _peer(address).rpartition(":")[0]
            with self._lock:
                full = len(self._live) >= self.max_connections
                crowded = sum(1 for h in self._live.values() if h == host) >= self.max_per_host
                if not (full or crowded):
                    self._live[sock] = host
            if full or crowded:
                why = f"too many data connections at once{' from ' + host if crowded else ''}; retry later"
                try:
                    sock.setblocking(False)
                    sock.send(_FRAME.pack(ERROR, 0))  # turned away at the door: the client may use gRPC
                except OSError:
                    pass
                sock.close()
                log.debug("data plane: %s", why)
                continue
            try:
                self._pool.submit(self._serve, sock, address)
            except RuntimeError:  # shutting down
                self._forget(sock)
                sock.close()

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.pop(sock, None)

    def _serve(self, raw: socket.socket, address: Any) -> None:
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(min(PREFACE_TIMEOUT_S, self.idle_timeout_s))
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
                with self._lock:
                    self._live[sock] = self._live.pop(raw, "")
            _send(sock, READY)
            kind, payload = _recv(sock, MAX_PREFACE_BYTES)
            if kind != CALL:
                return
            call = parse_header(bytes(payload), "data-plane call", max_bytes=MAX_PREFACE_BYTES)
            method = call.get("method")
            if not isinstance(method, str) or method not in self.handlers:
                details = f"no data-plane method {short(method, 40)}"
                _send(sock, ERROR, json.dumps({"code": "UNIMPLEMENTED", "details": details}).encode())
                return
            metadata = call.get("metadata")
            pairs = tuple(
                (item[0], item[1])
                for item in (metadata if isinstance(metadata, list) else ())
                if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
            )
            sock.settimeout(self.idle_timeout_s)
            self._call(sock, method, pairs[:16], _peer(address))
        except (OSError, ValueError, ssl.SSLError, FederationError, _PeerGone):
            pass  # the peer went away, was cut, or spoke no data-plane protocol: nothing to answer
        except Exception:  # a bug in the server: said, not lost in the thread pool
            log.exception("internal error on the data plane (a connection from %s)", _peer(address))
        finally:
            self._forget(sock)
            self._forget(raw)
            _close(sock)

    def _call(self, sock: socket.socket, method: str, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
        ctx = _Context(sock, peer, metadata)
        limit = self.max_message_bytes

        def messages() -> Iterator[bytes]:
            try:  # the handler reads the request: the token is checked and an upload has its turn
                _send(sock, GO)
            except OSError as exc:
                ctx.end()
                raise _PeerGone(str(exc)) from None
            while True:
                try:
                    kind, payload = _recv(sock, limit)
                except (OSError, ConnectionError, ValueError) as exc:
                    ctx.end()  # as gRPC does when the peer goes: the call's waits end
                    raise _PeerGone(str(exc)) from None
                if kind == END:
                    return
                if kind != MESSAGE:
                    ctx.end()
                    raise _PeerGone(f"unexpected frame {kind!r}")
                yield payload  # type: ignore[misc]

        handler = self.handlers[method]
        try:
            if method in self.streaming:
                for reply in handler(messages(), ctx):
                    _send(sock, MESSAGE, reply)
            else:
                _send(sock, MESSAGE, handler(messages(), ctx))
            _send(sock, END)
        except _AbortError as exc:
            _send(sock, ERROR, json.dumps({"code": exc.code.name, "details": exc.details}).encode())
        finally:
            ctx.end()


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


def _close(sock: socket.socket) -> None:
    """Close after the answer was sent: what the peer still sends (the end of a request the server did not
    need, e.g. a refused update) is read and dropped for up to :data:`DRAIN_S`, so the close does not reset
    the connection before the peer has read the answer."""
    try:
        sock.shutdown(socket.SHUT_WR)  # a TLS socket's too: what is drained is read raw, undecrypted
        end = time.monotonic() + DRAIN_S
        buf = bytearray(1 << 16)
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv_into(buf):
                break
    except (OSError, ValueError, ssl.SSLError):
        pass
    finally:
        sock.close()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
