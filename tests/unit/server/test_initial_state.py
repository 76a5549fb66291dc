"""The initial state: checked for non-finite values exactly, read into memory, sent from the parameters themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pl_parablock.wire.framing as framing
from pl_parablock.client.inprocess import InProcessTransport
from pl_parablock.client.rounds import ClientRounds
from pl_parablock.client.session import ClientSession
from pl_parablock.server.aggregator import Aggregator, RefusedError
from pl_parablock.server.service import FederationService
from pl_parablock.wire.framing import CorruptStream, Spec, receive_tensors
from tests.unit.server.test_aggregator import PART, STATE, fingerprint


def announced(clients: int = 1) -> Aggregator:
    agg = Aggregator(clients=clients, rounds=2)
    assert agg.join(0, fingerprint(), 5)["need_state"]
    return agg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_initial_state_is_refused(bad):
    agg = announced()
    state = {n: t.clone() for n, t in STATE.items()}
    state["l1.w"][1, 0] = bad
    with pytest.raises(RefusedError, match="'l1.w' holds NaN or infinite"):
        agg.set_initial_state(0, state)
    agg.set_initial_state(0, STATE)  # the state is still awaited: the honest one is taken
    assert torch.equal(agg.block_value(1)[1]["l1.w"], STATE["l1.w"])


def test_a_finite_initial_state_whose_sum_overflows_is_taken(monkeypatch):
    agg = announced()
    state = {n: t.clone() for n, t in STATE.items()}
    state["l0.w"].fill_(3e38)  # finite values, an infinite float32 sum: checked value by value
    agg.set_initial_state(0, state)
    assert torch.equal(agg.block_value(0)[1]["l0.w"], state["l0.w"])


def test_a_finite_initial_state_is_checked_without_a_pass_per_value(monkeypatch):
    agg = announced()

    def per_value(*args, **kwargs):
        raise AssertionError("a finite sum decides; no pass per value")

    monkeypatch.setattr(torch, "isfinite", per_value)
    agg.set_initial_state(0, STATE)
    assert agg.versions() == [-1, -1]


def test_the_initial_state_is_read_into_memory_without_a_spool_file(monkeypatch):
    agg = announced(clients=2)
    transport = InProcessTransport(FederationService(agg))

    def no_file(*args, **kwargs):
        raise AssertionError("the initial state is kept in memory: no spool file")

    monkeypatch.setattr(framing.tempfile, "TemporaryFile", no_file)
    sent = {n: t.clone() for n, t in STATE.items()}
    transport.upload_state(0, sent, 5)
    assert not agg.join(1, fingerprint(), 5)["need_state"]
    for b, block in enumerate(PART.blocks):
        value = agg.block_value(b)[1]
        for n in block.params:
            assert torch.equal(value[n], STATE[n]) and value[n].data_ptr() != sent[n].data_ptr()


def test_the_client_uploads_its_parameters_without_copying_them(monkeypatch):
    agg = Aggregator(clients=1, rounds=2)
    transport = InProcessTransport(FederationService(agg))
    params = {n: nn.Parameter(t.clone()) for n, t in STATE.items()}
    blocks = [{n: params[n] for n in b.params} for b in PART.blocks]
    uploaded: dict[str, int] = {}
    upload = transport.upload_state

    def recording(client_id, tensors, timeout):
        uploaded.update({n: t.data_ptr() for n, t in tensors.items()})
        return upload(client_id, tensors, timeout)

    monkeypatch.setattr(transport, "upload_state", recording)
    session = ClientSession(transport, 0, timeout_s=5)
    rounds = ClientRounds(0, "parablock", blocks, session=session, weighting="samples", shard_size=1, keep_optimizer_state=False)
    try:
        rounds.join(fingerprint())
    finally:
        session.close(cancel_pending=True)
    assert uploaded == {n: p.data_ptr() for n, p in params.items()}
    assert torch.equal(agg.block_value(0)[1]["l0.w"], STATE["l0.w"])


def test_memory_is_taken_as_the_bytes_arrive_not_as_declared():
    huge = [Spec("w", torch.float32, (1 << 40,), 1 << 42)]  # 4 TiB declared, nothing sent
    with pytest.raises(CorruptStream, match="cut short"):
        receive_tensors(huge, iter([]), what="initial state")
    empty_ends = [Spec("a", torch.float32, (0,), 0), Spec("b", torch.int64, (2,), 16), Spec("c", torch.float16, (0, 3), 0)]
    body = list(framing.encode({}, {"a": torch.zeros(0), "b": torch.tensor([5, -7]), "c": torch.zeros(0, 3, dtype=torch.float16)}))
    out = receive_tensors(empty_ends, iter(body[1:]), what="test")
    assert [(n, t.dtype, tuple(t.shape)) for n, t in out.items()] == [
        ("a", torch.float32, (0,)),
        ("b", torch.int64, (2,)),
        ("c", torch.float16, (0, 3)),
    ]
    assert out["b"].tolist() == [5, -7]
