"""The evaluator's place on the server: exact points, held within a bound, never in the clients' way, behind the token.

Wrong variants tried: ``EvaluatorDesk.reached`` holding nothing (the
evaluator then reads the newest global): the first test fails (the read
of point 2 gets the global after 4 rounds). ``_bound`` never dropping a
point: the second test fails (every point stays held). The service's
evaluator ``Pull`` before the token check: the last test fails.
"""

from __future__ import annotations

import pytest
import torch

from pl_parablock.client.inprocess import InProcessTransport
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.service import FederationService
from pl_parablock.server.validation import RefusedError
from tests.unit.server.test_aggregator import STATE, fingerprint, update


def joined(rounds: int, points: tuple[int, ...] = (), hold_models: float = 2.0) -> Aggregator:
    """Two clients joined, the evaluator's points configured before the initial state arrives (as the launcher does)."""
    agg = Aggregator(clients=2, rounds=rounds)
    agg.evaluator.configure(points, hold_models)
    assert agg.join(0, fingerprint(), 5)["need_state"]
    agg.set_initial_state(0, STATE)
    agg.join(1, fingerprint(), 5)
    return agg


def close_rounds(agg: Aggregator, rounds: range, clients: int = 2) -> None:
    """Every client sends value ``t + 1`` for round ``t``'s block; each round closes."""
    for t in rounds:
        block = agg.schedule[t]
        for c in range(clients):
            assert agg.submit(*update(c, t, block, float(t + 1), base=agg.versions()[block]))["status"] == "accepted"
        assert agg.wait_round(t, 10)


def expected_after(n: int) -> dict[str, torch.Tensor]:
    """The global after ``n`` rounds of :func:`close_rounds` (blocks alternate 0, 1, 0, 1, ...)."""
    value = {n_: t.clone() for n_, t in STATE.items()}
    for t in range(n):
        for name in value:
            if name.startswith(f"l{t % 2}."):
                value[name] = torch.full_like(STATE[name], float(t + 1))
    return value


def read_all(transport: InProcessTransport, after: int) -> tuple[int, dict[str, torch.Tensor]]:
    point, count, tensors = transport.evaluator_pull(after, 0, 10)
    out = dict(tensors)
    for b in range(1, count):
        got, _, more = transport.evaluator_pull(point, b, 10)
        assert got == point
        out.update(more)
    return point, out


def test_the_evaluator_reads_the_exact_global_after_each_point_while_rounds_go_on():
    agg = joined(6, (0, 2, 4), hold_models=10)
    evaluator = InProcessTransport(FederationService(agg))
    try:
        close_rounds(agg, range(6))  # the evaluator reads nothing while the rounds close: no round waits for it
        assert agg.next_round() == 6
        for n in (0, 2, 4, 6):
            point, tensors = read_all(evaluator, n)
            assert point == n
            want = expected_after(n)
            assert all(torch.equal(tensors[k], want[k]) for k in want), f"the global after {n} rounds"
        assert agg.evaluator.held == {6: agg.evaluator.held[6]}, "points read are let go"
        evaluator.evaluator_leave({"final": {"eval_loss": 1.5}, "eval_curve": [{"round": 0}]}, 5)
        report = agg.report()
        assert report["evaluator"]["report"]["final"] == {"eval_loss": 1.5} and agg.evaluator.held == {}
        assert report["joined"] == [0, 1] and "evaluator" not in report["client_reports"], "the evaluator is not a client"
    finally:
        agg.shutdown()


def test_an_evaluator_behind_costs_the_server_a_bounded_memory_and_skips_to_a_later_point():
    agg = joined(12, (0, 2, 4, 6, 8, 10), hold_models=1.0)
    try:
        close_rounds(agg, range(12))
        desk = agg.evaluator
        model = sum(t.numel() * t.element_size() for t in STATE.values())
        current = {id(t) for block in agg._rounds.state.values for t in block.values()}
        kept = {id(t): t for held in desk.held.values() for block in held for t in block.values() if id(t) not in current}
        assert sum(t.numel() * t.element_size() for t in kept.values()) <= model
        assert desk.dropped and min(desk.held) > 0, "the oldest points were dropped"
        point, tensors = read_all(InProcessTransport(FederationService(agg)), 2)  # asks for a dropped point
        assert point == min(desk.held) > 2
        want = expected_after(point)
        assert all(torch.equal(tensors[k], want[k]) for k in want)
        assert agg.finished, "every round closed with the evaluator behind"
    finally:
        agg.shutdown()


def test_the_clients_end_without_the_evaluator_and_a_read_waits_only_its_own_time():
    agg = joined(rounds=2)
    try:
        evaluator = InProcessTransport(FederationService(agg))
        with pytest.raises(Exception, match="did not arrive within"):
            evaluator.evaluator_pull(2, 0, 0.3)  # no round closed: it waits its time, nothing else
        close_rounds(agg, range(2))
        agg.leave(0, {"final": {}})
        agg.leave(1, {"final": {}})
        assert agg.wait_finished(5.0, grace_s=30.0), "the end of the run does not wait for an evaluator"
        assert agg.report()["never_reported"] == []
    finally:
        agg.shutdown()


def test_the_evaluator_needs_the_federations_token():
    agg = joined(rounds=2)
    try:
        close_rounds(agg, range(1))
        svc = FederationService(agg, token="s3cret")
        for token in (None, "guess"):
            with pytest.raises(RefusedError, match="missing or wrong token"):
                InProcessTransport(svc, token=token).evaluator_pull(0, 0, 2)
            with pytest.raises(RefusedError, match="missing or wrong token"):
                InProcessTransport(svc, token=token).evaluator_leave({"final": {}}, 2)
        assert agg.evaluator.summary() is None, "a refused evaluator changes nothing"
        assert InProcessTransport(svc, token="s3cret").evaluator_pull(0, 0, 2)[0] == 1  # no point held: the newest
        per_client = FederationService(agg, token={0: "a", 1: "b"})
        assert InProcessTransport(per_client, token="b").evaluator_pull(1, 1, 2)[0] == 1  # a client's token reads
    finally:
        agg.shutdown()
