"""The data plane against untrusted peers that hold no token (issue 20, item 2), loopback only.

Each test runs one attack of the issue against the data plane of an
in-process :class:`FederationServer` on 127.0.0.1, from other loopback
addresses (127.0.0.2, 127.0.0.3, ...: on Linux distinct source addresses, so
distinct hosts to the server), while an honest federation of two clients
(``tests/integration/test_attacks.py``'s, from 127.0.0.1) runs. Each asserts
that the honest clients moved their blocks over the data plane (no call of
theirs was turned away to gRPC), that their global is bitwise the one of the
same federation without the attack, that the server's memory stays bounded
and that it logs no traceback; and then the rule that held the attack off,
with bounds loose enough for a loaded machine:

* a connection trickling its call frame is cut at one deadline for the whole
  frame, and several hosts' trickling connections do not fill the data plane;
* a connection held open after its garbage or its wrong token counts against
  its host until the server is done with it, and that drain ends within a
  bounded time and a bounded number of bytes;
* refusal floods and reconnect churn: once a host was refused a burst of
  times its connections are closed at accept, before a worker reads them,
  and the server remembers a bounded number of hosts.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pl_parablock.client.transport import GrpcTransport
from pl_parablock.server.dataplane import REFUSAL_BURST, REFUSALS_PER_S
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.wire import dataplane
from tests.helpers import wait_until
from tests.integration.test_attacks import bounded_memory, clean_global, make_server, no_tracebacks, run_honest, same  # noqa: F401
from tests.integration.test_data_plane import FRAME, _preface_timeout, frame
from tests.integration.test_faults import self_signed  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # and test_attacks' bounded_memory, autouse

PREFACE_S = 1.0  # the call frame's deadline here (10 s by default)
WRONG_TOKEN_CALL = frame(b"C", json.dumps({"method": "Push", "metadata": [["authorization", "Bearer not-the-token"]]}).encode())
GARBAGE = FRAME.pack(b"X", 0)  # five bytes, no call
# a call frame long enough never to complete at a byte per tick: only a deadline for the whole frame cuts it
SLOW_CALL = frame(b"C", json.dumps({"method": "Push", "metadata": [["x-pad", "x" * 4000]]}).encode())


def connect_from(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A connection to the data plane from ``host`` (a loopback address), closed with a reset (no TIME_WAIT, however many)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.settimeout(timeout)
    try:
        sock.bind((host, 0))
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def first_frame(sock: socket.socket) -> bytes:
    """The kind of the first frame the server sends (``b""``: it closed or reset the connection first)."""
    try:
        head = sock.recv(FRAME.size)
    except OSError:
        return b""
    return head[:1]


@pytest.fixture(scope="module")
def clean() -> dict[str, Any]:
    """The global of the two honest clients, no attack (``test_attacks``'s federation)."""
    return clean_global()


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every data-plane call an honest client had to make over gRPC instead (turned away, or no answer at the door)."""
    seen: list[str] = []
    original = GrpcTransport._data_unavailable

    def record(self: GrpcTransport, exc: Any) -> None:
        seen.append(str(exc))
        original(self, exc)

    monkeypatch.setattr(GrpcTransport, "_data_unavailable", record)
    return seen


def honest_on_the_data_plane(server: FederationServer, address: str, fallbacks: list[str], token: str | None = None) -> dict[str, Any]:
    """Run the honest federation; assert that every block it moved went over the data plane."""
    glob = run_honest(address, [0, 1], token)
    assert fallbacks == [], f"honest calls went over gRPC: {fallbacks[:3]}"
    assert server.data_plane is not None
    calls = server.data_plane.calls
    assert calls.get("Push", 0) >= 6 and calls.get("Pull", 0) >= 6, calls  # 2 clients x 3 rounds
    return glob


class Holders:
    """``per_host`` connections from each of ``hosts``, each opened again as soon as the server closes it, until :meth:`stop`.

    Each connection sends ``opening`` at once, then ``trickle`` one byte per
    ``every_s``, and keeps its socket open when the server shuts its side
    (it then sends a byte per ``every_s``, as the server reads on: it learns
    that the server closed from the reset). Records how long each connection
    lived, from the attacker's side.
    """

    def __init__(self, port: int, hosts: list[str], per_host: int, *, opening: bytes = b"", trickle: bytes = b"", every_s: float = 0.1):
        self.port, self.hosts, self.per_host = port, hosts, per_host
        self.opening, self.trickle, self.every_s = opening, trickle, every_s
        self.opened = 0
        self.lifetimes: list[float] = []
        self._open: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-attack-holders", daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> Holders:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def oldest_s(self) -> float:
        """The longest life of any connection so far, those still open included."""
        now = time.monotonic()
        return max([*self.lifetimes, *(now - t for t in list(self._open.values()))], default=0.0)

    def _tick(self, sock: socket.socket, sent: int) -> int | None:
        """Send the next byte; the bytes sent so far, or ``None`` once the server closed (reset) the connection."""
        try:
            while sock.recv(1 << 16):
                pass
            sent = max(sent, len(self.trickle))  # the server shut its side: only keep the connection open
        except BlockingIOError:
            pass
        except OSError:
            return None
        try:
            sock.send(self.trickle[sent : sent + 1] if sent < len(self.trickle) else b"\0")
        except BlockingIOError:
            pass
        except OSError:
            return None
        return sent + 1

    def _run(self) -> None:
        slots: list[list[Any]] = [[h, None, 0] for h in self.hosts for _ in range(self.per_host)]  # host, socket, bytes sent
        try:
            while not self._stop.is_set():
                for slot in slots:
                    host, sock, sent = slot
                    if sock is None:
                        try:
                            sock = connect_from(host, self.port)
                            sock.sendall(self.opening)
                            sock.setblocking(False)
                        except OSError:
                            if sock is not None:
                                sock.close()
                            continue
                        self._open[sock] = time.monotonic()
                        self.opened += 1
                        sent = 0
                    sent = self._tick(sock, sent)
                    if sent is None:
                        self.lifetimes.append(time.monotonic() - self._open.pop(sock))
                        sock.close()
                        sock = None
                    slot[1], slot[2] = sock, sent or 0
                self._stop.wait(self.every_s)
        finally:
            for slot in slots:
                if slot[1] is not None:
                    slot[1].close()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` while its peer keeps it open (a byte per 0.1 s: the reset says it)."""
    sock.setblocking(False)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            while sock.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
        except OSError:
            return True
        try:
            sock.send(b"\0")
        except BlockingIOError:
            pass
        except OSError:
            return True
        time.sleep(0.1)
    return False


class Flood:
    """Connections from ``host`` as fast as it can make them, each handled by ``each(sock)``; counts what the server did with them."""

    def __init__(self, port: int, host: str, each: Callable[[socket.socket], bytes]):
        self.port, self.host, self.each = port, host, each
        self.made = 0
        self.seen: dict[bytes, int] = {}  # first frame's kind -> connections (b"": closed at accept, nothing sent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"test-flood-{host}", daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock = connect_from(self.host, self.port, timeout=2.0)
            except OSError:
                time.sleep(0.01)
                continue
            try:
                kind = self.each(sock)
            except OSError:  # reset at once: closed at accept
                kind = b""
            finally:
                sock.close()
            self.made += 1
            self.seen[kind] = self.seen.get(kind, 0) + 1
            time.sleep(0.0005)  # leave the honest clients some of the interpreter


def refused_and_held(host: str, port: int) -> socket.socket:
    """A connection from ``host`` whose call (a wrong token) the server refused; its peer keeps it open."""
    sock = connect_from(host, port)
    sock.sendall(WRONG_TOKEN_CALL)
    assert first_frame(sock) == b"A"
    kind, n = FRAME.unpack(sock.recv(FRAME.size, socket.MSG_WAITALL))
    assert kind == b"E" and b"UNAUTHENTICATED" in sock.recv(n, socket.MSG_WAITALL)
    return sock


def wrong_token(sock: socket.socket) -> bytes:
    sock.sendall(WRONG_TOKEN_CALL)
    return first_frame(sock)


def garbage(sock: socket.socket) -> bytes:
    sock.sendall(GARBAGE)
    return first_frame(sock)


# ------------------------------------------------------------------------------------------------ 1. trickling call frames


def test_call_frames_trickled_from_several_hosts_are_cut_and_do_not_close_the_data_plane(clean, fallbacks, monkeypatch):
    """12 connections from each of 3 hosts (36, more than the 28 the server serves at once), each sending its call frame a byte
    per 0.1 s: within the per-read timeout for ever, never within a deadline for the whole frame."""
    server = make_server(2)
    address = server.start()
    _preface_timeout(monkeypatch, server, PREFACE_S)
    assert server.data_plane is not None and server.data_plane.max_connections == 28 and server.data_plane.max_per_host == 12
    try:
        with Holders(server.data_port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 12, trickle=SLOW_CALL) as attack:
            assert wait_until(lambda: attack.opened >= 36, 10.0)
            glob = honest_on_the_data_plane(server, address, fallbacks)
            assert same(glob, clean)
            time.sleep(max(0.0, attack.started + 5.0 - time.monotonic()))  # the attack ran 5 s at least
            oldest = attack.oldest_s()
        assert oldest < 3.5, f"a trickling connection lived {oldest:.1f} s (the call frame's deadline is {PREFACE_S} s)"
        assert wait_until(lambda: server.data_plane.connections() == 0, 10.0)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- 2. held open after garbage or a wrong token


def test_connections_held_open_after_garbage_or_a_wrong_token_count_until_drained(clean, fallbacks, monkeypatch):
    """40 connections from one host, each sending five bytes of garbage or a call with a wrong token, then holding the socket
    open: each kept a worker draining for 5 s while its slot was free again, so one host held every worker."""
    server = make_server(2, token="t0ken")
    address = server.start()
    assert server.data_plane is not None
    port = server.data_port
    try:
        with Holders(port, ["127.0.0.2"], 20, opening=GARBAGE), Holders(port, ["127.0.0.2"], 20, opening=WRONG_TOKEN_CALL) as attack:
            assert wait_until(lambda: attack.opened >= 20, 10.0)
            glob = honest_on_the_data_plane(server, address, fallbacks, "t0ken")
        assert same(glob, clean)

        # a connection answered (here: a wrong token) is its host's until the server is done draining it (a drain of 3 s
        # here, so that a stalled machine does not see it end first) ...
        server.data_plane.max_per_host = 2
        with monkeypatch.context() as m:
            m.setattr(dataplane, "DRAIN_S", 3.0)
            held = [refused_and_held("127.0.0.9", port) for _ in range(2)]
            third = connect_from("127.0.0.9", port)
            assert first_frame(third) == b"E", "turned away at the door: its host's two connections are still being drained"
            for sock in (*held, third):
                sock.close()
        # ... and that drain lasts a bounded time (1 s): closed within seconds, though the peer holds it open
        assert wait_until(lambda: server.data_plane.connections() == 0, 10.0)
        sock = refused_and_held("127.0.0.9", port)
        try:
            assert closed_within(sock, 3.0), "the server closed the drained connection"
        finally:
            sock.close()
        # and a bounded number of bytes: a peer that goes on sending after its answer is cut, not read for as long as it sends
        server.data_plane.max_per_host = 12
        sock = connect_from("127.0.0.10", port, timeout=10.0)
        try:
            sock.sendall(WRONG_TOKEN_CALL)
            with pytest.raises(OSError):
                sock.sendall(bytes(64 << 20))
        finally:
            sock.close()
        assert wait_until(lambda: server.data_plane.connections() == 0, 10.0)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ 3. refusal floods and reconnect churn


def test_refusal_floods_and_reconnect_churn_are_closed_at_accept(clean, fallbacks, monkeypatch):
    """Three hosts open connections as fast as they can: calls with a wrong token, five bytes of garbage, and (churn) connections
    against a host's full slots, held silent. Each refused call cost the server a worker, a call frame parsed and an answer;
    now a host refused a burst of times has its connections closed at accept, with nothing read or sent."""
    server = make_server(2, token="t0ken")
    address = server.start()
    _preface_timeout(monkeypatch, server, PREFACE_S)
    assert server.data_plane is not None
    port = server.data_port
    floods = [Flood(port, "127.0.0.5", wrong_token).start(), Flood(port, "127.0.0.6", garbage).start()]
    began = time.monotonic()
    try:
        with Holders(port, ["127.0.0.7"], 12) as full:  # the churning host's full slots: silent connections
            assert wait_until(lambda: full.opened >= 12, 10.0)
            floods.append(Flood(port, "127.0.0.7", first_frame).start())
            glob = honest_on_the_data_plane(server, address, fallbacks, "t0ken")
            assert wait_until(lambda: all(f.made >= 1000 for f in floods) or time.monotonic() - began > 8.0, 20.0)
            for f in floods:
                f.stop()
            lasted = time.monotonic() - began
        assert same(glob, clean)
        # a burst, then a few a second; and the connections in flight when the burst ran out (a host's share at most)
        allowed = REFUSAL_BURST + REFUSALS_PER_S * lasted + 50
        for f in floods:
            answered = f.made - f.seen.get(b"", 0)  # taken by a worker (A) or turned away with a frame (E)
            assert f.made >= 300, f"the flood from {f.host} made only {f.made} connections"
            assert answered <= allowed, f"{answered} of {f.made} connections from {f.host} were read or answered: {f.seen}"

        # the hosts it remembers are bounded: 40 more hosts refused, 16 remembered
        server.data_plane.refusals.max_hosts = 16
        for i in range(1, 41):
            for _ in range(2):
                with connect_from(f"127.0.1.{i}", port) as sock:
                    garbage(sock)
        assert len(server.data_plane.refusals) <= 16
        assert wait_until(lambda: server.data_plane.connections() == 0, 10.0)
    finally:
        for f in floods:
            f.stop()
        server.stop()


# ------------------------------------------------------------------------------------------------ TLS: one deadline, handshake included


def test_a_tls_connection_has_one_deadline_for_its_handshake_and_call_frame(request, monkeypatch):
    import ssl

    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.service import FederationService
    from pl_parablock.wire.channel import TLS

    cert, key = request.getfixturevalue("self_signed")  # test_faults'
    server = FederationServer(FederationService(Aggregator(clients=1, rounds=1, mode="sync")), tls=TLS(cert=cert, key=key))
    server.start()
    _preface_timeout(monkeypatch, server, 1.0)
    ctx = ssl.create_default_context(cafile=cert)
    try:
        raw = connect_from("127.0.0.2", server.data_port)
        began = time.monotonic()
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        sock.settimeout(0.05)
        closed = False
        for i in range(100):  # a byte per 0.1 s: 10 s, the call frame never complete
            try:
                sock.sendall(SLOW_CALL[i : i + 1])
                if sock.recv(1 << 16) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except (OSError, ssl.SSLError):
                closed = True
                break
            time.sleep(0.05)
        lived = time.monotonic() - began
        sock.close()
        assert closed and lived < 4.0, f"a TLS connection trickling its call frame lived {lived:.1f} s (deadline 1 s)"
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ why the drain is kept, bounded


def test_an_upload_refused_early_stops_sending_so_a_bounded_drain_is_enough():
    """The server drains at most 1 MiB after its answer; the project's client stops sending a refused upload as soon as the
    answer comes. Here a server that answers after one message and then reads nothing more: the client gets the reason,
    not a send blocked until its deadline."""
    from pl_parablock.client.dataplane import DataPlaneClient
    from pl_parablock.wire.dataplane import DataPlaneError

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        sock, _ = listener.accept()
        held.append(sock)
        sock.sendall(frame(b"A"))
        for _ in range(2):  # the call, then the upload's first message
            kind, n = FRAME.unpack(sock.recv(FRAME.size, socket.MSG_WAITALL))
            sock.recv(n, socket.MSG_WAITALL)
            if kind == b"C":
                sock.sendall(frame(b"G"))
        sock.sendall(frame(b"E", json.dumps({"code": "FAILED_PRECONDITION", "details": "refused at its first chunk"}).encode()))

    thread = threading.Thread(target=serve, name="test-early-answer", daemon=True)
    thread.start()
    try:
        client = DataPlaneClient("127.0.0.1", listener.getsockname()[1])
        chunks = (bytes(64 << 10) for _ in range(512))  # 32 MiB: far beyond what the sockets' buffers hold
        with pytest.raises(DataPlaneError) as info:
            client.stream_unary("Push", chunks, 5.0, ())
        assert info.value.code().name == "FAILED_PRECONDITION" and "first chunk" in info.value.details()
    finally:
        thread.join(5.0)
        for sock in held:
            sock.close()
        listener.close()
