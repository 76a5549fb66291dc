from __future__ import annotations

import threading
import time

import pytest
import torch

from pl_parablock.blocks import Block, Partition
from pl_parablock.federation import Aggregator, FederationService, InProcessTransport, RefusedError
from pl_parablock.federation.wire import dtype_name

STATE = {"l0.w": torch.ones(4, 3), "l0.b": torch.zeros(3), "l1.w": torch.full((2, 2), 2.0)}
PART = Partition((Block(0, "layers.0", ("l0.w", "l0.b")), Block(1, "layers.1", ("l1.w",))))


def fingerprint(mode="parablock", h="abc", state=STATE):
    return {
        "mode": mode,
        "partition": PART.to_dict(),
        "tensors": {
            n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": t.numel() * t.element_size()} for n, t in state.items()
        },
        "hash": h,
    }


def joined(clients=2, rounds=4, **kw) -> Aggregator:
    agg = Aggregator(clients=clients, rounds=rounds, **kw)
    reply = agg.join(0, fingerprint(), 5)
    assert reply["need_state"] and reply["schedule"] == [0, 1, 0, 1][:rounds]
    agg.set_initial_state(0, STATE)
    for c in range(1, clients):
        assert not agg.join(c, fingerprint(), 5)["need_state"]
    return agg


def status(reply):
    return reply["status"]


def update(client, rnd, block, value, kind="value", base=-1, weight=1.0, names=None):
    names = names or PART.blocks[block].params
    header = {"client_id": client, "round": rnd, "block": block, "kind": kind, "base_version": base, "weight": weight}
    return header, {n: torch.full_like(STATE[n], value) for n in names}


def test_round_closes_with_the_weighted_mean_and_bumps_the_version():
    agg = joined()
    assert status(agg.submit(*update(0, 0, 0, 1.0, weight=1.0))) == "accepted"
    assert not agg.wait_round(0, 0.05)
    assert status(agg.submit(*update(1, 0, 0, 4.0, weight=2.0))) == "accepted"
    assert agg.wait_round(0, 1.0)
    version, block = agg.block_value(0)
    assert version == 0
    assert torch.allclose(block["l0.w"], torch.full((4, 3), 3.0))
    assert agg.versions() == [0, -1]
    rec = agg.report()["rounds"][0]
    assert (rec["arrived"], rec["expected"], rec["rejected"], rec["late"]) == (2, 2, 0, 0)


def test_mismatching_model_is_refused_with_the_reason():
    agg = joined(clients=3)
    with pytest.raises(RefusedError, match="initial weights differ"):
        agg.join(2, fingerprint(h="other"), 1)
    with pytest.raises(RefusedError, match="mode=sync"):
        agg.join(2, fingerprint(mode="sync"), 1)
    other = dict(STATE, **{"l1.w": torch.zeros(3, 3)})
    with pytest.raises(RefusedError, match="l1.w"):
        agg.join(2, fingerprint(state=other), 1)
    with pytest.raises(RefusedError, match="outside 0..2"):
        agg.join(5, fingerprint(), 1)


def test_a_second_client_waits_for_the_initial_state():
    agg = Aggregator(clients=2, rounds=2)
    agg.join(0, fingerprint(), 5)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", agg.join(1, fingerprint(), 5)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    agg.set_initial_state(0, STATE)
    t.join(5)
    assert result["r"]["need_state"] is False


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda h, t: (dict(h, block=1), t), "trains block 0"),
        (lambda h, t: (dict(h, round=9), t), "outside"),
        (lambda h, t: (h, {**t, "l0.w": torch.ones(3, 4)}), "shape"),
        (lambda h, t: (h, {**t, "l0.w": torch.full((4, 3), float("nan"))}), "NaN"),
        (lambda h, t: (h, {"l0.w": t["l0.w"]}), "names"),
        (lambda h, t: (h, {**t, "l0.w": t["l0.w"].double()}), "dtype"),
        (lambda h, t: (dict(h, weight=-1), t), "weight"),
        (lambda h, t: (dict(h, client_id=7), t), "not joined"),
        (lambda h, t: (dict(h, base_version=3), t), "stale base"),
    ],
)
def test_bad_updates_are_rejected_and_the_round_goes_on(change, reason):
    agg = joined()
    reply = agg.submit(*change(*update(0, 0, 0, 1.0)))
    assert not reply["accepted"] and reason in reply["reason"]
    assert status(agg.submit(*update(0, 0, 0, 1.0))) == "accepted"
    assert status(agg.submit(*update(1, 0, 0, 1.0))) == "accepted"
    assert agg.wait_round(0, 1.0)
    assert torch.equal(agg.block_value(0)[1]["l0.w"], torch.ones(4, 3))
    report = agg.report()
    assert sum(r["rejected"] for r in report["rounds"]) + len(report["rejected_outside_rounds"]) == 1


def test_repeated_update_is_not_applied_twice():
    agg = joined()
    assert status(agg.submit(*update(0, 0, 0, 1.0))) == "accepted"
    assert status(agg.submit(*update(0, 0, 0, 100.0))) == "duplicate"
    assert status(agg.submit(*update(1, 0, 0, 3.0))) == "accepted"
    assert torch.equal(agg.block_value(0)[1]["l0.w"], torch.full((4, 3), 2.0))
    assert status(agg.submit(*update(1, 0, 0, 3.0))) == "duplicate"
    assert torch.equal(agg.block_value(0)[1]["l0.w"], torch.full((4, 3), 2.0))


def test_round_timeout_closes_with_a_quorum():
    agg = joined(clients=3, min_clients=2, round_timeout_s=0.2)
    agg.submit(*update(0, 0, 0, 1.0))
    assert not agg.wait_round(0, 0.3), "one client is below the quorum"
    agg.submit(*update(1, 0, 0, 3.0))
    assert agg.wait_round(0, 2.0)
    rec = agg.report()["rounds"][0]
    assert rec["arrived"] == 2 and "timeout" in rec["close_reason"]
    reply = agg.submit(*update(2, 0, 0, 9.0))
    assert not reply["accepted"] and reply["status"] == "late"
    assert agg.report()["rounds"][0]["late"] == 1
    assert torch.equal(agg.block_value(0)[1]["l0.w"], torch.full((4, 3), 2.0)), "a late update is not applied"


def test_deltas_from_a_stale_start_are_averaged():
    agg = joined(clients=1, rounds=3, schedule=[0, 1])
    agg.submit(*update(0, 0, 0, 5.0))
    assert agg.wait_round(0, 1)
    agg.submit(*update(0, 1, 1, 0.5, kind="delta"))
    assert agg.wait_round(1, 1)
    assert torch.equal(agg.block_value(1)[1]["l1.w"], torch.full((2, 2), 2.5))


def test_shutdown_wakes_waiters_and_pull_fails_cleanly():
    agg = joined()
    service = FederationService(agg)
    transport = InProcessTransport(service)
    errors = []

    def pull():
        try:
            transport.pull(0, 0, 30)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=pull)
    t.start()
    time.sleep(0.1)
    agg.shutdown()
    t.join(5)
    assert not t.is_alive() and "shutting down" in str(errors[0])
