"""The server's memory stays O(block) when many clients push a large block at once.

Loose bound only (the benchmark ``benchmarks/memory.py`` measures it): a
server process with the federation's memory settings, 8 clients pushing a
32 MB block at the same moment. Before the settings it held about 15 blocks
at its peak; now about 3.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from _common import MB, ServerProcess, block_fingerprint

from pl_parablock.client.transport import GrpcTransport

CLIENTS, BLOCK_MB = 8, 32


@pytest.mark.timeout(240)
def test_many_clients_pushing_a_large_block_at_once_keep_the_server_near_one_block():
    tensors = {"block.weight": torch.rand(BLOCK_MB * MB // 4)}
    with ServerProcess(clients=CLIENTS, rounds=1, mode="parablock") as server:
        transports = [GrpcTransport(server.address, chunk_bytes=1 << 20) for _ in range(CLIENTS)]
        try:
            fp = block_fingerprint([tensors])
            transports[0].join(0, fp, 60.0)
            transports[0].upload_state(0, tensors, 120.0)
            for i in range(1, CLIENTS):
                transports[i].join(i, fp, 60.0)
            before = server.call("reset")
            barrier = threading.Barrier(CLIENTS)
            replies: list[object] = []

            def push(i: int) -> None:
                barrier.wait(30.0)
                header = {"client_id": i, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": 1.0}
                replies.append(transports[i].push(header, tensors, 120.0).accepted)

            threads = [threading.Thread(target=push, args=(i,), name=f"test-push-{i}") for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120.0)
            assert replies == [True] * CLIENTS
            assert torch.equal(transports[0].pull(0, 0, 60.0).tensors["block.weight"], tensors["block.weight"])
            after = server.call("mem")
        finally:
            for t in transports:
                t.close()
    round_peak_blocks = (after["hwm_kb"] - before["rss_kb"]) * 1024 / (BLOCK_MB * MB)
    assert round_peak_blocks < 8, f"the server's round peaked at {round_peak_blocks:.1f} blocks for {CLIENTS} clients"
