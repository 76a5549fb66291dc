"""The data plane: the federation's block transfers over plain TCP (or TLS) beside gRPC.

gRPC's Python bindings move a large message through several copies and
threads; on loopback a push + pull of a 16 MB block took about 2.4 times as
long as the same bytes through a raw socket. The calls that carry blocks
(``UploadState``, ``Push``, ``Pull``) therefore also travel over a second
port, as length-prefixed frames on one TCP connection per call: the same
messages (the framing of :mod:`pl_parablock.wire.framing`), the same
handlers of :class:`~pl_parablock.server.grpc_server.FederationServer` (token
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
  away, too many connections, nothing read; or a reset: its host was refused
  too often; the client then uses gRPC for the call);
* client, at once (not waiting for ``A``): ``C`` (the call: a JSON object
  with ``method`` and ``metadata``, at most :data:`MAX_PREFACE_BYTES`, all
  of it within :data:`PREFACE_TIMEOUT_S` of the connection);
* server, when the handler begins to read the request (the token checked,
  an upload's turn come): ``G``;
* client: ``M`` per request message, ``Z`` — an upload only once ``G``
  came, so a client waiting for its turn has sent nothing (a download's
  small request goes at once); an upload stops at once if the server
  answers before its end (refused early);
* server: ``M`` per reply message, then ``Z`` (done) or ``E`` (a JSON object
  with the gRPC status ``code``'s name and ``details``).

The server closes the connection after each call.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from typing import Any

import grpc

log = logging.getLogger(__name__)

DATA_METHODS = ("UploadState", "Push", "Pull")
"""The calls that carry blocks: served on the data plane too."""
CALL, MESSAGE, END, ERROR, READY, GO = b"C", b"M", b"Z", b"E", b"A", b"G"
_FRAME = struct.Struct("!cI")
MAX_PREFACE_BYTES = 64 << 10
"""Largest call frame (method and metadata) the server reads before the handler checks the token."""
PREFACE_TIMEOUT_S = 10.0
"""How long a new connection may take, from the moment the server accepted it, to send its whole call frame (a TLS
handshake included): one deadline for all of it, not a timeout per read, so trickling bytes does not extend it."""
DRAIN_S = 1.0
"""How long the server keeps reading a request it no longer needs after it answered (see :func:`_close`)."""
DRAIN_BYTES = 1 << 20
"""How many bytes of such a request the server reads at most before it closes the connection anyway."""
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


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """``n`` bytes; the buffer grows as they arrive. Raises ``ConnectionError`` when the peer closes first.

    ``deadline`` (``time.monotonic()``): all ``n`` bytes must have come by
    then (``TimeoutError``), however the peer spaces them; without it, the
    socket's timeout applies to each read.
    """
    buf = bytearray(min(n, _STEP))
    got = 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(n - got, len(buf))))  # a large message: grown as its bytes come, doubling
        if deadline is not None:
            _until(sock, deadline)
        view = memoryview(buf)
        k = sock.recv_into(view[got:])
        del view
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return buf


def _recv(sock: socket.socket, max_bytes: int, deadline: float | None = None) -> tuple[bytes, bytearray]:
    """One frame, its payload at most ``max_bytes`` (``ValueError`` before any of it is read); ``deadline``: for the whole frame."""
    kind, length = _FRAME.unpack(_recv_exact(sock, _FRAME.size, deadline))
    if length > max_bytes:
        raise ValueError(f"a frame of {length} bytes (at most {max_bytes})")
    return kind, _recv_exact(sock, length, deadline) if length else bytearray()


def _until(sock: socket.socket, deadline: float) -> None:
    """Let the socket's next operation wait only until ``deadline``; ``TimeoutError`` if it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    sock.settimeout(left)


def _peer(address: Any) -> str:
    """A peer string in gRPC's form (``ipv4:HOST:PORT``)."""
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _close(sock: socket.socket, drain: bool = True) -> None:
    """Close a connection the server is done with.

    ``drain``: the server answered, and the peer may still be sending what the
    answer made needless (the end of a refused update); closing with those
    bytes unread would reset the connection, and a reset can destroy the
    answer before the peer has read it. So what the peer still sends is read
    and dropped, until it closes, for at most :data:`DRAIN_S` and
    :data:`DRAIN_BYTES` (the project's clients stop sending as soon as an
    answer comes, so an honest peer ends well within either). Without
    ``drain`` (nothing was answered: garbage, a call frame that never came),
    only what has already arrived is read, without waiting.
    """
    try:
        sock.shutdown(socket.SHUT_WR)  # a TLS socket's too: what is drained is read raw, undecrypted
        buf = bytearray(1 << 16)
        end, left_bytes = time.monotonic() + (DRAIN_S if drain else 0.0), DRAIN_BYTES
        if not drain:
            sock.setblocking(False)
        while left_bytes > 0:
            if drain:
                _until(sock, end)
            k = sock.recv_into(buf, min(len(buf), left_bytes))
            if not k:
                break
            left_bytes -= k
    except (OSError, ValueError, ssl.SSLError):
        pass  # the drain's time ran out, nothing more had arrived, or the peer reset the connection
    finally:
        sock.close()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
