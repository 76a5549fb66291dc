"""Streaming aggregation: the server checks and sums each chunk of an update as it arrives.

An update refused (or cut, corrupt, superseded, overtaken by its round's
close) after some of its chunks were summed must leave the sums bitwise as if
it had never arrived. These tests push through the real service and wire
framing with tiny chunks, so that the bad part comes after good parts were
summed, and compare the global with the honest run's bit for bit.

Wrong variants tried (each made tests here fail, then was restored):

* ``Aggregator._rollback`` returning at once (no rollback): the NaN, corrupt,
  cut, late-norm, superseded and close-while-streaming cases;
* ``_close`` not rolling back the updates still streaming: the close case;
* ``aggregation_s`` timing only the close (``rnd.work_s`` left out): the
  aggregation_s case.

Rolling back by subtracting the added chunks would fail the NaN case too:
the rogue's good chunks are ``3e38``, so ``(honest + 7 * 3e38) - 7 * 3e38``
is ``0``, not ``honest`` (asserted below).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from pl_parablock.core.blocks import Block, Partition
from pl_parablock.server import intake as intake_module
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.service import FederationService
from pl_parablock.wire.framing import CorruptStream, check_specs, dtype_name, encode, parse_header, receive_pieces

STATE = {"w": torch.linspace(-1.0, 1.0, 40).reshape(8, 5), "b": torch.zeros(6)}
PART = Partition((Block(0, "layers.0", ("w", "b")),))
CHUNK = 16  # bytes: four float32 values a chunk, so an update arrives in 12 chunks
WEIGHTS = {0: 3.0, 1: 5.0, 2: 7.0}


def honest(client: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + client)
    return {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in STATE.items()}


def federation(clients: int = 3, **kw: Any) -> tuple[Aggregator, FederationService]:
    agg = Aggregator(clients=clients, rounds=1, **kw)
    fp = {
        "mode": "parablock",
        "partition": PART.to_dict(),
        "tensors": {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": t.numel() * 4} for n, t in STATE.items()},
        "hash": "h",
    }
    assert agg.join(0, fp, 5)["need_state"]
    agg.set_initial_state(0, STATE)
    for c in range(1, clients):
        agg.join(c, fp, 5)
    return agg, FederationService(agg)


def messages(client: int, tensors: dict[str, torch.Tensor]) -> list[bytes]:
    header = {"client_id": client, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": WEIGHTS[client]}
    return list(encode(header, tensors, chunk_bytes=CHUNK))


def push(svc: FederationService, stream: list[bytes] | Iterator[bytes]) -> dict[str, Any]:
    return parse_header(svc.Push(iter(stream)))


def midway(stream: list[bytes], at: int, action: Callable[[], None]) -> Iterator[bytes]:
    """The stream, with ``action`` run after its first ``at`` messages went (the header and ``at - 1`` chunks summed)."""
    yield from stream[:at]
    action()
    yield from stream[at:]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # bitwise, signed zeros included


def assert_bitwise(agg: Aggregator, expected: dict[str, torch.Tensor]) -> None:
    got = agg.global_state()
    for n, t in expected.items():
        assert torch.equal(bits(got[n]), bits(t)), n


@pytest.fixture(scope="module")
def honest_global() -> dict[str, torch.Tensor]:
    agg, svc = federation()
    for c in (0, 1, 2):
        assert push(svc, messages(c, honest(c)))["status"] == "accepted"
    assert agg.wait_round(0, 5.0)
    out = agg.global_state()
    assert not torch.equal(out["w"], STATE["w"])
    return out


def rogue_stream(kind: str) -> list[bytes]:
    """Client 2's bad update: huge but finite chunks first, the fault at the end."""
    bad = {n: torch.full_like(t, 3e38) for n, t in STATE.items()}
    if kind == "nan-last":
        bad["b"][-1] = float("nan")
    stream = messages(2, bad)
    if kind == "corrupt":
        stream[-2] = bytes([stream[-2][0] ^ 1]) + stream[-2][1:]  # the last chunk: caught by the trailer's checksum
    return stream


@pytest.mark.parametrize("kind", ["nan-last", "corrupt", "cut"])
def test_an_update_failing_after_summed_chunks_leaves_the_sums_bitwise_untouched(kind, honest_global):
    # subtracting the rogue's chunks back could not restore an honest sum next to them
    h = torch.tensor(0.25, dtype=torch.float64)
    assert (h + 7 * 3e38) - 7 * 3e38 != h
    agg, svc = federation()
    assert push(svc, messages(0, honest(0)))["status"] == "accepted"
    stream = rogue_stream(kind)
    # half of the rogue's chunks are summed, then client 1's whole update (after them, on the same pieces), then the rest
    interleaved = midway(stream, len(stream) // 2, lambda: push(svc, messages(1, honest(1))))
    if kind == "cut":

        def cut() -> Iterator[bytes]:
            yield from list(interleaved)[:-3]
            raise ConnectionResetError("the client went away")

        with pytest.raises(ConnectionResetError):
            push(svc, cut())
    else:
        reply = push(svc, interleaved)
        assert not reply["accepted"]
        assert reply["status"] == ("corrupt" if kind == "corrupt" else "rejected")
    assert agg.report()["rounds"] == []  # still open: the rogue did not count
    assert push(svc, messages(2, honest(2)))["status"] == "accepted"
    assert agg.wait_round(0, 5.0)
    assert_bitwise(agg, honest_global)


def test_the_last_update_of_a_round_is_not_spooled_and_can_still_be_rolled_back(honest_global):
    agg, svc = federation()
    for c in (0, 1):
        assert push(svc, messages(c, honest(c)))["status"] == "accepted"
    reply = push(svc, rogue_stream("nan-last"))  # the last expected update: nobody needs its bytes replayed
    assert reply["status"] == "rejected" and "NaN" in reply["reason"]
    assert push(svc, messages(2, honest(2)))["status"] == "accepted"
    assert agg.wait_round(0, 5.0)
    assert_bitwise(agg, honest_global)


def test_a_norm_bound_exceeded_in_the_last_chunk_is_refused_and_rolled_back(honest_global):
    agg, svc = federation(max_update_norm=5.0)
    assert push(svc, messages(0, honest(0)))["status"] == "accepted"
    bad = honest(2)
    bad["b"][-1] += 100.0  # every chunk before the last keeps the norm small
    stream = messages(2, bad)
    reply = push(svc, midway(stream, len(stream) // 2, lambda: push(svc, messages(1, honest(1)))))
    assert reply["status"] == "rejected" and "exceeds the bound" in reply["reason"], reply
    assert push(svc, messages(2, honest(2)))["status"] == "accepted"
    assert agg.wait_round(0, 5.0)
    assert_bitwise(agg, honest_global)
    rejected = agg.report()["rounds"][0]["rejections"]
    assert [r["client"] for r in rejected] == [2]


def test_a_retry_while_the_first_try_streams_replaces_it(honest_global):
    agg, svc = federation()
    assert push(svc, messages(0, honest(0)))["status"] == "accepted"
    stale = messages(1, {n: torch.full_like(t, 9.0) for n, t in STATE.items()})
    reply = push(svc, midway(stale, 5, lambda: push(svc, messages(1, honest(1)))))
    assert reply["status"] == "superseded" and not reply["accepted"]
    assert push(svc, messages(2, honest(2)))["status"] == "accepted"
    assert agg.wait_round(0, 5.0)
    assert_bitwise(agg, honest_global)
    assert agg.report()["rounds"][0]["clients"] == [0, 1, 2]


def test_a_round_closing_while_an_update_streams_leaves_it_out():
    agg, svc = federation(clients=2, min_clients=1, round_timeout_s=0.0)
    mine = honest(0)
    assert push(svc, messages(0, mine))["status"] == "accepted"
    stream = messages(1, honest(1))
    reply = push(svc, midway(stream, 6, lambda: agg.wait_round(0, 0.5)))  # the quorum is there: the round closes
    assert reply["status"] == "late", reply
    rnd = agg.report()["rounds"][0]
    assert rnd["clients"] == [0] and rnd["late"] == 1
    assert_bitwise(agg, mine)  # the mean of one update is the update


def test_aggregation_s_counts_the_work_on_each_update_as_it_arrives(monkeypatch):
    real = intake_module._all_finite
    calls = []

    def slow(t: torch.Tensor) -> bool:
        calls.append(1)
        import time

        time.sleep(0.005)
        return real(t)

    monkeypatch.setattr(intake_module, "_all_finite", slow)
    agg, svc = federation(clients=1)
    assert push(svc, messages(0, honest(0)))["status"] == "accepted"
    assert len(calls) == 12  # a check per chunk, as it arrived
    assert agg.report()["rounds"][0]["aggregation_s"] >= 12 * 0.005


@pytest.mark.parametrize("chunk", [1, 3, 6, 64, 1 << 20])
def test_receive_pieces_hands_on_every_element_once_within_piece_bounds(chunk):
    g = torch.Generator().manual_seed(0)
    src = {
        "a": torch.randn(33, 17, generator=g),
        "half": torch.randn(101, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "f16": torch.randn(7, 3, generator=g).to(torch.float16),
        "d": torch.randn(13, generator=g, dtype=torch.float64),
    }
    stream = list(encode({}, src, chunk_bytes=chunk))
    specs = check_specs(parse_header(stream[0])["tensors"], None)
    out = {s.name: torch.full((s.nbytes // s.dtype.itemsize,), float("nan"), dtype=s.dtype) for s in specs}
    spooled = bytearray()

    def consume(i: int, start: int, values: torch.Tensor) -> None:
        assert values.dtype == specs[i].dtype
        assert start // 10 == (start + values.numel() - 1) // 10, "a piece crosses a piece boundary"
        target = out[specs[i].name][start : start + values.numel()]
        assert bool(target.isnan().all()), "an element was handed on twice"
        target.copy_(values)

    receive_pieces(specs, iter(stream[1:]), consume, piece_elems=10, what="test", on_chunk=spooled.extend)
    for n, t in src.items():
        assert torch.equal(out[n].reshape(t.shape), t), n
    assert bytes(spooled) == b"".join(stream[1:-1])
    stream[1] = bytes([stream[1][0] ^ 1]) + stream[1][1:]
    with pytest.raises(CorruptStream, match="checksum"):  # after every piece was handed on: the consumer must undo
        receive_pieces(specs, iter(stream[1:]), lambda *a: None, piece_elems=10, what="test")


def test_a_version_pulled_again_is_sent_without_computing_its_checksum_again(monkeypatch):
    import xxhash

    from pl_parablock.wire import framing as wire
    from pl_parablock.wire.framing import decode, header_bytes

    agg, svc = federation(clients=1)
    assert push(svc, messages(0, honest(0)))["status"] == "accepted"
    hashed = []
    real = xxhash.xxh3_64

    class Counting:
        def __init__(self) -> None:
            self.h = real()

        def update(self, data: Any) -> None:
            hashed.append(len(data))
            self.h.update(data)

        def intdigest(self) -> int:
            return int(self.h.intdigest())

    monkeypatch.setattr(wire.xxhash, "xxh3_64", Counting)
    pulls = [list(svc.Pull(header_bytes({"client_id": 0, "round": 0, "wait_s": 1.0}))) for _ in range(3)]
    assert sum(hashed) == sum(t.numel() * 4 for t in STATE.values())  # by the first pull only
    for stream in pulls:
        assert stream[1:] == pulls[0][1:]
        _, got = decode(stream)
        assert_bitwise(agg, got)
