"""The data plane's server half: a carrier of the block transfers over plain TCP (or TLS) beside gRPC.

:class:`DataPlaneServer` serves the data plane's calls
(:data:`~pl_parablock.wire.dataplane.DATA_METHODS`, the protocol of
:mod:`pl_parablock.wire.dataplane`) with the same handlers as gRPC
(:class:`~pl_parablock.server.carriers.Handlers`: token check, limits, turns,
then the service), through a :class:`_Context` that offers the handlers what
they use of a ``grpc.ServicerContext``. It is a
:class:`~pl_parablock.server.carriers.Carrier`: the server opens it with the
others and announces its port (``data_port``) in the ``Join`` reply.

Before a call's token is checked a connection costs the server a worker
thread; :class:`DataPlaneServer` says who may hold one and for how long (one
deadline for the call frame, connections counted until drained, a fair share
per host), and :class:`Refusals` makes a host refused too often cost the
server one accept and one close per connection.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from pl_parablock.errors import FederationError
from pl_parablock.server._ratelimit import RateLimitedLog
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


REFUSAL_BURST = 32
"""Refusals of one host the data plane serves in a burst; beyond them, its new connections are closed at accept."""
REFUSALS_PER_S = 4.0
"""How fast a host's allowance of refusals comes back, per second."""
REFUSAL_BACKOFF_S = 5.0
"""How long the connections of a host that used up its allowance are closed at accept."""
MAX_TRACKED_HOSTS = 4096
"""Hosts whose refusals the data plane remembers at most (the least recently seen are forgotten)."""
_REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED"})
"""The answers that count as a refusal of the host: a call no client of the federation makes (a wrong token, a bad
header, an unknown method). Refused updates, a busy server and deadlines do not count: honest clients meet them."""

warn = RateLimitedLog(log)


def host_of(address: Any) -> str:
    """The host a connection comes from, as the data plane counts hosts: an IPv4 address, or an IPv6 ``/64`` (one
    machine or site usually holds a whole one, so counting its addresses apart would count none)."""
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except ValueError:
        return str(address[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ipv4:{ip.ipv4_mapped}"
        return f"ipv6:[{ipaddress.IPv6Network((ip, 64), strict=False).network_address}]/64"
    return f"ipv4:{ip}"


class Refusals:
    """The refusals of each host, a token bucket per host: what makes a refused call cheap for the server.

    A host may be refused ``burst`` times in a row, and ``per_s`` times a
    second after that; a host refused faster has every new connection closed
    at accept for ``backoff_s`` (a reset: nothing read, nothing sent, no
    worker). A refusal is a connection turned away at the door (too many at
    once), one that sent no valid call frame within its deadline, or an
    answer of :data:`_REFUSED` (a wrong token, a bad header, an unknown
    method). At most ``max_hosts`` hosts are remembered, the least recently
    seen forgotten first, so a peer with many addresses cannot grow it.

    Not thread-safe: the data plane calls it under its lock.
    """

    def __init__(
        self,
        burst: int = REFUSAL_BURST,
        per_s: float = REFUSALS_PER_S,
        backoff_s: float = REFUSAL_BACKOFF_S,
        max_hosts: int = MAX_TRACKED_HOSTS,
    ) -> None:
        self.burst, self.per_s, self.backoff_s, self.max_hosts = burst, per_s, backoff_s, max_hosts
        self._hosts: OrderedDict[str, list[float]] = OrderedDict()  # host -> [allowance left, at, closed at accept until]
        self.closed = 0
        """Connections closed at accept so far."""

    def __len__(self) -> int:
        return len(self._hosts)

    def blocked(self, host: str, now: float) -> bool:
        """Whether ``host``'s connections are closed at accept now."""
        entry = self._hosts.get(host)
        if entry is None or now >= entry[2]:
            return False
        self._hosts.move_to_end(host)  # still at it: remembered before the quiet ones
        self.closed += 1
        return True

    def refused(self, host: str, now: float) -> bool:
        """Count a refusal of ``host``; whether it used up the host's allowance (its connections are now closed at accept)."""
        entry = self._hosts.pop(host, None) or [float(self.burst), now, 0.0]
        entry[0] = min(float(self.burst), entry[0] + (now - entry[1]) * self.per_s) - 1.0
        entry[1] = now
        self._hosts[host] = entry
        while len(self._hosts) > self.max_hosts:
            self._hosts.popitem(last=False)
        if entry[0] < 0.0 and now >= entry[2]:
            entry[0], entry[2] = 0.0, now + self.backoff_s
            return True
        return False


class _Conn:
    """A connection the data plane took: its host's and the total's until its worker is done with it (draining included).

    ``phase``: ``preface`` (no call yet), ``call`` (a handler serves it) or
    ``drain`` (answered, being drained); the first and the last may be cut to
    make room for another host (``evicted``).
    """

    __slots__ = ("evicted", "host", "phase", "since", "sock")

    def __init__(self, sock: socket.socket, host: str, since: float) -> None:
        self.sock = sock
        self.host = host
        self.since = since
        self.phase = "preface"
        self.evicted = False


def _cut(sock: socket.socket) -> None:
    """Shut a connection both ways, so that its worker's blocked read returns (a TLS socket's too, its state untouched)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _abort(sock: socket.socket) -> None:
    """Close at once with a reset: nothing read or sent, no TIME_WAIT left behind."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class DataPlaneServer(Carrier):
    """Serves the data plane's calls with the server's own handlers.

    Before a call's token is checked a connection costs the server a worker
    thread, so who may hold one is bounded (docs/guides/security.md):

    * **One deadline for the call frame.** A connection must have sent its
      whole call frame (a TLS handshake included) within
      :data:`~pl_parablock.wire.dataplane.PREFACE_TIMEOUT_S` (or
      ``idle_timeout_s`` if shorter) of being accepted, however it spaces its
      bytes.
    * **Counted until done.** A connection counts against its host's and the
      total's caps until its worker is free again, the drain after its answer
      included; that drain is bounded
      (:data:`~pl_parablock.wire.dataplane.DRAIN_S`,
      :data:`~pl_parablock.wire.dataplane.DRAIN_BYTES`), and a connection
      answered nothing (garbage, no call frame) is not drained at all.
    * **A fair share per host.** With ``n`` hosts connected (the one
      connecting included), a host may hold at most ``max_connections // n``
      connections (and never more than ``max_per_host``): a host alone, as
      the clients of a local run, has all of them; once others connect, each
      has an equal share. When every worker is taken, a host under its share
      gets one back from the host furthest over it, by cutting that host's
      oldest connection that serves no call yet (still sending its call
      frame, or being drained after its answer): the calls being served are
      never cut, and an honest client's call frame takes one round trip, so
      only connections that hold a worker without using it are. The rule
      shares the workers, it reserves none: when more hosts than
      ``max_connections`` hold one each, a new host finds none free.
    * **Refusals cost little** (:class:`Refusals`): a host refused more than
      :data:`REFUSAL_BURST` times, faster than :data:`REFUSALS_PER_S` a
      second, has its new connections closed at accept, before any worker or
      read, for :data:`REFUSAL_BACKOFF_S`.

    Args:
        handlers: the ``FederationServer``'s handlers of the data plane's
            methods (request-streaming functions of ``(messages, context)``).
        host: the address to bind (the gRPC server's host).
        port: the port; 0 picks a free one.
        tls: certificate and key to serve TLS, as the gRPC server does.
        max_connections: connections served at once (one worker thread each); more are turned away.
        max_per_host: connections of one host at once, before any token is checked.
        idle_timeout_s: how long a read or write may wait for the peer.
        max_message_bytes: the largest request message.
        refusals: the hosts' refusals (:class:`Refusals` with its defaults if ``None``).
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
        refusals: Refusals | None = None,
    ) -> None:
        self.handlers = handlers.calls
        self.streaming = handlers.streaming
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.max_per_host = max_per_host
        self.idle_timeout_s = idle_timeout_s
        self.max_message_bytes = max_message_bytes
        self.refusals = refusals if refusals is not None else Refusals()
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
            if tls.ca:
                ctx.load_verify_locations(tls.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
            self._tls = ctx
        self._lock = threading.Lock()
        self._live: dict[_Conn, None] = {}  # oldest first
        self._per_host: dict[str, int] = {}  # host -> its connections in _live
        self._evicting = 0  # connections in _live cut to make room, their workers not done yet
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
            live = [c.sock for c in self._live]
        for sock in live:
            _cut(sock)
        self._pool.shutdown(wait=True)

    def connections(self) -> int:
        """Connections held now, those being drained included."""
        with self._lock:
            return len(self._live)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop(); or an error of one connection, or no descriptor left for now
                if self._stop.is_set() or self._listener.fileno() < 0:
                    return
                time.sleep(0.01)
                continue
            now = time.monotonic()
            host = host_of(address)
            conn: _Conn | None = None
            blocked = False
            with self._lock:
                if self.refusals.blocked(host, now):
                    verdict = "blocked"
                else:
                    verdict = self._admit(host)
                    if verdict == "ok":
                        conn = _Conn(sock, host, now)
                        self._live[conn] = None
                        self._per_host[host] = self._per_host.get(host, 0) + 1
                    else:
                        blocked = self.refusals.refused(host, now)
            if conn is None:
                if verdict == "blocked":
                    _abort(sock)
                    continue
                try:
                    sock.setblocking(False)
                    sock.send(_FRAME.pack(ERROR, 0))  # turned away at the door: the client may use gRPC
                except OSError:
                    pass
                sock.close()
                log.debug("data plane: turned away a connection from %s (%s)", host, verdict)
                if blocked:
                    self._blocked(host)
                continue
            try:
                self._pool.submit(self._serve, conn, address)
            except RuntimeError:  # shutting down
                self._forget(conn)
                sock.close()

    def _admit(self, host: str) -> str:
        """Whether a new connection of ``host`` may be served (``ok``), or why not (``crowded``, ``full``); under the lock."""
        mine = self._per_host.get(host, 0)
        fair = max(1, self.max_connections // (len(self._per_host) + (0 if mine else 1)))
        if mine >= min(self.max_per_host, fair):
            return "crowded"
        if len(self._live) - self._evicting < self.max_connections:
            return "ok"
        victim: _Conn | None = None  # the oldest connection serving no call of the host furthest over its share
        for conn in self._live:
            if conn.phase == "call" or conn.evicted or conn.host == host:
                continue
            n = self._per_host[conn.host]
            if n > fair and (victim is None or n > self._per_host[victim.host]):
                victim = conn
        if victim is None:
            return "full"
        victim.evicted = True
        self._evicting += 1
        _cut(victim.sock)  # its worker's read returns at once, and the worker is free for this one
        return "ok"

    def _step(self, conn: _Conn, phase: str | None = None, sock: socket.socket | None = None) -> bool:
        """Move a connection on (its phase, its TLS socket); whether it goes on (it was not cut to make room meanwhile)."""
        with self._lock:
            if sock is not None:
                conn.sock = sock
            if phase is not None:
                conn.phase = phase
            return not conn.evicted

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            if self._live.pop(conn, False) is False:
                return
            left = self._per_host[conn.host] - 1
            if left:
                self._per_host[conn.host] = left
            else:
                del self._per_host[conn.host]
            if conn.evicted:
                self._evicting -= 1

    def _refused(self, host: str) -> None:
        with self._lock:
            blocked = self.refusals.refused(host, time.monotonic())
        if blocked:
            self._blocked(host)

    def _blocked(self, host: str) -> None:
        warn.warning(
            host,
            "data plane: %s was refused more than %d times, faster than %g a second; its connections are closed at accept for %g s",
            host,
            self.refusals.burst,
            self.refusals.per_s,
            self.refusals.backoff_s,
        )

    def _serve(self, conn: _Conn, address: Any) -> None:
        raw = conn.sock
        sock: socket.socket = raw
        deadline = conn.since + min(wire.PREFACE_TIMEOUT_S, self.idle_timeout_s)  # the whole call frame's (read when used)
        answered: str | None = None  # the status of the answer sent ("OK": a reply); None: none
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                if not self._step(conn, sock=sock):
                    return
                wire._until(sock, deadline)
                sock.do_handshake()  # one deadline for the whole handshake (Python's own), within the call frame's
            wire._until(sock, deadline)
            _send(sock, READY)
            kind, payload = _recv(sock, MAX_PREFACE_BYTES, deadline)
            if kind != CALL:
                return
            call = parse_header(bytes(payload), "data-plane call", max_bytes=MAX_PREFACE_BYTES)
            method = call.get("method")
            if not isinstance(method, str) or method not in self.handlers:
                details = f"no data-plane method {short(method, 40)}"
                _send(sock, ERROR, json.dumps({"code": "UNIMPLEMENTED", "details": details}).encode())
                answered = "UNIMPLEMENTED"
                return
            metadata = call.get("metadata")
            pairs = tuple(
                (item[0], item[1])
                for item in (metadata if isinstance(metadata, list) else ())
                if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
            )
            if not self._step(conn, phase="call"):
                return
            sock.settimeout(self.idle_timeout_s)
            answered = self._call(sock, method, pairs[:16], _peer(address))
        except (OSError, ValueError, ssl.SSLError, FederationError, _PeerGone):
            pass  # the peer went away, was cut, or spoke no data-plane protocol: nothing to answer
        except Exception:  # a bug in the server: said, not lost in the thread pool
            log.exception("internal error on the data plane (a connection from %s)", _peer(address))
        finally:
            refused = (conn.phase == "preface" and not conn.evicted and not self._stop.is_set()) or answered in _REFUSED
            self._step(conn, phase="drain")
            _close(sock, drain=answered is not None)
            self._forget(conn)
            if refused:
                self._refused(conn.host)

    def _call(self, sock: socket.socket, method: str, metadata: tuple[tuple[str, str], ...], peer: str) -> str:
        """Serve one call; the status of the answer sent (``OK``: a reply)."""
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
            return "OK"
        except _AbortError as exc:
            _send(sock, ERROR, json.dumps({"code": exc.code.name, "details": exc.details}).encode())
            return exc.code.name
        finally:
            ctx.end()
