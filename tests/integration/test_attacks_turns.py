"""Upload turns that no peer can hoard (issue 20, parts 1 and 3), loopback only.

As :mod:`tests.integration.test_attacks` does (and with its helpers): an
in-process :class:`FederationServer` on 127.0.0.1, honest lightweight
clients (:class:`GrpcTransport`) running a whole federation under a shared
token, and one attack per test with raw gRPC calls by a holder of that
token, each bounded in time by the server's own short settings. Each
asserts that the attack is refused or cut, that the honest federation ends
with the global of the same federation without the attack (bitwise), that
the server's memory stays bounded and that it logs no traceback; a last one
runs several attacks at once.

A second host is 127.0.0.2: the attacker's calls then go through a relay
(:class:`Relay`) whose connections reach the server from that address.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from pl_parablock.client.transport import GrpcTransport
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.server.guards import MIN_MESSAGE_BYTES, turn_wait_s
from pl_parablock.server.service import FederationService
from pl_parablock.wire.channel import SERVICE_NAME
from pl_parablock.wire.framing import encode, header_bytes
from tests.helpers import wait_until
from tests.integration import test_attacks
from tests.integration.test_attacks import (
    BLOCKS,
    LIMIT_S,
    MAX_MESSAGE,
    ROUNDS,
    WEIGHT,
    Attack,
    _base,
    held_open,
    join_as,
    one_line,
    rss_mb,
    run_honest,
    same,
)

# the fixtures of test_attacks: its clean globals, the memory bound around every test, no traceback in the server's log
bounded_memory = test_attacks.bounded_memory
clean = test_attacks.clean
clean_of_three = test_attacks.clean_of_three
no_tracebacks = test_attacks.no_tracebacks

TOKEN = "shared-t0ken"  # one token for every client: its holder may speak as any of them
CREDIT = 4096  # the service's chunk: the one chunk in flight an upload's rate allows


def server_of(clients: int, **kw: Any) -> FederationServer:
    """The federation of :mod:`tests.integration.test_attacks` under a shared token (3 clients: rounds close with 2 of 3).

    The idle cut (``idle_timeout_s``) is long: within a test only the rules
    on turns can free one.
    """
    agg_kw: dict[str, Any] = {"min_clients": 2, "round_timeout_s": 0.3} if clients == 3 else {}
    agg = Aggregator(clients=clients, rounds=ROUNDS, mode="sync", weighting="samples", max_weight=WEIGHT, **agg_kw)
    service = FederationService(agg, token=TOKEN, max_wait_s=kw.pop("max_wait_s", 10.0), chunk_bytes=CREDIT)
    kw.setdefault("max_message_bytes", MAX_MESSAGE)
    kw.setdefault("idle_timeout_s", 30.0)
    return FederationServer(service, **kw)


class Relay:
    """A TCP relay on 127.0.0.1 whose connections reach ``target`` from 127.0.0.2: another host, on loopback."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, name="test-relay", daemon=True)]
        self.stop = threading.Event()
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                near, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            far = socket.socket()
            far.bind(("127.0.0.2", 0))
            far.connect(self.target)
            self.sockets += [near, far]
            for src, dst in ((near, far), (far, near)):
                pump = threading.Thread(target=self._pump, args=(src, dst), name="test-relay-pump", daemon=True)
                pump.start()
                self.threads.append(pump)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(5.0)


class Insider:
    """Client 2 under the shared token: joins with the honest model, then pushes updates whose headers pass every check."""

    def __init__(self, address: str) -> None:
        self.transport = GrpcTransport(address, token=TOKEN, connect_timeout_s=5.0)
        self.attack = Attack(address, TOKEN)
        self.reply = join_as(self.transport, 2, time.monotonic() + LIMIT_S)

    def update(self) -> list[bytes]:
        """Its update of the round now open, as the framing sends it in chunks of the smallest size: header, body, trailer."""
        r = min(int(self.transport.versions(2, 5.0)["next_round"]), ROUNDS - 1)
        block = self.reply["schedule"][r]
        head = {"client_id": 2, "round": r, "block": block, "kind": "value", "base_version": _base(self.reply["schedule"], r)}
        head.update(weight=WEIGHT, loss=1.0)
        return list(encode(head, {n: t + 1.0 for n, t in BLOCKS[block].items()}, chunk_bytes=MIN_MESSAGE_BYTES))

    def push(self, body: Callable[[list[bytes]], Iterator[bytes]]) -> Any:
        return self.attack.stream("Push", body(self.update()), timeout=60.0)

    def close(self) -> None:
        self.attack.close()
        self.transport.close()


def keep(n: int, open_call: Callable[[], Any], stop: threading.Event, made: list[Any]) -> threading.Thread:
    """A thread that keeps ``n`` calls of ``open_call`` open until ``stop``, opening another as soon as one ends."""

    def run() -> None:
        live: list[Any] = []
        while not stop.is_set():
            live = [c for c in live if not c.done()]
            while len(live) < n and not stop.is_set():
                try:
                    call = open_call()
                except Exception:  # the attacker's own helper call was refused or cut: try again
                    stop.wait(0.1)
                    continue
                live.append(call)
                made.append(call)
            stop.wait(0.05)

    thread = threading.Thread(target=run, name="test-attacker", daemon=True)
    thread.start()
    return thread


def codes(calls: list[Any]) -> dict[Any, int]:
    """How the ended calls ended: status code (``None``: answered) -> how many."""
    out: dict[Any, int] = {}
    for c in calls:
        if c.done():
            code = c.exception().code() if c.exception() is not None else None
            out[code] = out.get(code, 0) + 1
    return out


def details(calls: list[Any], code: grpc.StatusCode) -> list[str]:
    return [one_line(c.exception()) for c in calls if c.done() and c.exception() is not None and c.exception().code() == code]


def ended(calls: list[Any], threads: list[threading.Thread]) -> bool:
    for t in threads:
        t.join(LIMIT_S)
    return wait_until(lambda: all(c.done() for c in calls), LIMIT_S)


# ------------------------------------------------------------------------------------------------ 1. hoarding


def test_turns_taken_and_never_used_are_freed(clean, no_tracebacks):
    """Uploads that take a turn and send nothing, and ``Admit`` calls whose turn is never used: freed after body_timeout_s."""
    server = server_of(2, body_timeout_s=1.0)
    address = server.start()
    attack = Attack(address, TOKEN)
    stop = threading.Event()
    made: list[Any] = []
    admits: list[int] = []

    def admit() -> Any:
        admits.append(1)
        return attack.channel.unary_unary(f"/{SERVICE_NAME}/Admit").future(
            header_bytes({"for": "Push"}), timeout=60.0, metadata=attack.metadata
        )

    try:
        threads = [keep(2, lambda: attack.stream("Push", held_open(stop), timeout=60.0), stop, made), keep(2, admit, stop, made)]
        assert wait_until(lambda: server.uploads()[0] == 2, LIMIT_S), "the attacker holds every turn"
        glob = run_honest(address, [0, 1], TOKEN)
        assert same(glob, clean)
        stop.set()
        assert ended(made, threads)
        # the held uploads were cut (CANCELLED), the admits answered with a slot never used
        assert codes(made).get(grpc.StatusCode.CANCELLED, 0) >= 2, codes(made)
        assert len(admits) >= 3, "the turns that Admit reserved lapsed and went to the next"
    finally:
        stop.set()
        attack.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 2. empty messages


def _empty_every(every: float, stop: threading.Event) -> Callable[[list[bytes]], Iterator[bytes]]:
    def body(update: list[bytes]) -> Iterator[bytes]:  # a valid header, then an empty message every `every` seconds
        yield update[0]
        while not stop.wait(every):
            yield b""

    return body


def test_empty_body_messages_are_refused_and_keep_no_turn(clean_of_three, no_tracebacks):
    """A valid header, then an empty message every 0.3 s, on as many uploads as there are turns: refused at the first.

    An empty message adds no bytes yet kept the call from the idle cut, so the
    turns were held until the call's limit (``timeout_s`` + 60 s).
    """
    server = server_of(3)
    address = server.start()
    insider = Insider(address)
    stop = threading.Event()
    made: list[Any] = []
    try:
        thread = keep(3, lambda: insider.push(_empty_every(0.3, stop)), stop, made)  # as many as there are turns
        glob = run_honest(address, [0, 1], TOKEN)
        assert same(glob, clean_of_three)
        stop.set()
        assert ended(made, [thread])
        refused = details(made, grpc.StatusCode.INVALID_ARGUMENT)
        assert refused and all("is empty" in r for r in refused), codes(made)
    finally:
        stop.set()
        insider.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 3. tiny messages


def _tiny_every(every: float, stop: threading.Event) -> Callable[[list[bytes]], Iterator[bytes]]:
    def body(update: list[bytes]) -> Iterator[bytes]:  # a valid header, then one byte every `every` seconds
        yield update[0]
        while not stop.wait(every):
            yield b"\x00"

    return body


def test_tiny_body_messages_are_refused_and_keep_no_turn(clean_of_three, no_tracebacks):
    """A valid header, then one byte every 50 ms: refused at the third message under the floor (1 KiB).

    Each byte was read as a message of the body (a message's work per byte),
    and the upload kept its turn for the two minutes its body took.
    """
    server = server_of(3)
    address = server.start()
    insider = Insider(address)
    stop = threading.Event()
    made: list[Any] = []
    before = rss_mb()
    try:
        thread = keep(1, lambda: insider.push(_tiny_every(0.05, stop)), stop, made)  # 20 B/s: 2 min for its body
        glob = run_honest(address, [0, 1], TOKEN)
        assert same(glob, clean_of_three)
        stop.set()
        assert ended(made, [thread])
        refused = details(made, grpc.StatusCode.INVALID_ARGUMENT)
        assert refused and all(f"fewer than {MIN_MESSAGE_BYTES} bytes" in r for r in refused), codes(made)
        assert rss_mb() - before < 100
    finally:
        stop.set()
        insider.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 4. a body below the rate floor


def _slow(every: float, stop: threading.Event) -> Callable[[list[bytes]], Iterator[bytes]]:
    def body(update: list[bytes]) -> Iterator[bytes]:  # the header, then a chunk of 1 KiB every `every` seconds (no trailer)
        yield update[0]
        for chunk in update[1:-1]:
            if stop.wait(every):
                return
            yield chunk

    return body


def test_a_body_slower_than_the_floor_is_cut(clean_of_three, no_tracebacks):
    """1 KiB every 2 s (0.5 kB/s) against a floor of 20 kB/s: cut once the grace (1 s) is over, long before its body ends."""
    server = server_of(3, min_upload_bps=20_000.0, upload_grace_s=1.0, body_timeout_s=10.0)
    address = server.start()
    insider = Insider(address)
    stop = threading.Event()
    made: list[Any] = []
    try:
        thread = keep(3, lambda: insider.push(_slow(2.0, stop)), stop, made)
        glob = run_honest(address, [0, 1], TOKEN)
        assert same(glob, clean_of_three)
        done = [c for c in made if c.done()]  # before the attacker stops: what the server did to them
        stop.set()
        assert ended(made, [thread])
        # the slow uploads were cut (CANCELLED); none ran to its end (a trailer-less body, answered "corrupt")
        assert codes(done).get(grpc.StatusCode.CANCELLED, 0) >= 3, codes(done)
        statuses = [json.loads(c.result())["status"] for c in done if c.exception() is None]
        assert "corrupt" not in statuses, statuses
    finally:
        stop.set()
        insider.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 5. waiting for a turn


def test_a_call_waiting_for_a_turn_ends_before_the_clients_deadline(clean, no_tracebacks):
    """The clients' deadline is 6 s (``federation.timeout_s``); every turn is held: a waiting call ends by it, saying why."""
    max_wait_s = 6.0
    server = server_of(2, max_wait_s=max_wait_s, body_timeout_s=30.0, min_upload_bps=0.0)  # turns held for the whole test
    assert server.turn_wait_s == turn_wait_s(max_wait_s) < max_wait_s
    address = server.start()
    attack = Attack(address, TOKEN)
    stop = threading.Event()
    try:
        holders = [attack.stream("Push", held_open(stop), timeout=60.0) for _ in range(2)]
        assert wait_until(lambda: server.uploads() == (2, 0), LIMIT_S), server.uploads()
        admit = attack.channel.unary_unary(f"/{SERVICE_NAME}/Admit")
        t0 = time.monotonic()
        waiting = [admit.future(header_bytes({"for": "Push"}), timeout=60.0, metadata=attack.metadata) for _ in range(3)]
        waiting.append(attack.stream("Push", held_open(stop), timeout=60.0))
        # loose: the server's limit is 5 s; before, they lived until timeout_s + 60 s
        assert wait_until(lambda: all(c.done() for c in waiting), max_wait_s + 4.0), "the waiting calls outlive the clients' deadline"
        assert time.monotonic() - t0 >= server.turn_wait_s - 0.5, "and end no sooner than the wait allows"
        reasons = details(waiting, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(reasons) == 4 and all(f"waited {server.turn_wait_s:g} s for a turn to upload" in r for r in reasons), reasons
        stop.set()
        assert wait_until(lambda: all(c.done() for c in holders), LIMIT_S)
        glob = run_honest(address, [0, 1], TOKEN)
        assert same(glob, clean)
    finally:
        stop.set()
        attack.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 6. one host, every turn


def test_one_host_cannot_hold_every_turn_under_a_shared_token(clean, no_tracebacks):
    """Host 127.0.0.2 holds its uploads open (never cut within the test): it gets one turn of 2, the honest host the other.

    Before, a host under a shared token could hold every turn, and the
    others waited until the idle cut or the call's limit.
    """
    server = server_of(2, body_timeout_s=30.0, min_upload_bps=0.0)  # an upload holds its turn for the whole test
    address = server.start()
    relay = Relay(address)
    attack = Attack(relay.address, TOKEN)
    first = GrpcTransport(address, token=TOKEN, connect_timeout_s=5.0)
    stop = threading.Event()
    made: list[Any] = []
    held: list[int] = []

    def watch() -> None:
        while not stop.wait(0.02):
            held.append(server._uploads.reading.get("ipv4:127.0.0.2", 0))

    try:
        join_as(first, 0, time.monotonic() + LIMIT_S)  # the honest host joins first and uploads the initial state
        threads = [keep(4, lambda: attack.stream("Push", held_open(stop), timeout=60.0), stop, made)]
        assert wait_until(lambda: server.uploads()[0] >= 1 and sum(server.uploads()) >= 4, LIMIT_S), server.uploads()
        threads.append(threading.Thread(target=watch, name="test-watch", daemon=True))
        threads[-1].start()
        glob = run_honest(address, [0, 1], TOKEN)
        assert same(glob, clean)
        assert max(held) == 1, "the other host held every turn"
        stop.set()
        assert ended(made, threads)
    finally:
        stop.set()
        first.close()
        attack.close()
        relay.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 7. all at once


def test_soak_several_attacks_at_once(clean_of_three, no_tracebacks):
    """Hoarders on two hosts, empty, tiny and slow bodies, waiting calls, all while the honest federation runs (bounded: 20 s)."""
    server = server_of(3, body_timeout_s=1.0, min_upload_bps=20_000.0, upload_grace_s=1.0, max_wait_s=6.0)
    address = server.start()
    relay = Relay(address)
    insider = Insider(address)
    here, there = Attack(address, TOKEN), Attack(relay.address, TOKEN)
    stop = threading.Event()
    made: list[Any] = []
    before = rss_mb()

    def admit() -> Any:
        return here.channel.unary_unary(f"/{SERVICE_NAME}/Admit").future(
            header_bytes({"for": "Push"}), timeout=60.0, metadata=here.metadata
        )

    try:
        threads = [
            keep(1, lambda: here.stream("Push", held_open(stop), timeout=60.0), stop, made),
            keep(2, admit, stop, made),
            keep(2, lambda: there.stream("Push", held_open(stop), timeout=60.0), stop, made),
            keep(1, lambda: insider.push(_empty_every(0.3, stop)), stop, made),
            keep(1, lambda: insider.push(_tiny_every(0.05, stop)), stop, made),
            keep(1, lambda: insider.push(_slow(2.0, stop)), stop, made),
        ]
        t0 = time.monotonic()
        glob = run_honest(address, [0, 1], TOKEN)
        assert time.monotonic() - t0 < LIMIT_S
        assert same(glob, clean_of_three)
        stop.set()
        assert ended(made, threads)
        seen = codes(made)
        assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) >= 2 and seen.get(grpc.StatusCode.CANCELLED, 0) >= 2, seen
        assert wait_until(lambda: server.active_calls() == 0 and server.uploads() == (0, 0), LIMIT_S)
        assert rss_mb() - before < 100
    finally:
        stop.set()
        insider.close()
        here.close()
        there.close()
        relay.close()
        server.stop()
