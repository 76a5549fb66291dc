"""The data plane's server half: a carrier of the block transfers over plain TCP (or TLS) beside gRPC.

:class:`DataPlaneServer` serves the data plane's calls
(:data:`~pl_parablock.wire.dataplane.DATA_METHODS`, the protocol of
:mod:`pl_parablock.wire.dataplane`) with the same handlers as gRPC
(:class:`~pl_parablock.server.carriers.Handlers`: token check, limits, turns,
then the service), through a :class:`_Context` that offers the handlers what
they use of a ``grpc.ServicerContext``. It is a
:class:`~pl_parablock.server.carriers.Carrier`: the server opens it with the
others and announces its port (``data_port``) in the ``Join`` reply.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from pl_parablock.errors import FederationError
from pl_parablock.server.carriers import Carrier, Handlers
from pl_parablock.wire import dataplane as wire
from pl_parablock.wire.channel import TLS
from pl_parablock.wire.dataplane import (
    _FRAME,
    CALL,
    END,
    ERROR,
    GO,
    MAX_PREFACE_BYTES,
    MESSAGE,
    READY,
    _close,
    _peer,
    _recv,
    _send,
    log,
)
from pl_parablock.wire.framing import parse_header, short


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


class DataPlaneServer(Carrier):
    """Serves the data plane's calls with the server's own handlers.

    Args:
        handlers: the ``FederationServer``'s handlers of the data plane's
            methods (request-streaming functions of ``(messages, context)``).
        host: the address to bind (the gRPC server's host).
        port: the port; 0 picks a free one.
        tls: certificate and key to serve TLS, as the gRPC server does.
        max_connections: connections served at once; more are turned away.
        max_per_host: connections of one host at once, before any token is checked.
        idle_timeout_s: how long a read or write may wait for the peer.
        max_message_bytes: the largest request message.
    """

    name = "data plane"

    def __init__(
        self,
        handlers: Handlers,
        *,
        host: str,
        port: int = 0,
        tls: TLS | None = None,
        max_connections: int,
        max_per_host: int,
        idle_timeout_s: float,
        max_message_bytes: int,
    ) -> None:
        self.handlers = handlers.calls
        self.streaming = handlers.streaming
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

    def open(self) -> int:
        """Bind and accept connections (:meth:`start`); returns the port.

        Raises:
            FederationError: the port cannot be taken (``federation.data_port``).
        """
        try:
            return self.start()
        except OSError as exc:
            raise FederationError(
                f"cannot listen on {self.host}:{self.port} for the data plane (federation.data_port): {exc.strerror}"
            ) from None

    def announce(self) -> dict[str, Any]:
        """Clients learn the data plane's port when they join."""
        return {"data_port": self.port}

    def close(self, grace: float | None) -> None:
        self.stop()

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
            raw.settimeout(min(wire.PREFACE_TIMEOUT_S, self.idle_timeout_s))  # read when used (tests shorten it)
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
