"""A federation server against an untrusted peer on the same network (issue 14), loopback only.

Each test runs one attack of the issue with raw gRPC calls (and, for the
trickling stream, raw HTTP/2 bytes) against an in-process
:class:`FederationServer` on 127.0.0.1, while honest lightweight clients
(:class:`GrpcTransport`, synthetic blocks) run a whole federation. Each
asserts that the attack is refused at once or cut within its deadline, that
the server's memory stays bounded (loose: RSS growth), that the honest
federation completes, and that its global model is bitwise the one of the
same federation without the attack.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from pl_parablock.client.transport import GrpcTransport
from pl_parablock.errors import FederationError, TransportError
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.server.service import FederationService
from pl_parablock.wire.channel import SERVICE_NAME, token_metadata
from pl_parablock.wire.framing import MAX_LARGE_HEADER_BYTES, header_bytes
from tests.helpers import wait_until

ROUNDS = 3
WEIGHT = 8.0  # what each honest client sends; the federations bound weights at 8 (samples: 2 steps x 4 samples)
BLOCKS = [{"b0.w": torch.linspace(-1.0, 1.0, 600).reshape(20, 30)}, {"b1.w": torch.linspace(0.0, 2.0, 256)}]
STATE = {n: t for b in BLOCKS for n, t in b.items()}
FINGERPRINT = {
    "mode": "sync",
    "partition": [{"name": f"block{i}", "params": list(b)} for i, b in enumerate(BLOCKS)],
    "tensors": {n: {"dtype": "float32", "shape": list(t.shape), "nbytes": t.numel() * 4} for n, t in STATE.items()},
    "hash": "honest",
}
TOKENS = {0: "token-of-0", 1: "token-of-1", 2: "token-of-2"}
MAX_MESSAGE = MAX_LARGE_HEADER_BYTES + (64 << 10)  # as pl_parablock.fit sets the server (chunks of at most 4 MiB)
LIMIT_S = 20.0  # no honest federation here takes more than a few seconds


def rss_mb() -> float:
    """Resident memory of this process (the server's), after handing freed heap memory back to the OS."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the bound is loose enough without
        pass
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# ------------------------------------------------------------------------------------------------ honest side


def _retrying(fn: Callable[[], Any], deadline: float) -> Any:
    """What the real clients do: retry a lost or refused-for-now call with a short backoff until the deadline."""
    while True:
        try:
            return fn()
        except TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def join_as(transport: GrpcTransport, cid: int, deadline: float) -> dict[str, Any]:
    """Join with the honest model, and send its initial state when asked (the first client to join)."""
    reply = _retrying(lambda: transport.join(cid, FINGERPRINT, 5.0), deadline)
    if reply["need_state"]:
        transport.upload_state(cid, STATE, 5.0)
    return reply  # type: ignore[no-any-return]


def honest_client(address: str, cid: int, token: str | None, out: dict[int, Any], leave_after_s: float = 0.0) -> None:
    """Join, (upload the initial state,) push each round's block and pull its aggregate, leave: a client of a sync federation."""
    transport = GrpcTransport(address, token=token, connect_timeout_s=5.0)
    deadline = time.monotonic() + LIMIT_S
    try:
        reply = join_as(transport, cid, deadline)
        local = {n: t.clone() for n, t in STATE.items()}
        for r in range(reply["next_round"], ROUNDS):
            block = reply["schedule"][r]
            names = list(BLOCKS[block])
            value = {n: local[n] + 0.01 * (cid + 1) * (r + 1) for n in names}
            base = _base(reply["schedule"], r)
            header = {"client_id": cid, "round": r, "block": block, "kind": "value", "base_version": base, "weight": WEIGHT, "loss": 1.0}
            pushed = _retrying(lambda h=header, v=value: transport.push(h, v, 5.0), deadline)
            assert pushed.accepted, pushed
            pulled = _retrying(lambda r=r: transport.pull(cid, r, 5.0), deadline)
            local.update(pulled.tensors)
        time.sleep(leave_after_s)  # e.g. a long final evaluation
        _retrying(lambda: transport.leave(cid, {"final": {"loss": 1.0}}, 5.0), deadline)
        out[cid] = local
    except BaseException as exc:
        out[cid] = exc
    finally:
        transport.close()


def _base(schedule: list[int], r: int) -> int:
    """The version of round r's block that a client holding every earlier aggregate starts from."""
    return max((q for q in range(r) if schedule[q] == schedule[r]), default=-1)


def send_state(address: str) -> None:
    """Client 0's initial state, after an attack that joined as client 0 (with the honest model) and sent none."""
    transport = GrpcTransport(address, connect_timeout_s=5.0)
    try:
        transport.upload_state(0, STATE, 5.0)
    finally:
        transport.close()


def run_honest(
    address: str, clients: list[int], tokens: dict[int, str] | str | None = None, leave_after_s: dict[int, float] | None = None
) -> dict[str, torch.Tensor]:
    out: dict[int, Any] = {}
    threads = [
        threading.Thread(
            target=honest_client,
            args=(address, c, tokens.get(c) if isinstance(tokens, dict) else tokens, out, (leave_after_s or {}).get(c, 0.0)),
            name=f"test-honest-{c}",
        )
        for c in clients
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LIMIT_S + 10)
    assert not any(t.is_alive() for t in threads), "an honest client did not finish"
    for c in clients:
        if isinstance(out[c], BaseException):
            raise out[c]
    first = out[clients[0]]
    for c in clients[1:]:
        assert all(torch.equal(first[n], out[c][n]) for n in first), "the honest clients disagree on the global"
    return first


def make_server(clients: int = 2, *, token: Any = None, **kw: Any) -> FederationServer:
    agg_kw = {k: kw.pop(k) for k in ("min_clients", "round_timeout_s", "initial_state_wait_s") if k in kw}
    agg = Aggregator(clients=clients, rounds=ROUNDS, mode="sync", weighting="samples", max_weight=WEIGHT, **agg_kw)
    service = FederationService(agg, token=token, max_wait_s=kw.pop("max_wait_s", 10.0))
    kw.setdefault("max_message_bytes", MAX_MESSAGE)
    return FederationServer(service, **kw)


def clean_global(clients: int = 2, honest: tuple[int, ...] = (0, 1), **kw: Any) -> dict[str, torch.Tensor]:
    server = make_server(clients, **kw)
    address = server.start()
    try:
        return run_honest(address, list(honest), kw.get("token"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def clean() -> dict[str, torch.Tensor]:
    """The global of two honest clients, no attack."""
    return clean_global()


@pytest.fixture(scope="module")
def clean_of_three() -> dict[str, torch.Tensor]:
    """The global of clients 0 and 1 of three, client 2 silent (rounds close at their timeout with 2 of 3)."""
    return clean_global(3, min_clients=2, round_timeout_s=0.3)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


class Attack:
    """Raw gRPC calls on the federation's methods, with any bytes and metadata."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.metadata = token_metadata(token)

    def unary(self, method: str, request: bytes, timeout: float = 5.0) -> bytes:
        return self.channel.unary_unary(f"/{SERVICE_NAME}/{method}")(request, timeout=timeout, metadata=self.metadata)  # type: ignore[no-any-return]

    def stream(self, method: str, messages: Iterator[bytes], timeout: float = 5.0) -> Any:
        return self.channel.stream_unary(f"/{SERVICE_NAME}/{method}").future(messages, timeout=timeout, metadata=self.metadata)

    def refused(self, method: str, request: bytes, timeout: float = 5.0) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.unary(method, request, timeout)
        return info.value  # type: ignore[return-value]

    def close(self) -> None:
        self.channel.close()


def one_line(err: grpc.RpcError) -> str:
    details = err.details() or ""  # type: ignore[attr-defined]
    assert "\n" not in details and "Traceback" not in details and "Error(" not in details, details
    return details


def held_open(stop: threading.Event, first: bytes | None = None) -> Iterator[bytes]:
    """A request stream that sends ``first`` (or nothing) and then nothing until ``stop``."""
    if first is not None:
        yield first
    stop.wait(30)


@pytest.fixture(autouse=True)
def bounded_memory() -> Iterator[None]:
    """The server's process grows by less than 100 MB over any attack (loose: the attacks send up to 20 MB per call)."""
    before = rss_mb()
    yield
    grown = rss_mb() - before
    assert grown < 100, f"the process grew by {grown:.0f} MB"


@pytest.fixture
def no_tracebacks(caplog):
    """The server logs no traceback for anything a peer sends."""
    caplog.set_level(logging.WARNING, logger="pl_parablock")
    yield caplog
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


# ------------------------------------------------------------------------------------------------ 1. weights


def test_an_outsized_weight_is_refused_and_cannot_set_the_mean(clean_of_three, no_tracebacks):
    server = make_server(3, token=TOKENS, min_clients=2, round_timeout_s=0.3)
    address = server.start()
    attacker = GrpcTransport(address, token=TOKENS[2], connect_timeout_s=5.0)
    before = rss_mb()
    reasons = []

    def attack() -> None:  # client 2 holds its own token and pushes finite values with absurd weights
        join_as(attacker, 2, time.monotonic() + LIMIT_S)
        for weight in (1e300, 1e30, 9.0):
            head = {"client_id": 2, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": weight}
            pushed = attacker.push(head, {"b0.w": torch.full((20, 30), 1e3)}, 5.0)
            assert not pushed.accepted
            reasons.append(pushed.reason)

    try:
        thread = threading.Thread(target=attack, name="test-attacker")
        thread.start()
        thread.join(LIMIT_S)  # first, so that round 0 is still open (it needs clients 0 and 1)
        glob = run_honest(address, [0, 1], TOKENS)
        assert len(reasons) == 3 and all("exceeds the bound 8" in r for r in reasons), reasons
        assert same(glob, clean_of_three), "the refused weights changed the global"
        assert all(torch.isfinite(t).all() for t in server.service.aggregator.global_state().values())
        report = server.service.aggregator.report()
        assert [r["clients"] for r in report["rounds"]] == [[0, 1]] * ROUNDS
        assert sum(r["rejected"] for r in report["rounds"]) == 3
        assert rss_mb() - before < 100
    finally:
        attacker.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 2. join


def test_a_malformed_or_foreign_first_join_does_not_lock_the_federation_out(clean, no_tracebacks):
    server = make_server(2, initial_state_wait_s=0.5)
    address = server.start()
    attack = Attack(address)
    agg = server.service.aggregator
    try:
        malformed = [
            {**FINGERPRINT, "partition": [{"name": "block0", "params": [1, 2]}]},
            {**FINGERPRINT, "partition": "all"},
            {**FINGERPRINT, "tensors": {"b0.w": {"dtype": "float32", "shape": [20, 30], "nbytes": 7}}},
            {**FINGERPRINT, "tensors": {**FINGERPRINT["tensors"], "b1.w": {"dtype": "qint9", "shape": [256], "nbytes": 1024}}},
            {**FINGERPRINT, "partition": [*FINGERPRINT["partition"], {"name": "again", "params": ["b0.w"]}]},
            {**FINGERPRINT, "hash": ["not", "a", "string"]},
            {**FINGERPRINT, "mode": "parablock"},  # well-formed, another mode than the federation's
        ]
        for fp in malformed:
            err = attack.refused("Join", header_bytes({"client_id": 0, "fingerprint": fp, "timeout_s": 1}))
            assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), err
            one_line(err)
            assert agg.partition is None, "a refused join changed nothing"
        # well-formed, from the wrong party, and no initial state ever: it expires, the honest clients take over
        foreign = {**FINGERPRINT, "hash": "someone else's model"}
        attack.unary("Join", header_bytes({"client_id": 1, "fingerprint": foreign, "timeout_s": 3600}))
        glob = run_honest(address, [0, 1])
        assert same(glob, clean)
    finally:
        attack.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 3. half-open and slow streams


def test_half_open_streams_without_a_token_hold_no_handler(clean, no_tracebacks):
    server = make_server(2, token="t0ken", max_workers=24)
    address = server.start()
    attack = Attack(address)  # no token
    stop = threading.Event()
    try:
        calls = [attack.stream("Push", held_open(stop)) for _ in range(30)]
        # refused, not held: each ends UNAUTHENTICATED while its stream is still open, and no handler is left
        codes = [c.exception(LIMIT_S).code() for c in calls]  # type: ignore[union-attr]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 30
        assert server.active_calls() == 0
        more = [attack.stream("Push", held_open(stop)) for _ in range(30)]  # during the honest federation too
        glob = run_honest(address, [0, 1], "t0ken")
        assert all(c.exception(LIMIT_S).code() == grpc.StatusCode.UNAUTHENTICATED for c in more)  # type: ignore[union-attr]
        assert same(glob, clean)
    finally:
        stop.set()
        attack.close()
        server.stop()


def test_half_open_streams_of_a_token_holder_are_limited_and_cut(clean_of_three, no_tracebacks):
    server = make_server(3, token=TOKENS, min_clients=2, round_timeout_s=0.3, idle_timeout_s=0.5, max_calls_per_peer=4)
    address = server.start()
    attack = Attack(address, TOKENS[2])  # client 2's own token: an insider, or a stolen token
    stop = threading.Event()
    before = rss_mb()
    try:
        calls = [attack.stream("Push", held_open(stop)) for _ in range(30)]
        assert wait_until(lambda: sum(c.done() for c in calls) >= 26, LIMIT_S)
        exhausted = [c for c in calls if c.done() and c.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED]  # type: ignore[union-attr]
        assert len(exhausted) >= 26, "beyond its 4 calls at once, a peer is refused at once, not queued"
        glob = run_honest(address, [0, 1], TOKENS)  # while the 4 admitted ones are held open
        # cut at idle_timeout_s (0.5 s); call_timeout_s (max_wait_s + 60 s) is well beyond LIMIT_S
        assert wait_until(lambda: all(c.done() for c in calls), LIMIT_S), "idle calls are cut after federation.idle_timeout_s"
        cut = [c for c in calls if c.exception().code() == grpc.StatusCode.CANCELLED]  # type: ignore[union-attr]
        assert 1 <= len(cut) <= 4
        assert server.active_calls() == 0
        assert same(glob, clean_of_three)
        assert rss_mb() - before < 100
    finally:
        stop.set()
        attack.close()
        server.stop()


def test_calls_beyond_the_servers_total_are_refused_at_once_not_queued(clean, no_tracebacks):
    server = make_server(2, max_workers=4, max_calls_per_peer=100, idle_timeout_s=0.5)
    address = server.start()
    attack = Attack(address)  # no token needed: this server has none
    stop = threading.Event()
    try:
        calls = [attack.stream("Push", held_open(stop)) for _ in range(12)]
        assert wait_until(lambda: sum(c.done() for c in calls) >= 8, LIMIT_S)
        # refused, not queued: a queued call would be served, held open and cut (CANCELLED), never RESOURCE_EXHAUSTED
        refused = [c for c in calls if c.done() and c.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED]  # type: ignore[union-attr]
        assert len(refused) >= 8
        glob = run_honest(address, [0, 1])  # served once the held calls are cut (idle), retrying meanwhile
        assert wait_until(lambda: all(c.done() for c in calls), LIMIT_S)
        assert same(glob, clean)
    finally:
        stop.set()
        attack.close()
        server.stop()


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    def string(s: str) -> bytes:
        raw = s.encode()
        if len(raw) < 127:
            return bytes([len(raw)]) + raw
        n, out = len(raw) - 127, bytearray([127])
        while n >= 128:
            out.append(n % 128 + 128)
            n //= 128
        return bytes([*out, n]) + raw

    return b"\x00" + string(name) + string(value)  # literal header field without indexing, new name


def _read_frame(sock: socket.socket) -> tuple[int, int]:
    head = b""
    while len(head) < 9:
        head += sock.recv(9 - len(head))
    length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
    left = length
    while left:
        left -= len(sock.recv(left))
    return kind, flags


def test_a_stream_trickling_bytes_is_cut_when_no_message_completes(no_tracebacks):
    """One byte at a time (faster here than 1 byte per second, so the test is short): no message ever completes."""
    server = make_server(3, token=TOKENS, idle_timeout_s=0.5)
    address = server.start()
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(0x4, 0, 0, b""))
            while _read_frame(sock) != (0x4, 0):  # the server's SETTINGS: acknowledge them
                pass
            sock.sendall(_h2_frame(0x4, 0x1, 0, b""))
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/{SERVICE_NAME}/Push"),
                (":authority", address),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("authorization", f"Bearer {TOKENS[2]}"),
            ]
            sock.sendall(_h2_frame(0x1, 0x4, 1, b"".join(_hpack_literal(n, v) for n, v in headers)))
            assert wait_until(lambda: server.active_calls() == 1, LIMIT_S), "the call is admitted (it holds its token)"
            message = b"\x00" + struct.pack(">I", 1000)  # a gRPC message of 1000 bytes, sent a byte at a time
            # a byte every 0.1 s for up to 20 s: 200 bytes, so the message never completes; the call must be cut
            # meanwhile, long before call_timeout_s (max_wait_s + 60 s)
            for i in range(200):
                sock.sendall(_h2_frame(0x0, 0, 1, message[i : i + 1] if i < 5 else b"{"))
                if server.active_calls() == 0:
                    break
                time.sleep(0.1)
            assert server.active_calls() == 0, "the trickling call is cut"
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ 4. abandoned and NaN joins


def test_abandoned_joins_end_with_their_callers_and_a_nan_timeout_is_refused(clean, no_tracebacks):
    server = make_server(2, max_wait_s=3600.0)
    address = server.start()
    attack = Attack(address)
    try:
        for raw in (b'"timeout_s":NaN', b'"timeout_s":1e400', b'"timeout_s":-1', b'"timeout_s":"soon"'):
            request = header_bytes({"client_id": 1, "fingerprint": FINGERPRINT})[:-1] + b"," + raw + b"}"
            err = attack.refused("Join", request)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, raw
            one_line(err)
        # client 0 announces the model; 16 joins of client 1 wait for its state with timeout_s 3600, then cancel
        attack.unary("Join", header_bytes({"client_id": 0, "fingerprint": FINGERPRINT, "timeout_s": 60}))
        join = attack.channel.unary_unary(f"/{SERVICE_NAME}/Join")
        waiting = [join.future(header_bytes({"client_id": 1, "fingerprint": FINGERPRINT, "timeout_s": 3600})) for _ in range(16)]
        assert wait_until(lambda: server.active_calls() >= 8, LIMIT_S)
        for call in waiting:
            call.cancel()
        assert wait_until(lambda: server.active_calls() == 0, LIMIT_S), "a cancelled join holds no handler"
        send_state(address)
        glob = run_honest(address, [0, 1])
        assert same(glob, clean)
    finally:
        attack.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 5. leave


def test_leave_with_huge_reports_under_any_id_keeps_nothing(clean, no_tracebacks):
    server = make_server(2)
    address = server.start()
    attack = Attack(address)
    before = rss_mb()
    try:
        huge = header_bytes({"client_id": 0, "report": {"rounds": "x" * (10 << 20)}})  # beyond the server's message limit
        big = header_bytes({"client_id": 0, "report": {"rounds": "x" * (MAX_LARGE_HEADER_BYTES + 10)}})  # beyond its header limit
        medium = {"rounds": ["x" * 1000] * 1000}  # 1 MB: under the size limit
        for _ in range(5):
            assert attack.refused("Leave", huge).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            err = attack.refused("Leave", big)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than" in one_line(err)
            for cid in (0, 1, 7, 10**12):
                err = attack.refused("Leave", header_bytes({"client_id": cid, "report": medium}))
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "has not joined" in one_line(err)
        assert server.service.aggregator.report()["client_reports"] == {}
        glob = run_honest(address, [0, 1])
        assert same(glob, clean)
        reports = server.service.aggregator.report()["client_reports"]
        assert set(reports) == {"0", "1"} and reports["0"] == {"final": {"loss": 1.0}}
        assert rss_mb() - before < 100
    finally:
        attack.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 6. upload state


def test_an_initial_state_before_join_or_beyond_the_fingerprint_is_refused_unread(clean, no_tracebacks):
    server = make_server(2)
    address = server.start()
    attack = Attack(address)
    stop = threading.Event()
    huge = {"client_id": 0, "tensors": [{"name": "b0.w", "dtype": "float32", "shape": [25 << 30], "nbytes": 100 << 30}]}
    huge["nbytes"] = 100 << 30
    try:
        call = attack.stream("UploadState", held_open(stop, header_bytes(huge)))
        err = call.exception(3.0)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "before joining" in one_line(err)
        attack.unary("Join", header_bytes({"client_id": 0, "fingerprint": FINGERPRINT, "timeout_s": 60}))
        for cid, what in ((1, grpc.StatusCode.FAILED_PRECONDITION), (0, grpc.StatusCode.INVALID_ARGUMENT)):
            call = attack.stream("UploadState", held_open(stop, header_bytes({**huge, "client_id": cid})))
            err = call.exception(3.0)
            assert err.code() == what, err
            one_line(err)
        assert server.active_calls() == 0, "no refused upload is read"
        send_state(address)
        glob = run_honest(address, [0, 1])
        assert same(glob, clean)
    finally:
        stop.set()
        attack.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 7. identity


def test_a_client_token_speaks_only_for_its_client_and_only_for_open_rounds(clean_of_three, no_tracebacks):
    server = make_server(3, token=TOKENS, min_clients=2, round_timeout_s=0.3)
    address = server.start()
    insider = GrpcTransport(address, token=TOKENS[2], connect_timeout_s=5.0)
    outcome: dict[str, Any] = {}

    def attack() -> None:
        join_as(insider, 2, time.monotonic() + LIMIT_S)
        for victim in (0, 1):
            head = {"client_id": victim, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": WEIGHT}
            try:
                insider.push(head, {"b0.w": torch.zeros(20, 30)}, 5.0)
            except FederationError as exc:
                outcome[f"as {victim}"] = str(exc)
        head = {"client_id": 2, "round": 2, "block": 0, "kind": "value", "base_version": -1, "weight": WEIGHT}
        outcome["future"] = insider.push(head, {"b0.w": torch.zeros(20, 30)}, 5.0).reason

    try:
        thread = threading.Thread(target=attack, name="test-attacker")
        thread.start()
        thread.join(LIMIT_S)
        glob = run_honest(address, [0, 1], TOKENS)
        assert all("does not allow speaking as client" in outcome[f"as {v}"] for v in (0, 1)), outcome
        assert "is not open" in outcome["future"]
        assert same(glob, clean_of_three)
        with pytest.raises(grpc.RpcError) as info:  # and a guessed token is no token at all
            Attack(address, "token-of-3").unary("Versions", header_bytes({"client_id": 0}))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        insider.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 8. headers


def test_enormous_deep_or_out_of_range_headers_get_one_line(clean, no_tracebacks):
    server = make_server(2)
    address = server.start()
    attack = Attack(address)
    cases = {
        "4 MB": header_bytes({"client_id": 0, "fingerprint": FINGERPRINT, "pad": "x" * MAX_LARGE_HEADER_BYTES}),
        "deep": b'{"client_id":0,"fingerprint":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        "40 deep": b'{"client_id":0,"fingerprint":' + b"[" * 40 + b"]" * 40 + b"}",
        "1e400": b'{"client_id":0,"fingerprint":{},"timeout_s":1e400}',
        "huge int": b'{"client_id":' + b"9" * 5000 + b"}",
        "not JSON": b"\xff\xfe garbage",
        "not an object": b"[1, 2, 3]",
    }
    enormous = header_bytes({"client_id": 0, "fingerprint": FINGERPRINT, "pad": "x" * (20 << 20)})

    def attack_once() -> None:
        assert attack.refused("Join", enormous).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own limit: never read
        for name, request in cases.items():
            for method in ("Join", "Versions", "Leave"):
                err = attack.refused(method, request)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, method, err)
                one_line(err)
        for request in (b'{"client_id":0,"round":1e400}', b'{"client_id":"0"}', cases["4 MB"]):
            err = attack.stream("Push", iter([request])).exception(5.0)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            one_line(err)
        pull = attack.channel.unary_stream(f"/{SERVICE_NAME}/Pull")
        with pytest.raises(grpc.RpcError) as info:
            list(pull(b'{"client_id":0,"round":0,"wait_s":NaN}', timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    try:
        attack_once()
        before = rss_mb()
        for _ in range(3):
            attack_once()
        # an extra 3 MB key in the first join's fingerprint is not kept
        padded = {**FINGERPRINT, "extra": "x" * (3 << 20)}
        attack.unary("Join", header_bytes({"client_id": 0, "fingerprint": padded, "timeout_s": 60}))
        del padded
        kept = server.service.aggregator._admission.fingerprint
        assert kept is not None and set(kept) == {"mode", "partition", "tensors", "hash"}
        assert len(json.dumps(kept)) < 10_000
        assert rss_mb() - before < 100
        send_state(address)
        glob = run_honest(address, [0, 1])
        assert same(glob, clean)
    finally:
        attack.close()
        server.stop()


# ------------------------------------------------------------------------------------------------ 9. not an attack: a late Leave


def test_the_server_waits_federation_timeout_s_for_every_leave(clean, monkeypatch, tmp_path, no_tracebacks):
    from pl_parablock import fit
    from pl_parablock.recipe.load import load_recipe

    recipe = load_recipe(None, ["federation.timeout_s=4", f"output_dir={tmp_path}"])
    assert fit.leave_grace_s(recipe) == 4.0, "as long as a network wait may take, not a fixed 30 s"
    seen: dict[str, float] = {}

    def wait_finished(self: Aggregator, timeout: float, grace_s: float = 30.0, on_wait: Any = None) -> bool:
        seen["grace_s"] = grace_s
        return True

    with monkeypatch.context() as m:  # the server role waits with that grace
        m.setattr(Aggregator, "wait_finished", wait_finished)
        m.setattr(fit, "_finish", lambda *args: 0)
        m.setattr(fit, "tune_server_memory", lambda: False)
        assert fit._serve(recipe, "127.0.0.1:0") == 0 and seen["grace_s"] == 4.0

    server = make_server(2)
    address = server.start()
    agg = server.service.aggregator
    finished: dict[str, Any] = {}

    def wait() -> None:
        finished["ok"] = agg.wait_finished(LIMIT_S, grace_s=fit.leave_grace_s(recipe))
        finished["left"] = set(agg.report()["client_reports"])  # who had left when the wait ended

    try:
        waiter = threading.Thread(target=wait, name="test-server-wait")
        waiter.start()
        glob = run_honest(address, [0, 1], leave_after_s={0: 1.0})  # client 0's final evaluation takes a while
        waiter.join(LIMIT_S)
        assert finished["ok"] and finished["left"] == {"0", "1"}, "the wait ended only after client 0's late Leave"
        report = agg.report()
        assert report["dropped"] == [] and set(report["client_reports"]) == {"0", "1"}
        assert same(glob, clean)
    finally:
        server.stop()
