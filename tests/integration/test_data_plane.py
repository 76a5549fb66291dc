"""The data plane (``pl_parablock/federation/dataplane.py``): blocks over plain TCP beside gRPC, on loopback.

* blocks travel over it, control calls over gRPC, results bitwise those of gRPC;
* a client that cannot reach it, or that it turns away, keeps to gRPC;
* it checks the token before it reads a block, answers a refused update
  with its reason, and closes hostile connections while it keeps serving;
* a client that stops reading a download is cut at the server's deadline
  without the server producing the block into memory.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pl_parablock.client.transport import GrpcTransport
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.server.service import FederationService
from pl_parablock.wire import dataplane
from pl_parablock.wire.framing import encode, header_bytes
from tests.helpers import CountingService, wait_until

N = 1 << 20  # a 4 MB block: many chunks
FINGERPRINT = {
    "mode": "sync",
    "partition": [{"name": "block0", "params": ["w"]}],
    "tensors": {"w": {"dtype": "float32", "shape": [N], "nbytes": N * 4}},
    "hash": "data-plane",
}
FRAME = struct.Struct("!cI")


def start(
    clients: int = 1, rounds: int = 2, service: FederationService | None = None, idle_timeout_s: float = 5.0, **kwargs: Any
) -> FederationServer:
    server = FederationServer(
        service or FederationService(Aggregator(clients=clients, rounds=rounds, mode="sync")), idle_timeout_s=idle_timeout_s, **kwargs
    )
    server.start()
    return server


def push_header(client: int, rnd: int = 0, base: int = -1) -> dict[str, Any]:
    return {"client_id": client, "round": rnd, "block": 0, "kind": "value", "base_version": base, "weight": 1.0}


def raw_frames(sock: socket.socket) -> Iterator[tuple[bytes, bytes]]:
    """The frames a raw data-plane connection receives, until it closes."""
    buf = b""
    while True:
        while len(buf) >= FRAME.size and len(buf) >= FRAME.size + FRAME.unpack(buf[: FRAME.size])[1]:
            kind, n = FRAME.unpack(buf[: FRAME.size])
            yield kind, buf[FRAME.size : FRAME.size + n]
            buf = buf[FRAME.size + n :]
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def test_blocks_travel_over_the_data_plane_and_control_calls_over_grpc():
    server = start()
    transport = GrpcTransport(server.address, connect_timeout_s=5.0)
    try:
        state = {"w": torch.linspace(-1.0, 1.0, N)}
        reply = transport.join(0, FINGERPRINT, 5.0)
        assert reply["data_port"] == server.data_port and server.data_port != int(server.address.rsplit(":", 1)[1])
        assert f"data plane (port {server.data_port})" in transport.describe()
        transport.upload_state(0, state, 10.0)
        update = {"w": torch.randn(N)}
        pushed = transport.push(push_header(0), update, 10.0)
        assert pushed.accepted and pushed.nbytes > N * 4, pushed
        pulled = transport.pull(0, 0, 10.0)
        assert pulled.version == 0 and torch.equal(pulled.tensors["w"], update["w"]), "one client's aggregate is its update, bitwise"
        assert server.data_plane is not None and server.data_plane.calls == {"UploadState": 1, "Push": 1, "Pull": 1}
        assert wait_until(lambda: server.data_plane.connections() == 0, 30.0), "one connection per call, closed after it"
    finally:
        transport.close()
        server.stop()


def test_without_a_data_plane_or_when_it_cannot_be_reached_blocks_go_over_grpc(caplog):
    update = {"w": torch.randn(N)}
    grpc_only = start(data_port=None)
    transport = GrpcTransport(grpc_only.address, connect_timeout_s=5.0)
    try:
        assert "data_port" not in transport.join(0, FINGERPRINT, 5.0)
        transport.upload_state(0, {"w": torch.zeros(N)}, 10.0)
        assert transport.push(push_header(0), update, 10.0).accepted
        assert torch.equal(transport.pull(0, 0, 10.0).tensors["w"], update["w"])
    finally:
        transport.close()
        grpc_only.stop()

    server = start()
    transport = GrpcTransport(server.address, connect_timeout_s=5.0)
    try:
        transport.join(0, FINGERPRINT, 5.0)
        transport.upload_state(0, {"w": torch.zeros(N)}, 10.0)
        assert server.data_plane is not None
        server.data_plane.stop()  # its port closes, as behind a firewall that opens the gRPC port only
        with caplog.at_level(logging.WARNING, logger="pl_parablock.client.transport"):
            assert transport.push(push_header(0), update, 10.0).accepted
            assert torch.equal(transport.pull(0, 0, 10.0).tensors["w"], update["w"])
        said = [r.getMessage() for r in caplog.records if "data plane" in r.getMessage()]
        assert len(said) == 1 and "blocks go over gRPC until this client joins again" in said[0], said
        assert "Push" not in server.data_plane.calls
    finally:
        transport.close()
        server.stop()


def test_the_data_plane_checks_the_token_before_it_reads_a_block():
    agg = Aggregator(clients=1, rounds=1, mode="sync")
    server = start(service=FederationService(agg, token="the-token"))
    try:
        honest = GrpcTransport(server.address, connect_timeout_s=5.0, token="the-token")
        honest.join(0, FINGERPRINT, 5.0)
        honest.upload_state(0, {"w": torch.zeros(N)}, 10.0)
        honest.close()
        with socket.create_connection(("127.0.0.1", server.data_port), timeout=5.0) as sock:
            call = {"method": "Push", "metadata": [["authorization", "Bearer a-wrong-token"]]}
            sock.sendall(frame(b"C", json.dumps(call).encode()))
            for message in encode(push_header(0), {"w": torch.full((N,), 7.0)}, chunk_bytes=1 << 16):
                try:
                    sock.sendall(frame(b"M", message))
                except OSError:
                    break  # the server answered and stopped reading
            frames = list(raw_frames(sock))
        assert frames[0] == (b"A", b"")
        kind, payload = frames[1]
        error = json.loads(payload)
        assert kind == b"E" and error["code"] == "UNAUTHENTICATED" and "token" in error["details"], frames[1]
        assert agg.report()["rounds"] == [] and torch.equal(agg.global_state()["w"], torch.zeros(N)), "nothing of it was summed"
    finally:
        server.stop()


def test_a_refused_update_gets_its_reason_over_the_data_plane():
    agg = Aggregator(clients=1, rounds=1, mode="sync")
    server = start(service=FederationService(agg, chunk_bytes=1 << 16))
    transport = GrpcTransport(server.address, connect_timeout_s=5.0, chunk_bytes=1 << 16)
    try:
        transport.join(0, FINGERPRINT, 5.0)
        transport.upload_state(0, {"w": torch.zeros(N)}, 10.0)
        bad = torch.randn(N)
        bad[10] = float("nan")  # refused at its first chunk, while 63 more are on their way
        pushed = transport.push(push_header(0), {"w": bad}, 10.0)
        assert not pushed.accepted and "NaN" in pushed.reason, pushed
        assert server.data_plane is not None and server.data_plane.calls.get("Push") == 1
        good = {"w": torch.randn(N)}
        assert transport.push(push_header(0), good, 10.0).accepted, "the client may send again"
        assert torch.equal(transport.pull(0, 0, 10.0).tensors["w"], good["w"])
    finally:
        transport.close()
        server.stop()


def _preface_timeout(monkeypatch: pytest.MonkeyPatch, server: FederationServer, seconds: float) -> None:
    """Set how long the data plane waits for a call frame: where it is defined, where the server's data plane reads it."""
    monkeypatch.setattr(dataplane, "PREFACE_TIMEOUT_S", seconds)


def test_hostile_connections_are_closed_and_the_server_keeps_serving(monkeypatch):
    # idle_timeout_s is long: within a minute only the call frame's deadline (PREFACE_TIMEOUT_S) can close a silent connection
    server = start(idle_timeout_s=120.0)
    assert server.data_plane is not None
    port = server.data_port
    try:
        # silent: closed once the call frame is overdue (0.5 s), well before the client's own timeout
        _preface_timeout(monkeypatch, server, 0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=60.0) as sock:
            assert list(raw_frames(sock)) == [(b"A", b"")]
        _preface_timeout(monkeypatch, server, 120.0)  # the connections below are held open on purpose
        # garbage, a call frame too large, a call that is not JSON: closed without an answer
        nested = b"[" * 20000 + b"]" * 20000
        calls = (frame(b"C", b"{not json"), frame(b"C", b'{"method": "Push", "metadata": ' + nested + b"}"), frame(b"C", b"[1, 2]"))
        for junk in (b"GET / HTTP/1.1\r\n\r\n" * 4, FRAME.pack(b"C", 1 << 30), *calls):
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
                sock.sendall(junk)
                assert list(raw_frames(sock)) == [(b"A", b"")]
        # a method the data plane does not serve; metadata that is not pairs of strings
        for call in ({"method": "Leave", "metadata": []}, {"method": ["Push"], "metadata": [1, [2, 3], ["a"]]}):
            with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
                sock.sendall(frame(b"C", json.dumps(call).encode()))
                frames = list(raw_frames(sock))
                assert frames[1][0] == b"E" and json.loads(frames[1][1])["code"] == "UNIMPLEMENTED"
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
            sock.sendall(frame(b"C", json.dumps({"method": "Pull", "metadata": [1, [2, 3], ["a"], "x"]}).encode()))
            sock.sendall(frame(b"M", header_bytes({"client_id": 0, "block": 0, "wait_s": 0})) + frame(b"Z"))
            frames = list(raw_frames(sock))
            assert [f[0] for f in frames[:2]] == [b"A", b"G"], frames  # the junk pairs are dropped; the call is served
        # connections beyond the per-host limit are turned away at the door; the client then uses gRPC for the call
        assert wait_until(lambda: server.data_plane.connections() == 0, 30.0), "a connection is its host's until drained"
        server.data_plane.max_per_host = 2
        server.data_plane.calls.clear()
        held = [socket.create_connection(("127.0.0.1", port), timeout=5.0) for _ in range(2)]
        transport = GrpcTransport(server.address, connect_timeout_s=5.0)
        try:
            assert wait_until(lambda: server.data_plane.connections() == 2, 30.0)
            transport.join(0, FINGERPRINT, 5.0)
            transport.upload_state(0, {"w": torch.zeros(N)}, 10.0)
            update = {"w": torch.randn(N)}
            assert transport.push(push_header(0), update, 10.0).accepted
            assert server.data_plane.calls == {}, "turned away: over gRPC"
            for sock in held:
                sock.close()
            assert wait_until(lambda: server.data_plane.connections() == 0, 30.0)
            assert torch.equal(transport.pull(0, 0, 10.0).tensors["w"], update["w"])
            assert server.data_plane.calls == {"Pull": 1}, "and the next call is served on the data plane again"
        finally:
            transport.close()
    finally:
        server.stop()


def test_a_client_that_stops_reading_a_data_plane_download_is_cut_at_the_deadline():
    big = 16 << 20 >> 2  # a 16 MB block, 64 chunks of 256 KiB
    fingerprint = {**FINGERPRINT, "tensors": {"w": {"dtype": "float32", "shape": [big], "nbytes": big * 4}}}
    agg = Aggregator(clients=1, rounds=1, mode="sync")
    # idle_timeout_s is long: within half a minute only the call's deadline (call_timeout_s) can cut the download
    server = start(service=CountingService(agg, chunk_bytes=256 << 10, max_wait_s=5.0), call_timeout_s=1.0, idle_timeout_s=120.0)
    transport = GrpcTransport(server.address, connect_timeout_s=5.0)
    try:
        transport.join(0, fingerprint, 5.0)
        transport.upload_state(0, {"w": torch.zeros(big)}, 10.0)
        CountingService.produced = 0
        sock = socket.create_connection(("127.0.0.1", server.data_port), timeout=10.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.sendall(frame(b"C", json.dumps({"method": "Pull", "metadata": []}).encode()))
        sock.sendall(frame(b"M", header_bytes({"client_id": 0, "block": 0, "wait_s": 0})) + frame(b"Z"))
        assert sock.recv(FRAME.size) == FRAME.pack(b"A", 0)  # then this client reads nothing more
        assert wait_until(lambda: server.active_calls() == 0, 30.0), "the stalled download is cut at call_timeout_s (not at idle_timeout_s)"
        produced = CountingService.produced
        assert produced < big * 4 // 2, f"the server produced {produced / 2**20:.1f} MiB for a reader that stopped"
        sock.close()
        assert transport.fetch(0, 0, 10.0).version == -1, "the server still serves everyone else"
    finally:
        transport.close()
        server.stop()


@pytest.mark.parametrize("bad", [-1, 65536, True])
def test_a_data_port_out_of_range_is_named(tmp_path, bad):
    from pl_parablock.errors import ConfigError
    from pl_parablock.recipe.load import load_recipe

    with pytest.raises(ConfigError, match="federation.data_port"):
        load_recipe(None, [f"federation.data_port={str(bad).lower()}"])
