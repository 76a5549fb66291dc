from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from pl_parablock.client.inprocess import InProcessTransport
from pl_parablock.core.aggregate import PIECE_ELEMS
from pl_parablock.core.blocks import Block, Partition
from pl_parablock.errors import FederationError
from pl_parablock.server.aggregator import Aggregator, RefusedError
from pl_parablock.server.service import FederationService
from pl_parablock.server.validation import _all_finite
from pl_parablock.wire.framing import StagedTensors, dtype_name, encode, parse_header
from tests.helpers import wait_until

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


def test_clients_per_round_samples_a_seeded_subset_and_refuses_others():
    agg = joined(clients=4, rounds=4, clients_per_round=2, seed=3)
    again = Aggregator(clients=4, rounds=4, clients_per_round=2, seed=3)
    assert agg.participants == again.participants
    assert all(len(p) == 2 for p in agg.participants)
    outsider = next(c for c in range(4) if c not in agg.participants[0])
    reply = agg.submit(*update(outsider, 0, 0, 1.0))
    assert not reply["accepted"] and "not sampled" in reply["reason"]
    for c in agg.participants[0]:
        agg.submit(*update(c, 0, 0, 2.0))
    assert agg.wait_round(0, 1.0)
    assert agg.report()["rounds"][0]["expected"] == 2


def test_norm_bound_refuses_and_clipping_scales():
    agg = joined(max_update_norm=5.0)
    reply = agg.submit(*update(0, 0, 0, 10.0))  # delta from ones: 9 * sqrt(15)
    assert not reply["accepted"] and "exceeds the bound" in reply["reason"]

    agg = joined(clip_norm=1.0)
    agg.submit(*update(0, 0, 0, 0.1, kind="delta"))  # norm 0.1 * sqrt(15) < 1: kept as is
    agg.submit(*update(1, 0, 0, 100.0, kind="delta"))  # huge: clipped to norm 1
    assert agg.wait_round(0, 1.0)
    value = agg.block_value(0)[1]["l0.w"]
    assert float(value.max()) < 1.5, "the outlier must be clipped, not averaged in"
    assert agg.report()["rounds"][0]["clipped"] == [1]


def test_median_ignores_a_poisoned_update():
    agg = joined(clients=3, aggregation="median")
    agg.submit(*update(0, 0, 0, 2.0))
    agg.submit(*update(1, 0, 0, 2.5))
    agg.submit(*update(2, 0, 0, 1e6))
    assert agg.wait_round(0, 1.0)
    assert torch.allclose(agg.block_value(0)[1]["l0.w"], torch.full((4, 3), 2.5))


def test_checkpoint_round_trip_and_resume(tmp_path):
    agg = joined(checkpoint_dir=str(tmp_path), checkpoint_every=1)
    agg.submit(*update(0, 0, 0, 3.0))
    agg.submit(*update(1, 0, 0, 5.0))
    assert agg.wait_round(0, 1.0)
    agg.submit(*update(0, 1, 1, 7.0))  # round 1 stays open: not in the checkpoint
    assert sorted(os.listdir(tmp_path)) == ["globals-000001.safetensors", "state.json"]

    fresh = Aggregator(clients=2, rounds=4)
    assert fresh.load_checkpoint(str(tmp_path)) == 1
    assert fresh.versions() == [0, -1]
    assert torch.equal(fresh.block_value(0)[1]["l0.w"], torch.full((4, 3), 4.0))
    assert fresh.instance != agg.instance
    # a client whose round-0 update was applied before the crash is acknowledged, not applied again
    assert status(fresh.submit(*update(0, 0, 0, 99.0))) == "duplicate"
    assert torch.equal(fresh.block_value(0)[1]["l0.w"], torch.full((4, 3), 4.0))
    reply = fresh.join(1, fingerprint(), 1)
    assert reply["next_round"] == 1 and reply["versions"] == [0, -1]


def test_a_corrupt_or_foreign_checkpoint_is_named(tmp_path):
    agg = joined(checkpoint_dir=str(tmp_path), checkpoint_every=1)
    agg.save_checkpoint(str(tmp_path))
    with pytest.raises(FederationError, match="another federation"):
        Aggregator(clients=2, rounds=9).load_checkpoint(str(tmp_path))
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(FederationError, match="corrupt"):
        Aggregator(clients=2, rounds=4).load_checkpoint(str(tmp_path))


def test_the_service_requires_the_token_before_anything_changes():
    agg = Aggregator(clients=2, rounds=2)
    svc = FederationService(agg, token="s3cret")
    with pytest.raises(RefusedError, match="missing or wrong token"):
        InProcessTransport(svc).join(0, fingerprint(), 1)
    with pytest.raises(RefusedError, match="missing or wrong token"):
        InProcessTransport(svc, token="guess").join(0, fingerprint(), 1)
    assert agg.partition is None, "a refused client changes nothing"
    assert InProcessTransport(svc, token="s3cret").join(0, fingerprint(), 1)["need_state"]

    per_client = FederationService(Aggregator(clients=2, rounds=2), token={0: "a", 1: "b"})
    assert InProcessTransport(per_client, token="a").join(0, fingerprint(), 1)["need_state"]
    with pytest.raises(RefusedError):
        InProcessTransport(per_client, token="a").join(1, fingerprint(), 1)


def test_a_long_poll_that_times_out_polls_again(monkeypatch):
    monkeypatch.setattr("pl_parablock.client.transport.POLL_S", 0.1)
    agg = joined()
    transport = InProcessTransport(FederationService(agg))
    polls = []
    real_call = transport._unary_stream

    def counted(method, *args):
        polls.append(method)
        return real_call(method, *args)

    monkeypatch.setattr(transport, "_unary_stream", counted)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("pulled", transport.pull(0, 0, 60)))
    t.start()
    assert wait_until(lambda: len(polls) >= 3, 60), "empty polls, one after another"
    agg.submit(*update(0, 0, 0, 2.0))
    agg.submit(*update(1, 0, 0, 2.0))
    t.join(60)
    pulled = result["pulled"]
    assert set(polls) == {"Pull"} and len(polls) >= 3
    # the wait counts the empty polls too: at least the two that each waited their 0.1 s (a lower bound; load only adds)
    assert pulled.version == 0 and pulled.server_wait_s >= 0.19
    assert torch.equal(pulled.tensors["l0.w"], torch.full((4, 3), 2.0))


# ------------------------------------------------------------ blocks larger than a piece

BIG = {"w": torch.zeros(PIECE_ELEMS * 2 + 12345), "b": torch.zeros(7, dtype=torch.bfloat16)}
BIG_PART = Partition((Block(0, "layers.0", ("w", "b")),))


def big_aggregator(clients: int, **kw) -> Aggregator:
    fp = {
        "mode": "parablock",
        "partition": BIG_PART.to_dict(),
        "tensors": {
            n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": t.numel() * t.element_size()} for n, t in BIG.items()
        },
        "hash": "big",
    }
    agg = Aggregator(clients=clients, rounds=1, **kw)
    agg.join(0, fp, 5)
    agg.set_initial_state(0, BIG)
    for c in range(1, clients):
        agg.join(c, fp, 5)
    return agg


def spooled(client: int, tensors: dict[str, torch.Tensor], weight: float = 1.0, kind: str = "value"):
    """An update as the server receives it: encoded, streamed in chunks and spooled to a file."""
    header = {"client_id": client, "round": 0, "block": 0, "kind": kind, "base_version": -1, "weight": weight}
    it = iter(encode(header, tensors, chunk_bytes=1 << 20))
    head = parse_header(next(it))
    return head, StagedTensors.receive(head, it, max_bytes=None, what="test update")


def test_a_block_larger_than_a_piece_is_averaged_exactly_from_spooled_updates():
    gen = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(BIG["w"].shape, generator=gen), "b": torch.randn(7, generator=gen).to(torch.bfloat16)} for _ in range(3)]
    weights = [3.0, 5.0, 11.0]
    agg = big_aggregator(3)
    for c, (u, w) in enumerate(zip(updates, weights)):
        assert agg.submit(*spooled(c, u, w))["accepted"]
    assert agg.wait_round(0, 5.0)
    got = agg.block_value(0)[1]
    for name in ("w", "b"):
        total = sum(w * u[name].to(torch.float64) for u, w in zip(updates, weights))
        expected = (total / sum(weights)).to(BIG[name].dtype)
        assert torch.equal(got[name], expected), name  # bitwise: each element summed in the same order


def test_a_non_finite_value_in_the_last_piece_is_refused():
    agg = big_aggregator(1)
    bad = {"w": torch.ones(BIG["w"].shape), "b": torch.ones(7, dtype=torch.bfloat16)}
    bad["w"][-1] = float("nan")
    reply = agg.submit(*spooled(0, bad))
    assert not reply["accepted"] and "NaN or infinite" in reply["reason"]
    assert torch.equal(agg.block_value(0)[1]["w"], BIG["w"]), "a refused update must leave the global untouched"


def test_median_of_a_block_larger_than_a_piece_reads_the_updates_piecewise():
    gen = torch.Generator().manual_seed(1)
    updates = [{"w": torch.randn(BIG["w"].shape, generator=gen), "b": torch.randn(7, generator=gen).to(torch.bfloat16)} for _ in range(3)]
    agg = big_aggregator(3, aggregation="median")
    for c, u in enumerate(updates):
        assert agg.submit(*spooled(c, u))["accepted"]
    assert agg.wait_round(0, 5.0)
    expected = torch.stack([u["w"] for u in updates]).median(dim=0).values  # odd count: the middle value
    assert torch.equal(agg.block_value(0)[1]["w"], expected)


def test_finite_check_is_exact_for_every_dtype():
    assert _all_finite(torch.full((10,), 3e38))  # a float32 sum that would overflow float32
    assert _all_finite(torch.full((10,), 1.7e308, dtype=torch.float64))  # a float64 sum that overflows: checked value by value
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.ones(100, dtype=dtype)
            t[57] = bad
            assert not _all_finite(t), (dtype, bad)
    t = torch.ones(4)
    t[0], t[1] = float("inf"), float("-inf")
    assert not _all_finite(t)


def test_the_server_optimizer_state_is_in_the_checkpoint(tmp_path):
    from pl_parablock.core.optimizers import make_server_optimizer

    agg = joined(server_optimizer=make_server_optimizer("adam", lr=0.1))
    for r, block in ((0, 0), (1, 1)):
        for cid in (0, 1):
            assert status(agg.submit(*update(cid, r, block, float(r + cid + 2), kind="delta"))) == "accepted"
    assert agg.wait_round(1, 1.0)
    agg.save_checkpoint(str(tmp_path))
    again = Aggregator(clients=2, rounds=4, server_optimizer=make_server_optimizer("adam", lr=0.1))
    assert again.load_checkpoint(str(tmp_path)) == 2
    saved, loaded = agg.server_optimizer.state_tensors(), again.server_optimizer.state_tensors()
    assert saved.keys() == loaded.keys() and {k.split("/")[0] for k in saved} == {"0", "1"}
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    other = Aggregator(clients=2, rounds=4, server_optimizer=make_server_optimizer("yogi", lr=0.1))
    with pytest.raises(FederationError, match="server_optimizer"):
        other.load_checkpoint(str(tmp_path))


# ------------------------------------------------------------ an untrusted peer (issue 14; over gRPC: tests/integration/test_attacks.py)


def test_weights_are_bounded_and_uniform_means_one():
    agg = joined(weighting="samples", max_weight=8)
    for w in (1e300, 1e30, 8.5):
        reply = agg.submit(*update(0, 0, 0, 1.0, weight=w))
        assert not reply["accepted"] and "exceeds the bound 8" in reply["reason"]
    assert status(agg.submit(*update(0, 0, 0, 1.0, weight=8))) == "accepted"
    uniform = joined(weighting="uniform", max_weight=100)
    reply = uniform.submit(*update(0, 0, 0, 1.0, weight=2.0))
    assert not reply["accepted"] and "is not 1" in reply["reason"]
    reply = joined().submit(*update(0, 0, 0, 1.0, weight=1e300))  # no recipe bound: still no overflow possible
    assert not reply["accepted"] and "exceeds the bound" in reply["reason"]


def test_a_non_finite_aggregate_keeps_the_previous_value_and_the_round_record_says_so():
    agg = joined(clients=1, rounds=2)
    big = {n: torch.full_like(STATE[n], 3e38) for n in PART.blocks[0].params}
    head = {"client_id": 0, "round": 0, "block": 0, "kind": "delta", "base_version": -1, "weight": 1.0}
    before = {n: t.clone() for n, t in agg.block_value(0)[1].items()}
    agg._rounds.state.values[0] = {n: torch.full_like(t, 3e38) for n, t in before.items()}  # a global near float32's largest
    assert status(agg.submit(head, big)) == "accepted"  # finite, but global + delta overflows float32
    assert agg.wait_round(0, 1.0)
    version, value = agg.block_value(0)
    assert version == 0 and all(torch.isfinite(t).all() for t in value.values()), "clients go on from the previous value"
    rec = agg.report()["rounds"][0]
    assert rec["rejected"] == 1 and "not finite" in rec["rejections"][0]["reason"]
    assert agg.round_value(0, 0)[0] == 0, "the round's version can be pulled"


@pytest.mark.parametrize(
    "change,why",
    [
        (lambda fp: {**fp, "partition": [{"name": "b", "params": [1]}]}, "parameter"),
        (lambda fp: {**fp, "partition": []}, "partition"),
        (lambda fp: {**fp, "tensors": {**fp["tensors"], "l0.w": {"dtype": "float32", "shape": [4, 3], "nbytes": 1}}}, "nbytes"),
        (lambda fp: {**fp, "tensors": {**fp["tensors"], "l0.w": {"dtype": "complex", "shape": [4, 3], "nbytes": 48}}}, "dtype"),
        (lambda fp: {**fp, "tensors": {**fp["tensors"], "l0.w": {"dtype": "float32", "shape": [-4, 3], "nbytes": 48}}}, "shape"),
        (lambda fp: {**fp, "tensors": {**fp["tensors"], "l0.w": {"dtype": "float32", "shape": [4.0, 3], "nbytes": 48}}}, "shape"),
        (lambda fp: {**fp, "tensors": {k: v for k, v in fp["tensors"].items() if k != "l1.w"}}, "exactly the partition"),
        (lambda fp: {**fp, "partition": [*fp["partition"], {"name": "again", "params": ["l1.w"]}]}, "two blocks"),
        (lambda fp: {**fp, "hash": 7}, "hash"),
        (lambda fp: {**fp, "mode": None}, "mode"),
        (lambda fp: "not a dict", "not a JSON object"),
    ],
)
def test_a_malformed_fingerprint_is_refused_and_nothing_is_kept(change, why):
    agg = Aggregator(clients=2, rounds=2)
    with pytest.raises(RefusedError, match=why) as err:
        agg.join(0, change(fingerprint()), 1)
    assert err.value.code == "invalid"
    assert agg.partition is None and agg.state_nbytes() is None
    assert agg.join(1, fingerprint(), 1)["need_state"], "the next well-formed join sets the model"


def test_a_fingerprint_whose_state_never_comes_expires_and_the_next_client_takes_over():
    agg = Aggregator(clients=3, rounds=2, initial_state_wait_s=1.0)  # long enough that the next line comes while it is pending
    agg.join(2, {**fingerprint(h="foreign"), "extra": "x" * 1000}, 60)  # the wrong party joins first, sends no state
    assert "extra" not in agg._admission.fingerprint
    with pytest.raises(RefusedError, match="retry later") as err:
        agg.join(0, fingerprint(), 1)  # while it is pending, not refused for good
    assert err.value.code == "unavailable"
    time.sleep(1.1)  # past initial_state_wait_s (a lower bound: a busy machine only sleeps longer)
    assert agg.join(0, fingerprint(), 1)["need_state"]
    with pytest.raises(RefusedError, match="may not set"):
        agg.set_initial_state(2, STATE)
    agg.set_initial_state(0, STATE)
    assert not agg.join(1, fingerprint(), 1)["need_state"]
    with pytest.raises(RefusedError, match="does not match this federation") as err:
        agg.join(2, fingerprint(h="foreign"), 1)
    assert err.value.code == "refused"


def test_a_waiting_join_ends_when_its_caller_goes_away_and_a_nan_timeout_is_refused():
    agg = Aggregator(clients=2, rounds=2)
    agg.join(0, fingerprint(), 60)
    with pytest.raises(RefusedError, match="not a number"):
        agg.join(1, fingerprint(), float("nan"))
    cancelled = threading.Event()
    errors = []

    def join() -> None:
        try:
            agg.join(1, fingerprint(), 3600, cancelled)
        except RefusedError as exc:
            errors.append(exc)

    t = threading.Thread(target=join)
    t.start()
    time.sleep(0.1)
    cancelled.set()
    agg.wake()
    t.join(2)
    assert not t.is_alive() and errors


def test_leave_needs_a_join_and_pushes_need_an_open_round():
    agg = joined(clients=2, rounds=4)
    with pytest.raises(RefusedError, match="has not joined"):
        agg.leave(7, {"x": 1})
    assert agg.report()["client_reports"] == {}
    assert status(agg.submit(*update(0, 1, 1, 1.0))) == "accepted", "parablock: one round ahead of the open one"
    assert "round 2 is not open" in agg.submit(*update(0, 2, 0, 1.0))["reason"]
    sync = Aggregator(clients=1, rounds=4, mode="sync")
    sync.join(0, fingerprint(mode="sync"), 5)
    sync.set_initial_state(0, STATE)
    assert "round 1 is not open" in sync.submit(*update(0, 1, 1, 1.0))["reason"], "sync: only the open round"
    assert status(sync.submit(*update(0, 0, 0, 1.0))) == "accepted"
    assert status(sync.submit(*update(0, 1, 1, 1.0, base=-1))) == "accepted"


def test_refusals_are_recorded_up_to_a_bound_and_counted_beyond():
    from pl_parablock.server.report import MAX_RECORDED_REJECTIONS, round_record

    agg = joined()
    for _ in range(MAX_RECORDED_REJECTIONS + 50):
        agg.submit(*update(0, 0, 0, 1.0, weight=-1))
    rec = round_record(agg._rounds.get(0), agg.started_at)
    assert len(rec["rejections"]) == MAX_RECORDED_REJECTIONS and rec["rejected"] == MAX_RECORDED_REJECTIONS + 50


def test_updates_wait_until_every_client_joined_once_or_the_gather_time_passed():
    """A client starting late must still start at round 0: until all joined (or gather_s passed), pushes are asked to retry."""
    agg = Aggregator(clients=2, rounds=4, gather_s=60.0)
    agg.join(0, fingerprint(), 5)
    agg.set_initial_state(0, STATE)
    reply = agg.submit(*update(0, 0, 0, 1.0))
    assert reply["status"] == "waiting" and reply["retry"] and "1 of 2" in reply["reason"]
    agg.join(1, fingerprint(), 5)
    assert status(agg.submit(*update(0, 0, 0, 1.0))) == "accepted"

    alone = Aggregator(clients=2, rounds=4, gather_s=0.05)
    alone.join(0, fingerprint(), 5)
    alone.set_initial_state(0, STATE)
    time.sleep(0.1)
    assert status(alone.submit(*update(0, 0, 0, 1.0))) == "accepted", "a client that never comes does not hold the federation"


def test_a_compressed_update_of_another_codec_or_forged_is_refused_and_nothing_is_summed():
    from pl_parablock.core.codecs import Compression, encode_block, make_codec

    def int8_update(client, value, codec="int8"):
        header = {"client_id": client, "round": 0, "block": 0, "kind": "delta", "base_version": -1, "weight": 1.0, "codec": codec}
        delta = {n: torch.full_like(STATE[n], value) for n in PART.blocks[0].params}
        return header, encode_block(make_codec(codec), delta)

    def honest_run(*rogues):
        agg = joined(compression=Compression(make_codec("int8"), make_codec("int8")))
        replies = [agg.submit(*r) for r in rogues]
        assert status(agg.submit(*int8_update(0, 0.5))) == "accepted"
        assert status(agg.submit(*int8_update(1, 1.5))) == "accepted"
        assert agg.wait_round(0, 1.0)
        return agg.block_value(0)[1], replies

    clean, _ = honest_run()
    int4 = int8_update(0, 0.5, codec="int4")
    forged = int8_update(0, 0.5)
    forged[1]["l0.w::q"].fill_(-128)
    nan_scale = int8_update(1, 1.5)
    nan_scale[1]["l0.b::scale"].fill_(float("nan"))
    value_kind = ({**int8_update(0, 0.5)[0], "kind": "value"}, int8_update(0, 0.5)[1])
    got, replies = honest_run(int4, forged, nan_scale, value_kind)
    reasons = [r["reason"] for r in replies]
    assert [r["status"] for r in replies] == ["rejected"] * 4, reasons
    assert "compressed with 'int4'; this federation accepts 'int8' (federation.compression.codec)" in reasons[0]
    assert reasons[1].startswith("corrupt compressed update") and reasons[2].startswith("corrupt compressed update")
    assert "must be a delta" in reasons[3]
    assert all(torch.equal(got[n], clean[n]) for n in clean)  # the refused updates left no trace
    assert torch.allclose(clean["l0.w"], torch.full((4, 3), 2.0), atol=0.02)  # 1 + mean(0.5, 1.5), through int8 both ways


def test_rounds_close_in_order_when_a_later_round_is_complete_first():
    """Staleness 2 with a full-duplex transmitter: a client uploads rounds 1 and 2 while round 0 still waits for another."""
    agg = joined(clients=2, rounds=4, staleness=2)
    agg.submit(*update(0, 0, 0, 1.0))
    agg.submit(*update(0, 1, 1, 0.5, kind="delta", base=-1))
    agg.submit(*update(0, 2, 0, 0.5, kind="delta", base=-1))
    agg.submit(*update(1, 1, 1, 1.5, kind="delta", base=-1))
    agg.submit(*update(1, 2, 0, 1.5, kind="delta", base=-1))
    assert not agg.wait_round(1, 0.05), "round 1 is complete but round 0 is not closed: it waits"
    assert agg.versions() == [-1, -1]
    agg.submit(*update(1, 0, 0, 3.0))
    assert agg.wait_round(2, 1.0) and agg.wait_round(1, 0.0) and agg.wait_round(0, 0.0)
    assert agg.versions() == [2, 1]
    assert torch.equal(agg.block_value(0)[1]["l0.w"], torch.full((4, 3), 3.0)), "round 0's mean 2, then round 2's mean delta 1"
    assert torch.equal(agg.block_value(1)[1]["l1.w"], torch.full((2, 2), 3.0))
    closed = [r["round"] for r in sorted(agg.report()["rounds"], key=lambda r: r["closed_at"])]
    assert closed == [0, 1, 2]


def test_a_later_rounds_timeout_counts_from_the_close_of_the_round_before():
    agg = joined(clients=3, rounds=4, staleness=2, min_clients=2, round_timeout_s=0.3)
    agg.submit(*update(0, 1, 1, 1.0))
    agg.submit(*update(1, 1, 1, 1.0))
    time.sleep(0.35)
    agg.submit(*update(0, 0, 0, 1.0))
    assert not agg.wait_round(1, 0.1), "round 1 has a quorum and its timeout passed, but round 0 is open"
    agg.submit(*update(1, 0, 0, 1.0))
    assert agg.wait_round(0, 2.0)
    t0 = time.monotonic()
    assert not agg.wait_round(1, 0.1), "round 1's timeout counts again from round 0's close"
    assert agg.wait_round(1, 2.0) and time.monotonic() - t0 >= 0.25
