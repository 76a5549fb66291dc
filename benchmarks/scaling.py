"""Scaling: rounds per second and server aggregation time as the number of clients grows.

    python benchmarks/scaling.py [--quick | --smoke] [--clients 2,4,8,16] [--rounds 20]

A federation server runs in its own process (``_server.py``, a fresh one per
N). The N clients are lightweight: threads of this process, each with its
own ``GrpcTransport`` (its own gRPC channel), that do what a sync client's
transmitter does every round with no local training in between: push the
round's block (the real tensors of a decoder layer of the quickstart-sized
model, 128 hidden, as a ``value`` update on the current version) and pull the
aggregate. Starting N Lightning processes would measure process start-up and
CPU contention among N trainers on this 2-core machine, not the server.

Per N: ``round_s`` (median time between consecutive rounds' last pulls, the
first round left out), ``rounds_per_s = 1 / round_s``, ``aggregate_s``
(median of the server's own ``aggregation_s``: forming the new global value
once every update of the round arrived) and the bytes a round moves. The
last output line is JSON with ``results``: a list of ``{clients, round_s,
aggregate_s, ...}``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import torch
from _common import SMALL_LLAMA, ServerProcess, block_fingerprint, finish, machine, median, say

from pl_parablock.blocks import partition_model
from pl_parablock.config import ModelSection
from pl_parablock.federation import GrpcTransport
from pl_parablock.models import build_model

MODEL = SMALL_LLAMA


def model_blocks() -> list[dict[str, torch.Tensor]]:
    """The decoder layers of the quickstart-sized model, one block each."""
    model, _ = build_model(ModelSection(config=dict(MODEL)), 0)
    params = dict(model.named_parameters())
    return [{n: params[n].detach().clone() for n in b.params} for b in partition_model(model).blocks]


def run(n: int, rounds: int, blocks: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    with ServerProcess(clients=n, rounds=rounds, mode="sync") as server:
        transports = [GrpcTransport(server.address, chunk_bytes=1 << 20) for _ in range(n)]
        try:
            fp = block_fingerprint(blocks, mode="sync")
            reply = transports[0].join(0, fp, 60.0)
            transports[0].upload_state(0, {k: v for b in blocks for k, v in b.items()}, 600.0)
            for i, tr in enumerate(transports[1:], start=1):
                tr.join(i, fp, 60.0)
            schedule = [int(b) for b in reply["schedule"]]
            done = [[0.0] * rounds for _ in range(n)]
            nbytes = [0] * n
            errors: list[BaseException] = []

            def client(i: int) -> None:
                versions = [-1] * len(blocks)
                values = [dict(b) for b in blocks]
                try:
                    for r in range(rounds):
                        b = schedule[r]
                        header = {"client_id": i, "round": r, "block": b, "kind": "value", "base_version": versions[b], "weight": 1.0}
                        pushed = transports[i].push(header, values[b], 120.0)
                        if not pushed.accepted:
                            raise RuntimeError(pushed.reason)
                        pulled = transports[i].pull(i, r, 120.0)
                        versions[b] = pulled.version
                        values[b] = pulled.tensors
                        nbytes[i] += pushed.nbytes + pulled.nbytes
                        done[i][r] = time.perf_counter()
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600.0)
            if errors:
                raise RuntimeError(f"a client failed: {errors[0]!r}")
            report = server.call("report")
        finally:
            for tr in transports:
                tr.close()
    last = [max(done[i][r] for i in range(n)) for r in range(rounds)]
    periods = [last[r] - last[r - 1] for r in range(2, rounds)]
    aggregation = [float(r["aggregation_s"]) for r in report["rounds"][1:]]
    round_s = median(periods)
    return {
        "clients": n,
        "round_s": round(round_s, 4),
        "rounds_per_s": round(1.0 / round_s, 2),
        "aggregate_s": round(median(aggregation), 5),
        "aggregate_s_max": round(max(aggregation), 5),
        "mb_per_round": round(sum(nbytes) / rounds / 1e6, 2),
        "mb_per_s": round(sum(nbytes) / rounds / 1e6 / round_s, 1),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="12 rounds per N, under a minute on 2 cores")
    form.add_argument("--smoke", action="store_true", help="N = 2, 4 rounds (for tests)")
    p.add_argument("--clients", help="comma-separated N (default 2,4,8,16)")
    p.add_argument("--rounds", type=int, help="rounds per N (default 30; quick 12; smoke 4)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    info = machine()
    form_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    clients = [int(c) for c in args.clients.split(",")] if args.clients else [2] if args.smoke else [2, 4, 8, 16]
    rounds = args.rounds or (4 if args.smoke else 12 if args.quick else 30)
    blocks = model_blocks()
    block_mb = sum(t.numel() * t.element_size() for t in blocks[0].values()) / 1e6
    say(f"scaling: N = {clients} lightweight clients on loopback, {rounds} rounds, {block_mb:.2f} MB blocks")
    results = []
    for n in clients:
        results.append(run(n, rounds, blocks))
        r = results[-1]
        ms, agg_ms = r["round_s"] * 1000, r["aggregate_s"] * 1000
        say(f"  {n:>3} clients: {ms:7.1f} ms/round ({r['rounds_per_s']:.1f}/s), aggregation {agg_ms:.2f} ms")
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "form": form_name,
        "machine": info,
        "block_mb": round(block_mb, 3),
        "clients_are": "threads of one process, each with its own GrpcTransport; server in its own process",
        "results": results,
    }
    finish(result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
