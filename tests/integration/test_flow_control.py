"""The server's flow control and admission against real gRPC clients on loopback (issue 12, parts 2 and 5).

* uploads beyond ``max_uploads`` wait their turn, unread, and then go through;
  the project's clients wait in ``Admit`` with no upload open, and a turn
  granted to one client is neither taken by another nor held past its lease;
* a client that stops reading a download does not make the server produce
  the block into memory, and the call is cut at the server's deadline;
* the default window is gRPC's adaptive one (BDP probing), a fixed one is a
  recipe's choice.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from pl_parablock.client.transport import GrpcTransport
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.server.service import FederationService
from pl_parablock.wire.channel import SERVICE_NAME
from pl_parablock.wire.framing import encode, header_bytes
from tests.helpers import CountingService, wait_until

BLOCK = {"w": torch.linspace(-1.0, 1.0, 4096)}
FINGERPRINT = {
    "mode": "sync",
    "partition": [{"name": "block0", "params": ["w"]}],
    "tensors": {"w": {"dtype": "float32", "shape": [4096], "nbytes": 4096 * 4}},
    "hash": "flow-control",
}


def push_header(client: int) -> dict[str, Any]:
    return {"client_id": client, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": 1.0}


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
def test_uploads_beyond_max_uploads_wait_their_turn_having_sent_nothing(data_plane, monkeypatch):
    from pl_parablock.client import transport as transport_module

    sent: list[int] = []  # messages the waiting client's upload has produced

    def counted(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        for m in encode(*args, **kwargs):
            sent.append(len(m))
            yield m

    agg = Aggregator(clients=2, rounds=1, mode="sync")
    server = FederationServer(FederationService(agg), max_uploads=1, idle_timeout_s=5.0)
    assert FederationServer(FederationService(Aggregator(clients=3, rounds=1)), max_uploads=None).max_uploads == 3
    assert FederationServer(FederationService(Aggregator(clients=32, rounds=1)), max_uploads=None).max_uploads == 4
    address = server.start()
    transports = [GrpcTransport(address, connect_timeout_s=5.0, data_plane=data_plane) for _ in range(2)]
    channel = grpc.insecure_channel(address)
    release = threading.Event()
    try:
        assert transports[0].join(0, FINGERPRINT, 5.0)["need_state"]
        transports[0].upload_state(0, BLOCK, 5.0)
        transports[1].join(1, FINGERPRINT, 5.0)

        def stalled() -> Iterator[bytes]:  # client 0's update: its header, then nothing until released
            messages = encode(push_header(0), BLOCK, chunk_bytes=4096)
            yield next(messages)
            release.wait(10.0)
            yield from messages

        first = channel.stream_unary(f"/{SERVICE_NAME}/Push").future(stalled(), timeout=10.0)
        assert wait_until(lambda: server.uploads() == (1, 0), 30.0), server.uploads()
        second: dict[str, Any] = {}
        monkeypatch.setattr(transport_module, "encode", counted)
        t = threading.Thread(target=lambda: second.update(p=transports[1].push(push_header(1), BLOCK, 10.0)), daemon=True)
        t.start()
        assert wait_until(lambda: server.uploads() == (1, 1), 30.0), "the second upload waits its turn"
        time.sleep(0.2)
        assert "p" not in second and server.uploads() == (1, 1), "and stays unread while the first is read"
        assert sent == [], "it waits having sent none of its update, not even the header"
        # on the data plane it waits within its call for the server's go; over gRPC, in Admit, its upload not opened
        assert server.active_methods() == ({"Push": 2} if data_plane else {"Push": 1, "Admit": 1}), server.active_methods()
        release.set()
        assert b'"accepted":true' in first.result(5.0).replace(b" ", b"")
        t.join(5.0)
        assert second["p"].accepted, second["p"].reason
        assert sum(sent) >= BLOCK["w"].numel() * 4, "then it went whole"
        assert wait_until(lambda: server.uploads() == (0, 0), 30.0)
        assert transports[0].pull(0, 0, 5.0).version == 0
    finally:
        release.set()
        channel.close()
        for tr in transports:
            tr.close()
        server.stop()


def test_one_token_holders_stalled_uploads_do_not_take_the_other_clients_turns():
    tokens = {0: "token-of-0", 1: "token-of-1"}
    agg = Aggregator(clients=2, rounds=1, mode="sync")
    server = FederationServer(FederationService(agg, token=tokens), idle_timeout_s=5.0)  # max_uploads: 2, one per client
    address = server.start()
    honest = GrpcTransport(address, connect_timeout_s=5.0, token=tokens[0])
    other = GrpcTransport(address, connect_timeout_s=5.0, token=tokens[1])
    channel = grpc.insecure_channel(address)
    release = threading.Event()
    try:
        honest.join(0, FINGERPRINT, 5.0)
        honest.upload_state(0, BLOCK, 5.0)
        other.join(1, FINGERPRINT, 5.0)

        def stalled() -> Iterator[bytes]:
            messages = encode(push_header(1), BLOCK, chunk_bytes=4096)
            yield next(messages)
            release.wait(10.0)
            yield from messages

        push = channel.stream_unary(f"/{SERVICE_NAME}/Push")
        metadata = (("authorization", f"Bearer {tokens[1]}"),)
        calls = [push.future(stalled(), timeout=10.0, metadata=metadata) for _ in range(2)]  # client 1 holds two uploads
        assert wait_until(lambda: server.uploads() == (1, 1), 30.0), f"one is read, its second waits: {server.uploads()}"
        assert honest.push(push_header(0), BLOCK, 5.0).accepted, "client 0 gets its turn at once"
        release.set()
        statuses = sorted(json.loads(c.result(5.0))["status"] for c in calls)
        assert statuses == ["accepted", "duplicate"], statuses  # the second, read after the first, is a duplicate
    finally:
        release.set()
        channel.close()
        honest.close()
        other.close()
        server.stop()


def test_a_granted_turn_is_the_clients_own_and_lapses_when_unused():
    tokens = {0: "token-of-0", 1: "token-of-1"}
    agg = Aggregator(clients=2, rounds=1, mode="sync")
    server = FederationServer(FederationService(agg, token=tokens), max_uploads=1, idle_timeout_s=5.0)
    server._uploads.lease_s = 3.0
    address = server.start()
    honest = GrpcTransport(address, connect_timeout_s=5.0, token=tokens[0])
    channel = grpc.insecure_channel(address)
    try:
        honest.join(0, FINGERPRINT, 5.0)
        honest.upload_state(0, BLOCK, 5.0)
        as_client_1 = (("authorization", f"Bearer {tokens[1]}"),)
        reply = json.loads(channel.unary_unary(f"/{SERVICE_NAME}/Admit")(header_bytes({"for": "Push"}), timeout=5.0, metadata=as_client_1))
        assert server.uploads() == (1, 0), "client 1 holds the only turn, and never uploads"
        # client 0 presents client 1's slot: not its own, so it waits for a turn
        as_client_0 = (("authorization", f"Bearer {tokens[0]}"), ("pl-parablock-upload-slot", reply["slot"]))
        t0 = time.monotonic()
        stolen = channel.stream_unary(f"/{SERVICE_NAME}/Push").future(
            encode(push_header(0), BLOCK, chunk_bytes=4096), timeout=30.0, metadata=as_client_0
        )
        assert wait_until(lambda: server.uploads() == (1, 1), 30.0), server.uploads()
        assert json.loads(stolen.result(30.0))["accepted"], "it goes through once the unused turn lapses"
        assert time.monotonic() - t0 >= 2.0, "and not before (a lower bound: a busy machine only makes it later)"
        assert wait_until(lambda: server.uploads() == (0, 0), 30.0)
    finally:
        channel.close()
        honest.close()
        server.stop()


def test_a_client_that_stops_reading_a_download_holds_no_block_and_is_cut_at_the_deadline():
    big = {"w": torch.zeros(16 << 20 >> 2)}  # 16 MB, 64 chunks of 256 KiB
    fingerprint = {**FINGERPRINT, "tensors": {"w": {"dtype": "float32", "shape": [16 << 20 >> 2], "nbytes": 16 << 20}}}
    agg = Aggregator(clients=1, rounds=1, mode="sync")
    service = CountingService(agg, chunk_bytes=256 << 10, max_wait_s=5.0)
    # idle_timeout_s is long: within half a minute only the call's deadline (call_timeout_s) can cut the download
    server = FederationServer(service, call_timeout_s=1.0, idle_timeout_s=120.0)
    address = server.start()
    transport = GrpcTransport(address, connect_timeout_s=5.0)
    channel = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256 << 10)])
    try:
        transport.join(0, fingerprint, 5.0)
        transport.upload_state(0, big, 10.0)
        CountingService.produced = 0
        request = header_bytes({"client_id": 0, "block": 0, "wait_s": 0})
        call = channel.unary_stream(f"/{SERVICE_NAME}/Pull")(request, timeout=30.0)
        next(call)  # the header: the download has begun; then this client reads nothing more
        assert wait_until(lambda: server.active_calls() == 0, 30.0), "the stalled download is cut at call_timeout_s"
        produced = CountingService.produced
        assert produced < (16 << 20) // 2, f"the server produced {produced / 2**20:.1f} MiB for a reader that stopped"
        try:
            for _ in call:
                pass
            ended = None
        except grpc.RpcError as exc:
            ended = exc.code()
        assert ended is not None, "the client's stream ends with an error, not a complete block"
        # the server still serves everyone else
        assert transport.fetch(0, 0, 10.0).version == -1
    finally:
        channel.close()
        transport.close()
        server.stop()


def test_the_default_window_is_grpcs_adaptive_one_and_a_fixed_one_is_a_choice():
    from pl_parablock.recipe.schema import FederationSection
    from pl_parablock.server import grpc_server as server_module

    assert FederationSection().receive_window_kb is None and server_module.RECEIVE_WINDOW_KB is None
    agg = Aggregator(clients=1, rounds=1)
    adaptive = FederationServer(FederationService(agg))
    fixed = FederationServer(FederationService(agg), receive_window_kb=2048)
    assert ("grpc.http2.bdp_probe", 0) not in adaptive.options
    assert ("grpc.http2.bdp_probe", 0) in fixed.options and ("grpc.http2.lookahead_bytes", 2048 * 1024) in fixed.options
    for s in (adaptive, fixed):
        s.stop()
