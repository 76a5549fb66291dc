"""Staleness ``k`` (DESIGN §1.1, beyond the paper): round ``t``'s aggregate is applied before round ``t + k + 1`` begins.

The rule is written out in :func:`~tests.unit.core.test_staggered_rebase.spec_run`
(``lag = k``; the rebase ``θ[b] ← g' + α·(θ[b] − e)`` moves every later
hand-off of ``b`` still in flight the same way) on a training map whose
blocks are coupled, and compared with the core's objects driven as a driver
drives them. ``M = 2`` with ``k ≥ 2`` makes a block come round again inside
the window, so a block trains twice before its first aggregate lands.

Wrong variants tried (each failed a test here, then was restored):

* the window one round short (``trains_again_before_apply`` looking at
  rounds ``t + 1 .. t + k − 1``): the core refuses to rebase a block that
  trained again ("trained again before round ...'s aggregate arrived");
* a second in-flight hand-off of the block not moved (only the first);
* ``applied_before`` giving ``t − k`` (an aggregate applied a round late) —
  the core then lets a client run ``k + 1`` rounds ahead;
* ``α`` ignored in the correction of later hand-offs.
"""

from __future__ import annotations

import pytest
import torch

from pl_parablock.core.client import ClientCore
from pl_parablock.core.plan import AlgorithmError, make_plan
from tests.unit.core.test_staggered_rebase import close, core_run, spec_run

CASES = {
    # k, assignment, blocks, clients, clients_per_round, alpha
    "k2-M4": (2, "shared", 4, 3, None, 1.0),
    "k2-M2": (2, "shared", 2, 3, None, 1.0),
    "k3-M2-sampled": (3, "shared", 2, 3, 2, 1.0),
    "k3-M4-staggered": (3, "staggered", 4, 3, None, 1.0),
    "k2-M2-staggered-sampled": (2, "staggered", 2, 4, 3, 1.0),
    "k2-M1": (2, "shared", 1, 3, None, 1.0),
    "k2-M2-damped": (2, "shared", 2, 3, None, 0.5),
    "k1-M1-damped": (1, "shared", 1, 3, 2, 0.25),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_core_runs_the_k_round_rule_as_written(case):
    k, assignment, num_blocks, clients, per_round, alpha = CASES[case]
    plan = make_plan(
        "parablock",
        num_blocks=num_blocks,
        rounds=11,
        seed=5,
        clients=clients,
        clients_per_round=per_round,
        assignment=assignment,
        staleness=k,
        stale_mix=alpha,
    )
    assert plan.staleness == k
    want_trace, want_glob, _, rebases = spec_run(plan, clients, lag=k, staggered=assignment == "staggered", alpha=alpha)
    repeats = num_blocks <= k or assignment == "staggered" or num_blocks == 1
    assert (rebases > 0) == repeats, f"{rebases} rebases: a block trains again inside the window exactly when it comes round in it"
    got_trace, got_glob, _ = core_run(plan, clients)
    for t, (want, got) in enumerate(zip(want_trace, got_trace)):
        for i in range(clients):
            for b in range(num_blocks):
                assert close(got[i][b], want[i][b]), f"round {t}, client {i}, block {b}: {got[i][b]} != {want[i][b]}"
    for b in range(num_blocks):
        assert close(got_glob[b], want_glob[b]), f"global block {b}"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_client_runs_exactly_k_rounds_ahead(k):
    """Round ``t`` cannot begin before round ``t − k − 1``'s aggregate is applied, and may begin right after."""
    plan = make_plan("parablock", num_blocks=4, rounds=8, staleness=k)
    live = [{"w": torch.zeros(2)} for _ in range(4)]
    core = ClientCore(plan, 0, live)
    for _ in range(k + 1):  # rounds 0..k begin with nothing applied
        assert core.awaiting() == []
        core.begin()
        core.end(samples=1, tokens=1, shard=1, weighting="samples")
    assert core.awaiting() == [0], "round k + 1 waits for round 0's aggregate, and only for it"
    with pytest.raises(AlgorithmError):
        core.begin()
    core.apply(0, 0, {"w": torch.ones(2)})
    core.begin()


def test_the_window_is_held_until_the_block_stops_training():
    """``M = 2``, ``k = 3``: the block of round 0 trains again in round 2 before round 0's aggregate lands (applied before round 4)."""
    plan = make_plan("parablock", num_blocks=2, rounds=6, staleness=3)
    assert plan.trains_again_before_apply(0, plan.schedule[0])
    assert plan.trains_again_before_apply(0, plan.schedule[2])
    assert not plan.trains_again_before_apply(3, plan.schedule[3]) or plan.schedule[4:6].count(plan.schedule[3])
    one = make_plan("parablock", num_blocks=2, rounds=6, staleness=1)
    assert not one.trains_again_before_apply(0, one.schedule[0]), "k = 1: the next round trains the other block"


@pytest.mark.parametrize(
    ("mode", "overrides", "key"),
    [
        ("sync", {"staleness": 2}, "federation.staleness"),
        ("fedavg", {"stale_mix": 0.5}, "federation.stale_mix"),
        ("parablock", {"staleness": 0}, "federation.staleness"),
        ("parablock", {"stale_mix": 1.5}, "federation.stale_mix"),
    ],
)
def test_a_window_the_mode_cannot_hold_is_refused_naming_the_key(mode, overrides, key):
    with pytest.raises(AlgorithmError, match=key):
        make_plan(mode, num_blocks=2, rounds=4, **overrides)
