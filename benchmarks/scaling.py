"""Scaling: rounds per second as the number of clients grows, with the server's and the clients' CPU apart.

    python benchmarks/scaling.py [--quick | --smoke] [--clients 2,4,8,16,32] [--block-mb 0.74,16] [--rounds 20]

A federation server runs in its own process (``_server.py``, a fresh one per
N and block size). The N clients are processes too, forked from this one
before any gRPC object exists (so none of them pays the imports again), each
with its own ``GrpcTransport``: every round a client does what a sync
client's transmitter does, with no local training in between: push the
round's block (a ``value`` update on the current version) and pull the
aggregate. Blocks: ``0.74`` is a decoder layer of the quickstart-sized model
(128 hidden, its real tensors), any other size one float32 tensor of that
many MB. Starting N Lightning processes would measure start-up and N
trainers' contention, not the federation.

Per N and block size: ``round_s`` (median time between consecutive rounds'
last pulls, the first two rounds left out), ``rounds_per_s = 1 / round_s``,
the CPU time per round of the server process (``server_cpu_ms_per_round``,
also per client) and of all client processes together
(``clients_cpu_ms_per_round``), and the bytes a round moves. On a machine
with fewer cores than processes the round is bounded by the CPU all of them
need together (``cpu_bound_round_s``: server + clients CPU per round over
the cores); ``aggregate_s`` is the server's own ``aggregation_s``. The last
output line is JSON with ``results``: a list of ``{clients, block_mb,
round_s, rounds_per_s, server_cpu_ms_per_round, ...}``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import torch
from _common import SMALL_LLAMA, ServerProcess, block_fingerprint, finish, machine, median, say

from pl_parablock.core.blocks import partition_model
from pl_parablock.model.build import build_model
from pl_parablock.recipe.schema import ModelSection

MODEL = SMALL_LLAMA
LAYER_MB = "0.74"


def layer_blocks() -> list[dict[str, torch.Tensor]]:
    """The decoder layers of the quickstart-sized model, one block each."""
    model, _ = build_model(ModelSection(config=dict(MODEL)), 0)
    params = dict(model.named_parameters())
    return [{n: params[n].detach().clone() for n in b.params} for b in partition_model(model).blocks]


def synthetic_blocks(mb: float, count: int = 2) -> list[dict[str, torch.Tensor]]:
    n = int(mb * 1e6) // 4
    return [{f"layer{i}.w": torch.full((n,), 0.01 * (i + 1))} for i in range(count)]


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of a process, this one by default."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(cid: int, conn: Connection, kinds: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    """A client process: on ``(address, rounds, kind)`` run a federation as client ``cid``, answer its timings."""
    from pl_parablock.client.transport import GrpcTransport

    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        address, rounds, kind = job
        blocks = kinds[kind]
        out: dict[str, Any] = {}
        cpu0 = _cpu_s()
        tr = GrpcTransport(address, chunk_bytes=1 << 20, connect_timeout_s=60.0)
        try:
            fp = block_fingerprint(blocks, mode="sync")
            reply = tr.join(cid, fp, 120.0)
            if reply["need_state"]:
                tr.upload_state(cid, {k: v for b in blocks for k, v in b.items()}, 600.0)
            schedule = [int(b) for b in reply["schedule"]]
            conn.send("joined")  # the parent starts the server's CPU clock once every client is in
            conn.recv()
            versions = [-1] * len(blocks)
            values = [dict(b) for b in blocks]
            done, nbytes = [], 0
            cpu_rounds = _cpu_s()
            for r in range(rounds):
                b = schedule[r]
                header = {"client_id": cid, "round": r, "block": b, "kind": "value", "base_version": versions[b], "weight": 1.0}
                pushed = tr.push(header, values[b], 300.0)
                if not pushed.accepted:
                    raise RuntimeError(pushed.reason)
                pulled = tr.pull(cid, r, 300.0)
                versions[b], values[b] = pulled.version, pulled.tensors
                nbytes += pushed.nbytes + pulled.nbytes
                done.append(time.monotonic())  # system-wide on Linux: comparable across the processes
            out = {"done": done, "nbytes": nbytes, "cpu_s": _cpu_s() - cpu_rounds, "join_cpu_s": cpu_rounds - cpu0}
        except Exception as exc:  # reported to the parent, which raises it
            out = {"error": f"client {cid}: {exc!r}"}
        finally:
            tr.close()
        conn.send(out)


def run(n: int, rounds: int, kind: str, blocks: list[dict[str, torch.Tensor]], pipes: list[Connection]) -> dict[str, Any]:
    with ServerProcess(clients=n, rounds=rounds, mode="sync") as server:
        for i in range(n):
            pipes[i].send((server.address, rounds, kind))
        for i in range(n):
            if not pipes[i].poll(300.0):
                raise RuntimeError(f"client {i} did not join within 300 s")
            joined = pipes[i].recv()
            if joined != "joined":
                raise RuntimeError(joined.get("error", joined))
        cpu0 = _cpu_s(server.proc.pid)
        for i in range(n):
            pipes[i].send("go")
        answers = []
        for i in range(n):
            if not pipes[i].poll(900.0):
                raise RuntimeError(f"client {i} did not finish within 900 s")
            answers.append(pipes[i].recv())
        server_cpu = _cpu_s(server.proc.pid) - cpu0
        report = server.call("report")
    errors = [a["error"] for a in answers if "error" in a]
    if errors:
        raise RuntimeError(errors[0])
    last = [max(a["done"][r] for a in answers) for r in range(rounds)]
    periods = [last[r] - last[r - 1] for r in range(2, rounds)]
    aggregation = [float(r["aggregation_s"]) for r in report["rounds"][1:]]
    round_s = median(periods)
    clients_cpu = sum(a["cpu_s"] for a in answers) / rounds
    server_cpu_round = server_cpu / rounds
    nbytes = sum(a["nbytes"] for a in answers)
    cores = os.cpu_count() or 1
    return {
        "clients": n,
        "block_mb": round(sum(t.numel() * t.element_size() for t in blocks[0].values()) / 1e6, 3),
        "round_s": round(round_s, 4),
        "rounds_per_s": round(1.0 / round_s, 2),
        "server_cpu_ms_per_round": round(server_cpu_round * 1000, 1),
        "server_cpu_ms_per_client_round": round(server_cpu_round * 1000 / n, 2),
        "clients_cpu_ms_per_round": round(clients_cpu * 1000, 1),
        "cpu_bound_round_s": round((server_cpu_round + clients_cpu) / cores, 4),
        "aggregate_s": round(median(aggregation), 5),
        "aggregate_s_max": round(max(aggregation), 5),
        "mb_per_round": round(nbytes / rounds / 1e6, 2),
        "mb_per_s": round(nbytes / rounds / 1e6 / round_s, 1),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="N = 2, 8, 32; 0.74 and 16 MB blocks; 8 rounds")
    form.add_argument("--smoke", action="store_true", help="N = 2, 0.74 MB blocks, 4 rounds (for tests)")
    p.add_argument("--clients", help="comma-separated N (default 2,4,8,16,32)")
    p.add_argument("--block-mb", help=f"comma-separated block sizes, MB ({LAYER_MB}: a quickstart layer; default {LAYER_MB},16)")
    p.add_argument("--rounds", type=int, help="rounds per N (default 20; quick 8; smoke 4)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)  # before any tensor op: the forked clients must not inherit a thread pool
    info = machine()
    form_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    clients = (
        [int(c) for c in args.clients.split(",")]
        if args.clients
        else [2]
        if args.smoke
        else [2, 8, 32]
        if args.quick
        else [2, 4, 8, 16, 32]
    )
    sizes = args.block_mb.split(",") if args.block_mb else [LAYER_MB] if args.smoke else [LAYER_MB, "16"]
    rounds = args.rounds or (4 if args.smoke else 8 if args.quick else 20)
    kinds = {s: layer_blocks() if s == LAYER_MB else synthetic_blocks(float(s)) for s in sizes}
    say(f"scaling: N = {clients} client processes on loopback, {rounds} rounds, blocks of {sizes} MB")
    ctx = mp.get_context("fork")  # no gRPC object exists in this process yet: the children start clean
    pipes, procs = [], []
    for i in range(max(clients)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(i, child, kinds), daemon=True, name=f"bench-client-{i}")
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    results = []
    try:
        for size in sizes:
            for n in clients:
                results.append(run(n, rounds, size, kinds[size], pipes))
                r = results[-1]
                say(
                    f"  {n:>3} clients, {r['block_mb']:g} MB: {r['round_s'] * 1000:8.1f} ms/round ({r['rounds_per_s']:.2f}/s); "
                    f"CPU per round: "
                    f"server {r['server_cpu_ms_per_round']:.0f} ms ({r['server_cpu_ms_per_client_round']:.1f} per client), "
                    f"clients {r['clients_cpu_ms_per_round']:.0f} ms; aggregation {r['aggregate_s'] * 1000:.2f} ms"
                )
    finally:
        for pipe in pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for proc in procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
    result: dict[str, Any] = {
        "benchmark": "scaling",
        "form": form_name,
        "machine": info,
        "block_mb": results[0]["block_mb"],
        "clients_are": "processes (forked, one GrpcTransport each); server in its own process; CPU time of each side measured apart",
        "results": results,
    }
    finish(result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
