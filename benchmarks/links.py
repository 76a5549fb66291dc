"""Real links: one upload's rate over a delaying, rate-limited path, gRPC against a raw socket.

    sudo python benchmarks/links.py [--quick | --smoke] [--rate-mbit 1000] [--rtts 10,50,100] [--block-mb 64]
                                    [--windows adaptive,1024] [--max-uploads K]

Needs root: it builds the path on this machine out of two network
namespaces joined by a veth pair, each end rate-limited with ``tc qdisc ...
tbf`` to ``--rate-mbit``, and a userspace relay in the client's namespace
that holds every byte for the one-way delay (RTT / 2) in each direction
before it forwards it (the kernel here has no netem). The relay ends TCP on
both sides, so what it adds is the propagation delay: every byte in flight
for RTT / 2 each way, as many bytes in flight as the sender's flow control
lets through. The namespaces, the veth pair and every process it starts are
removed when it ends, also on error.

For each server window setting (``--windows``: ``adaptive`` is gRPC's BDP
probing, the default since it replaced the fixed 1024 KiB window; a number
is a fixed window in KiB, the old default ``1024``) and each RTT, a fresh
federation server (``FederationServer`` with that setting) runs in the
server's namespace and one client (``GrpcTransport``) in the client's. The
client moves one block of ``--block-mb``:

* ``raw_up`` / ``raw_down``: the same bytes over a plain TCP socket through
  the same relay and the same tbf (the physical ideal of this path: rate,
  delay and TCP, no HTTP/2);
* ``grpc_sink_up``: the same bytes in 1 MiB messages through gRPC to a sink
  that only counts them, on a server with the federation server's channel
  options (flow control and gRPC alone, none of the federation's work on
  the bytes; a fresh connection with one tiny call before), then
  ``grpc_sink_warm_up`` the same again on that connection;
* ``state_up``: ``upload_state`` of the block on a fresh connection (cold:
  flow control starts from its initial window);
* ``push_up``: ``push`` of the block as the round's update (warm: the same
  connection, as every later round of a client);
* ``pull_down``: ``pull`` of the round's aggregate (the client's own,
  adaptive, receive window);
* ``grpc_push_up`` / ``grpc_pull_down``: the next round's push and pull by
  the same client with blocks over gRPC alone (a transport with
  ``data_plane=False``). The others move blocks over the server's data
  plane, which the relay also carries, at the port the server announces.

Each figure is goodput in Mbit/s (bytes x 8 over the call's wall time, one
round trip for the request or reply included, as for the raw socket), and
stated against the link's rate (``vs_link``) and the raw socket over the
same path (``vs_raw``). ``server_peak_mb`` is how much the server's peak RSS
rose during the push (its flow-control buffers and the block). The last
output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SUBNET = "10.199.{}.{}"
IO_BYTES = 256 << 10
NOT_ROOT = "benchmarks/links.py needs root (it creates network namespaces, a veth pair and tc qdiscs): run it with sudo"


# ---------------------------------------------------------------------------- the delaying relay


def _relay_pipe(src: socket.socket, dst: socket.socket, delay_s: float, done: threading.Event) -> None:
    """Forward ``src`` to ``dst``, each piece no sooner than ``delay_s`` after it was read."""
    queue: deque[tuple[float, bytes]] = deque()
    cond = threading.Condition()
    closed = [False]

    def reader() -> None:
        try:
            while True:
                data = src.recv(IO_BYTES)
                with cond:
                    if not data:
                        closed[0] = True
                        cond.notify()
                        return
                    queue.append((time.monotonic() + delay_s, data))
                    cond.notify()
        except OSError:
            with cond:
                closed[0] = True
                cond.notify()

    threading.Thread(target=reader, daemon=True, name="relay-reader").start()
    try:
        while True:
            with cond:
                while not queue and not closed[0]:
                    cond.wait(1.0)
                if not queue:
                    break
                due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        done.set()


def _relay_connection(conn: socket.socket, target: tuple[str, int], delay_s: float) -> None:
    try:
        up = socket.create_connection(target, timeout=10.0)
    except OSError:
        conn.close()
        return
    up.settimeout(None)
    for s in (conn, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a, b = threading.Event(), threading.Event()
    threading.Thread(target=_relay_pipe, args=(conn, up, delay_s, a), daemon=True).start()
    threading.Thread(target=_relay_pipe, args=(up, conn, delay_s, b), daemon=True).start()
    a.wait()
    b.wait()
    conn.close()
    up.close()


def relay_main(targets: list[str], delay_ms: float) -> int:
    """Listen on 127.0.0.1 once per target; print the ports (JSON), relay until stdin closes.

    A target is ``HOST:PORT``, or ``HOST:PORT@LOCAL`` to listen on that local port.
    """
    ports = []
    for t in targets:
        t, _, local = t.partition("@")
        host, _, port = t.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", int(local or 0)))
        sock.listen(16)
        ports.append(sock.getsockname()[1])

        def serve(sock: socket.socket = sock, target: tuple[str, int] = (host, int(port))) -> None:
            while True:
                conn, _ = sock.accept()
                threading.Thread(target=_relay_connection, args=(conn, target, delay_ms / 1000.0), daemon=True).start()

        threading.Thread(target=serve, daemon=True, name="relay-accept").start()
    print(json.dumps({"ports": ports}), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin (or dies)
    return 0


# ---------------------------------------------------------------------------- the server side


def _recv_exact(conn: socket.socket, n: int, buf: bytearray | None = None) -> int:
    view = memoryview(buf if buf is not None else bytearray(min(n, IO_BYTES)))
    got = 0
    while got < n:
        k = conn.recv_into(view[: min(len(view), n - got)])
        if k == 0:
            break
        got += k
    return got


def _raw_connection(conn: socket.socket) -> None:
    """``U`` + length: swallow that many bytes, then answer 8 bytes; ``D`` + length: send that many bytes."""
    with conn:
        head = bytearray(9)
        if _recv_exact(conn, 9, head) < 9:
            return
        kind, n = head[:1], struct.unpack("!Q", head[1:])[0]
        if kind == b"U":
            got = _recv_exact(conn, n)
            conn.sendall(struct.pack("!Q", got))
        else:
            piece = bytes(IO_BYTES)
            sent = 0
            while sent < n:
                k = min(IO_BYTES, n - sent)
                conn.sendall(piece[:k])
                sent += k


def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _sink_server(host: str, options: list[tuple[str, Any]]) -> tuple[Any, int]:
    """A gRPC service with the federation server's channel options whose ``Sink`` only counts the bytes it receives."""
    from concurrent import futures

    import grpc

    def sink(messages: Any, context: Any) -> bytes:
        return struct.pack("!Q", sum(len(m) for m in messages))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    handler = grpc.method_handlers_generic_handler("bench.Links", {"Sink": grpc.stream_unary_rpc_method_handler(sink)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port


def server_main(host: str, server_kwargs: dict[str, Any]) -> int:
    sys.path.insert(0, REPO)
    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.grpc_server import FederationServer, tune_server_memory
    from pl_parablock.server.service import FederationService

    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.bind((host, 0))
    raw.listen(8)

    def serve_raw() -> None:
        while True:
            conn, _ = raw.accept()
            threading.Thread(target=_raw_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=serve_raw, daemon=True, name="raw-sink").start()
    tune_server_memory()
    agg = Aggregator(clients=1, rounds=3, mode="sync")
    server = FederationServer(FederationService(agg), listen=f"{host}:0", **server_kwargs)
    address = server.start()
    sink = _sink_server(host, server.options)
    ports = {
        "grpc_port": int(address.rpartition(":")[2]),
        "raw_port": raw.getsockname()[1],
        "sink_port": sink[1],
        "data_port": server.data_port,
    }
    print(json.dumps(ports), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "reset":
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")
            if cmd == "quit":
                break
            print(json.dumps({"rss_kb": _status_kb("VmRSS"), "hwm_kb": _status_kb("VmHWM")}), flush=True)
    finally:
        sink[0].stop(0.5).wait(5.0)
        server.stop(grace=0.5)
    return 0


# ---------------------------------------------------------------------------- the client side


def _raw(port: int, kind: bytes, n: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=60.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(kind + struct.pack("!Q", n))
        if kind == b"U":
            piece = bytes(IO_BYTES)
            sent = 0
            while sent < n:
                k = min(IO_BYTES, n - sent)
                s.sendall(piece[:k])
                sent += k
            if _recv_exact(s, 8) != 8:
                raise RuntimeError("the raw sink did not answer")
        elif _recv_exact(s, n) != n:
            raise RuntimeError("the raw source sent less than asked")
        return time.perf_counter() - t0


def _grpc_sink(port: int, n: int) -> tuple[float, float]:
    """Stream ``n`` bytes in 1 MiB messages to the sink (the server's options, none of the federation's work)."""
    import grpc

    from pl_parablock.wire.channel import CLIENT_OPTIONS

    piece = bytes(1 << 20)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=60.0)
        call = channel.stream_unary("/bench.Links/Sink")

        def messages() -> Any:
            sent = 0
            while sent < n:
                k = min(len(piece), n - sent)
                yield piece if k == len(piece) else piece[:k]
                sent += k

        call(iter([b"x"]), timeout=60.0)  # a first, tiny call: the connection is up, its window not grown
        elapsed = []
        for _ in range(2):  # cold, then warm (the window as the first transfer left it)
            t0 = time.perf_counter()
            got = struct.unpack("!Q", call(messages(), timeout=600.0))[0]
            elapsed.append(time.perf_counter() - t0)
            if got != n:
                raise RuntimeError(f"the sink got {got} of {n} bytes")
    return elapsed[0], elapsed[1]


def client_main(grpc_port: int, raw_port: int, sink_port: int, block_bytes: int) -> int:
    """Measure raw and gRPC transfers through the relay; ``mem`` lines on stdout ask the orchestrator for server memory."""
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)
    import torch
    from _common import block_fingerprint

    from pl_parablock.client.transport import GrpcTransport

    out: dict[str, float] = {}
    out["raw_up_s"] = _raw(raw_port, b"U", block_bytes)
    out["raw_down_s"] = _raw(raw_port, b"D", block_bytes)
    out["grpc_sink_up_s"], out["grpc_sink_warm_up_s"] = _grpc_sink(sink_port, block_bytes)
    block = {"w": torch.full((block_bytes // 4,), 0.5)}
    tr = GrpcTransport(f"127.0.0.1:{grpc_port}", chunk_bytes=1 << 20)
    try:
        fp = block_fingerprint([block], mode="sync")
        tr.join(0, fp, 60.0)
        t0 = time.perf_counter()
        tr.upload_state(0, block, 600.0)
        out["state_up_s"] = time.perf_counter() - t0
        print("reset", flush=True)
        sys.stdin.readline()
        header = {"client_id": 0, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": 1.0}
        t0 = time.perf_counter()
        pushed = tr.push(header, block, 600.0)
        out["push_up_s"] = time.perf_counter() - t0
        if not pushed.accepted:
            raise RuntimeError(f"push refused: {pushed.reason}")
        print("mem", flush=True)
        out["server_after_push"] = json.loads(sys.stdin.readline())["hwm_kb"]
        t0 = time.perf_counter()
        version = tr.pull(0, 0, 600.0).version
        out["pull_down_s"] = time.perf_counter() - t0
        # the same client with blocks over gRPC (as against a server with federation.data_port: null)
        only = GrpcTransport(f"127.0.0.1:{grpc_port}", chunk_bytes=1 << 20, data_plane=False)
        try:
            header = {**header, "round": 1, "base_version": version}
            t0 = time.perf_counter()
            if not only.push(header, block, 600.0).accepted:
                raise RuntimeError("push over gRPC refused")
            out["grpc_push_up_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            only.pull(0, 1, 600.0)
            out["grpc_pull_down_s"] = time.perf_counter() - t0
        finally:
            only.close()
    finally:
        tr.close()
    print(json.dumps({"result": out}), flush=True)
    return 0


# ---------------------------------------------------------------------------- the orchestrator


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class Path:
    """Two namespaces joined by a rate-limited veth pair; removed on exit."""

    def __init__(self, rate_mbit: float) -> None:
        tag = f"{os.getpid() % 100000}"
        self.client_ns, self.server_ns = f"plpb{tag}c", f"plpb{tag}s"
        self.veth = (f"plpb{tag}a", f"plpb{tag}b")
        self.octet = os.getpid() % 250 + 1
        self.server_ip = SUBNET.format(self.octet, 2)
        self.client_ip = SUBNET.format(self.octet, 1)
        self.rate_mbit = rate_mbit

    def __enter__(self) -> Path:
        try:
            for ns in (self.client_ns, self.server_ns):
                _sh("ip", "netns", "add", ns)
            a, b = self.veth
            _sh("ip", "link", "add", a, "netns", self.client_ns, "type", "veth", "peer", "name", b, "netns", self.server_ns)
            burst = max(64 << 10, int(self.rate_mbit * 1e6 / 8 / 100))  # 10 ms of the rate, at least 64 KiB
            for ns, dev, ip in ((self.client_ns, a, self.client_ip), (self.server_ns, b, self.server_ip)):
                _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            for ns, dev in ((self.client_ns, a), (self.server_ns, b)):
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", f"{self.rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms")  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.client_ns, self.server_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # takes its veth end with it

    def spawn(self, ns: str, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
        cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), *args]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """One line of a child's output, or an error when it exits or stays silent past the timeout."""
    assert proc.stdout is not None
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    t.start()
    t.join(timeout_s)
    if not box or not box[0]:
        raise RuntimeError(f"a benchmark child ({' '.join(proc.args[5:7])}) exited or said nothing for {timeout_s:g} s")  # type: ignore[index]
    return box[0]


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def measure(path: Path, rtt_ms: float, block_bytes: int, server_kwargs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    procs: list[subprocess.Popen[str]] = []
    try:
        server = path.spawn(path.server_ns, "--serve", path.server_ip, "--server-kwargs", json.dumps(server_kwargs))
        procs.append(server)
        ports = json.loads(_line(server, 60.0))
        targets = [f"{path.server_ip}:{ports[k]}" for k in ("grpc_port", "raw_port", "sink_port")]
        if ports.get("data_port"):  # the client reaches the data plane at the announced port on the relay's host
            targets.append(f"{path.server_ip}:{ports['data_port']}@{ports['data_port']}")
        relay = path.spawn(path.client_ns, "--relay", *targets, "--delay-ms", str(rtt_ms / 2))
        procs.append(relay)
        relayed = [str(x) for x in json.loads(_line(relay, 30.0))["ports"]][:3]
        client = path.spawn(path.client_ns, "--client", *relayed, "--block-bytes", str(block_bytes))
        procs.append(client)
        assert client.stdin is not None and server.stdin is not None
        while True:
            msg = _line(client, timeout_s).strip()
            if msg in ("reset", "mem"):
                server.stdin.write(msg + "\n")
                server.stdin.flush()
                mem = json.loads(_line(server, 30.0))
                if msg == "reset":
                    base_kb = mem["rss_kb"]
                client.stdin.write(json.dumps(mem) + "\n")
                client.stdin.flush()
                continue
            times = json.loads(msg)["result"]
            break
    finally:
        for p in reversed(procs):
            _stop(p)
    rate = path.rate_mbit
    bits = block_bytes * 8 / 1e6
    out: dict[str, Any] = {"rtt_ms": rtt_ms}
    names = ("raw_up", "raw_down", "grpc_sink_up", "grpc_sink_warm_up", "state_up", "push_up", "pull_down")
    names += ("grpc_push_up", "grpc_pull_down")
    for name in names:
        out[f"{name}_mbit_s"] = round(bits / times[f"{name}_s"], 1)
    for name, raw in (
        ("grpc_sink_up", "raw_up"),
        ("grpc_sink_warm_up", "raw_up"),
        ("state_up", "raw_up"),
        ("push_up", "raw_up"),
        ("pull_down", "raw_down"),
        ("grpc_push_up", "raw_up"),
        ("grpc_pull_down", "raw_down"),
    ):
        out[f"{name}_vs_link"] = round(out[f"{name}_mbit_s"] / rate, 3)
        out[f"{name}_vs_raw"] = round(out[f"{name}_mbit_s"] / out[f"{raw}_mbit_s"], 3)
    out["raw_up_vs_link"] = round(out["raw_up_mbit_s"] / rate, 3)
    out["server_peak_mb"] = round((times["server_after_push"] - base_kb) / 1024, 1)
    return out


def _window_kwargs(spec: str, max_uploads: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"receive_window_kb": None if spec == "adaptive" else int(spec)}
    if max_uploads is not None:
        kwargs["max_uploads"] = max_uploads
    return kwargs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--relay"]:
        i = argv.index("--delay-ms")
        return relay_main(argv[1:i], float(argv[i + 1]))
    if argv[:1] == ["--serve"]:
        return server_main(argv[1], json.loads(argv[argv.index("--server-kwargs") + 1]))
    if argv[:1] == ["--client"]:
        return client_main(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[argv.index("--block-bytes") + 1]))
    sys.path[:0] = [HERE, REPO]  # this checkout's package, whatever is installed
    from _common import finish, machine, say

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--quick", action="store_true", help="RTT 10, 50, 100 ms, 32 MB, the adaptive and the old 1024 KiB window")
    form.add_argument("--smoke", action="store_true", help="one RTT (10 ms) at 100 Mbit/s, a 2 MB block (for tests)")
    p.add_argument("--rate-mbit", type=float, help="the link's rate both ways, Mbit/s (default 1000; smoke 100)")
    p.add_argument("--rtts", help="comma-separated round trip times, ms (default 10,50,100; smoke 10)")
    p.add_argument("--block-mb", type=float, help="the block moved each way, MB (default 64; quick 32; smoke 2)")
    p.add_argument("--windows", help="server window settings: adaptive and/or KiB (default adaptive,1024; smoke adaptive)")
    p.add_argument("--max-uploads", type=int, help="the server's federation.max_uploads (default: the server's own)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="longest one measurement may take (default 300)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print(NOT_ROOT, file=sys.stderr)
        return 2
    started = time.perf_counter()
    form_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    rate = args.rate_mbit or (100.0 if args.smoke else 1000.0)
    rtts = [float(x) for x in args.rtts.split(",")] if args.rtts else [10.0] if args.smoke else [10.0, 50.0, 100.0]
    block_mb = args.block_mb or (2.0 if args.smoke else 32.0 if args.quick else 64.0)
    windows = args.windows.split(",") if args.windows else ["adaptive"] if args.smoke else ["adaptive", "1024"]
    block_bytes = int(block_mb * 1e6) // 4 * 4
    say(f"links: {rate:g} Mbit/s each way, RTT {rtts} ms, a {block_mb:g} MB block, server windows {windows}")
    results = []
    with Path(rate) as path:
        for w in windows:
            for rtt in rtts:
                r = {"window": w, **measure(path, rtt, block_bytes, _window_kwargs(w, args.max_uploads), args.timeout_s)}
                results.append(r)
                say(
                    f"  window {w:>8}, RTT {rtt:5g} ms: raw {r['raw_up_mbit_s']:7.1f} Mbit/s; gRPC sink {r['grpc_sink_up_mbit_s']:7.1f} "
                    f"(warm {r['grpc_sink_warm_up_mbit_s']:7.1f}); "
                    f"push {r['push_up_mbit_s']:7.1f} "
                    f"({r['push_up_vs_link']:.2f} of the link, {r['push_up_vs_raw']:.2f} of raw), cold upload "
                    f"{r['state_up_mbit_s']:7.1f}, pull {r['pull_down_mbit_s']:7.1f}; over gRPC alone push "
                    f"{r['grpc_push_up_mbit_s']:7.1f}, pull {r['grpc_pull_down_mbit_s']:7.1f}; server peak +{r['server_peak_mb']:.0f} MB"
                )
    result: dict[str, Any] = {
        "benchmark": "links",
        "form": form_name,
        "machine": machine(),
        "link": {
            "rate_mbit": rate,
            "path": "two network namespaces, a veth pair with tc tbf at the rate on both ends, "
            "a userspace relay holding every byte RTT/2 each way (no netem in this kernel)",
        },
        "block_mb": block_mb,
        "results": results,
    }
    finish(result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
