"""A federation server in its own process, for the benchmarks (see ``_common.ServerProcess``).

Prints ``{"address", "echo_port", "rss_kb", "hwm_kb"}`` once it listens, then
answers one JSON line per command read from stdin:

* ``mem``: current and peak RSS of this process (KiB);
* ``reset``: reset the peak RSS to the current RSS, then as ``mem``;
* ``report``: the aggregator's report (rounds with their ``aggregation_s``);
* ``quit``: stop serving and exit.

With ``--echo`` it also runs a raw TCP echo server (8-byte length, then the
bytes; the same bytes come back), the ceiling the gRPC transport is compared
against, and a raw gRPC service (``bench.Raw``: ``Sink`` swallows a stream of
byte chunks, ``Source`` streams ``total`` bytes in ``chunk``-byte messages)
that shows what gRPC itself costs without the federation's framing.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
from collections.abc import Iterator

import grpc
from _common import proc_status_kb, reset_peak_rss

from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer, tune_server_memory
from pl_parablock.server.service import FederationService


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _echo_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    with conn:
        while True:
            head = bytearray(8)
            if not _recv_exact(conn, memoryview(head)):
                return
            (n,) = struct.unpack("!Q", head)
            if n == 0:
                return
            if len(buf) != n:
                buf = bytearray(n)
            if not _recv_exact(conn, memoryview(buf)):
                return
            conn.sendall(buf)


def _echo_server() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)

    def serve() -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_echo_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True, name="echo").start()
    return int(sock.getsockname()[1])


def _raw_grpc_server() -> tuple[grpc.Server, int]:
    from concurrent import futures

    from pl_parablock.wire.channel import SERVER_OPTIONS

    def sink(messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        n = 0
        for m in messages:
            n += len(m)
        return struct.pack("!Q", n)

    def source(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        total, chunk = struct.unpack("!QQ", request)
        block = bytes(chunk)
        sent = 0
        while sent < total:
            piece = block if total - sent >= chunk else block[: total - sent]
            sent += len(piece)
            yield piece

    handlers = {
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
        "Source": grpc.unary_stream_rpc_method_handler(source),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _mem() -> dict[str, int]:
    kb = proc_status_kb("VmRSS", "VmHWM")
    return {"rss_kb": kb["VmRSS"], "hwm_kb": kb["VmHWM"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--mode", default="parablock")
    p.add_argument("--chunk-kb", type=int, default=1024)
    p.add_argument("--echo", action="store_true")
    p.add_argument("--min-clients", type=int)
    p.add_argument("--round-timeout-s", type=float)
    p.add_argument("--max-uploads", type=int, help="federation.max_uploads (default: 4, fewer with fewer clients)")
    p.add_argument("--no-data-plane", action="store_true", help="federation.data_port: null (blocks over gRPC only)")
    p.add_argument("--receive-window-kb", type=int, help="federation.receive_window_kb (default: gRPC's adaptive window)")
    args = p.parse_args()
    agg = Aggregator(
        clients=args.clients, rounds=args.rounds, mode=args.mode, min_clients=args.min_clients, round_timeout_s=args.round_timeout_s
    )
    tune_server_memory()  # as the federation's own server processes do
    server = FederationServer(
        FederationService(agg, chunk_bytes=args.chunk_kb * 1024),
        receive_window_kb=args.receive_window_kb,
        max_uploads=args.max_uploads,
        data_port=None if args.no_data_plane else 0,
    )
    address = server.start()
    raw = _raw_grpc_server() if args.echo else None
    hello = {"address": address, "echo_port": _echo_server() if args.echo else None, "raw_grpc_port": raw[1] if raw else None, **_mem()}
    print(json.dumps(hello), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "mem":
                out: dict[str, object] = _mem()
            elif cmd == "reset":
                out = {"reset": reset_peak_rss(), **_mem()}
            elif cmd == "report":
                rep = agg.report()
                rep.pop("client_reports", None)
                out = rep
            elif cmd == "quit":
                print(json.dumps({"bye": True}), flush=True)
                break
            else:
                out = {"error": f"unknown command {cmd!r}"}
            print(json.dumps(out, default=str), flush=True)
    finally:
        server.stop(grace=0.5)
        if raw is not None:
            raw[0].stop(0.5).wait(5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
