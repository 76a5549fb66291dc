"""A server ends when its work ends: after the last round it waits only for clients that took part in the last rounds.

Three clients join; client 2 takes part in round 0 and is then gone (killed:
it calls nothing more). Rounds close on the quorum of the two others. Once
the last round closed, the server must not wait ``grace_s`` for client 2's
Leave: it returns as soon as clients 0 and 1 left, and its report says who
never reported. A client that is alive in the last rounds (it fetched their
aggregates) is waited for, and the launcher is told whose report it waits
for and how long.

Wrong variant tried: ``Admission.awaited`` returning every client joined
and not left (0.1's rule): the first test fails (the wait lasts the grace).
"""

from __future__ import annotations

import threading
import time

import torch

from pl_parablock.server.aggregator import Aggregator
from tests.unit.server.test_aggregator import PART, STATE

GRACE_S = 30.0
LIMIT_S = 20.0


def fingerprint() -> dict:
    return {
        "mode": "sync",
        "partition": PART.to_dict(),
        "tensors": {n: {"dtype": "float32", "shape": list(t.shape), "nbytes": t.numel() * 4} for n, t in STATE.items()},
        "hash": "h",
    }


def federation(rounds: int = 4) -> Aggregator:
    agg = Aggregator(clients=3, rounds=rounds, mode="sync", min_clients=2, round_timeout_s=0.5)
    assert agg.join(0, fingerprint(), 5.0)["need_state"]
    agg.set_initial_state(0, {n: t.clone() for n, t in STATE.items()})
    agg.join(1, fingerprint(), 5.0)
    agg.join(2, fingerprint(), 5.0)
    return agg


def push(agg: Aggregator, client: int, t: int) -> None:
    block = agg.schedule[t]
    names = [n for n in STATE if n.startswith(f"l{block}.")]
    header = {"client_id": client, "round": t, "block": block, "kind": "delta", "base_version": agg.versions()[block], "weight": 1.0}
    assert agg.submit(header, {n: torch.full_like(STATE[n], 0.01) for n in names})["status"] == "accepted"


def run(agg: Aggregator, alive: set[int], rounds: int) -> None:
    for t in range(rounds):
        for c in sorted(alive | ({2} if t == 0 else set())):
            push(agg, c, t)
        assert agg.wait_round(t, LIMIT_S)
        for c in alive:
            agg.round_answer(t, c, delta=False)  # every live client fetches the aggregate


def test_a_client_gone_before_the_last_rounds_is_not_waited_for():
    agg = federation()
    try:
        run(agg, {0, 1}, 4)
        told: list[tuple[list[int], float]] = []
        agg.leave(0, {"final": {}})
        agg.leave(1, {"final": {}})
        t0 = time.monotonic()
        assert agg.wait_finished(LIMIT_S, grace_s=GRACE_S, on_wait=lambda c, g: told.append((c, g)))
        assert time.monotonic() - t0 < GRACE_S / 2, "the server did not wait the grace for client 2"
        assert told == []
        report = agg.report()
        assert report["dropped"] == [2] and report["never_reported"] == [2]
        assert [len(r["clients"]) for r in report["rounds"]] == [3, 2, 2, 2]
    finally:
        agg.shutdown()


def test_a_client_alive_in_the_last_rounds_is_waited_for_and_named():
    agg = federation()
    try:
        run(agg, {0, 1}, 4)
        told: list[tuple[list[int], float]] = []
        done: dict[str, bool] = {}

        def wait() -> None:
            done["ok"] = agg.wait_finished(LIMIT_S, GRACE_S, lambda c, g: told.append((c, g)))

        waiter = threading.Thread(target=wait, name="test-server-wait")
        agg.leave(0, {"final": {}})
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and told == [([1], GRACE_S)], "client 1 fetched the last aggregates: the server waits for it"
        agg.leave(1, {"final": {}})
        waiter.join(LIMIT_S)
        assert done == {"ok": True}
        assert agg.report()["never_reported"] == [2]
    finally:
        agg.shutdown()
