"""The rebase of DESIGN §1 where it is not a plain replacement: staggered ``parablock``, coupled blocks.

In a staggered round client ``i`` trains ``(b_t + i) mod M``, so in round
``t + 1`` a client may train the block another client moved in round ``t``
before round ``t``'s aggregate arrives. When it arrives, the client must
rebase, ``θ[b] ← g' + (θ[b] − e)`` (``e``: its value of ``b`` at the
hand-off of round ``t``), keeping its round-``t + 1`` progress; a later
hand-off of ``b`` still in flight moves the same way (§1.1, Staleness).

The local "training" below couples the blocks: a step of block ``b``
depends on the values of every other block, so a client's local copy of a
block it is not training still changes what it computes. A replaced
instead of rebased block therefore changes the next rounds' updates and the
global, not only the client's local copy.

:func:`spec_run` writes the rule out plainly (one list of tensors per
client, the rebase as the formula, the server's ``g + Σ w Δ / Σ w``);
:func:`core_run` drives :class:`~pl_parablock.core.client.ClientCore`,
:class:`~pl_parablock.core.server.RoundStep` and
:class:`~pl_parablock.core.server.GlobalState` as a driver does. Both work
in float64; the server's two equal forms (weighted mean of end values, or
``g`` plus the mean delta) differ only in rounding, hence a 1e-12
tolerance.
"""

from __future__ import annotations

import pytest
import torch

from pl_parablock.core.client import ClientCore
from pl_parablock.core.plan import make_plan
from pl_parablock.core.server import GlobalState, RoundStep

K = 3  # local steps
LR = 0.3
WEIGHTS = [3, 1, 2, 5]  # samples seen per round, per client


def target(client: int) -> torch.Tensor:
    return torch.tensor([1.0 + client, -0.5 * client], dtype=torch.float64)


def step(blocks: list[torch.Tensor], b: int, client: int) -> torch.Tensor:
    """One local step of block ``b``: pulled to the client's target and to a function of every other block."""
    others = sum((blocks[j] for j in range(len(blocks)) if j != b), torch.zeros(2, dtype=torch.float64))
    return blocks[b] - LR * (blocks[b] - target(client) - 0.5 * torch.tanh(others))


def initial(num_blocks: int) -> list[torch.Tensor]:
    return [torch.tensor([0.25 * b, -0.125 * b + 1.0], dtype=torch.float64) for b in range(num_blocks)]


def spec_run(plan, clients: int, lag: int, staggered: bool, alpha: float = 1.0):
    """DESIGN §1 / §1.1 written out. Returns (each client's blocks after each round, the final global, finals, rebases seen)."""
    glob = initial(plan.num_blocks)
    local = [initial(plan.num_blocks) for _ in range(clients)]
    handed: list[dict[int, dict[int, torch.Tensor]]] = [{} for _ in range(clients)]  # round -> {block: e}
    aggregates: dict[int, dict[int, torch.Tensor]] = {}  # round -> {block: g'}
    applied = [0] * clients
    rebases = 0

    def members(t):
        return plan.participants[t] if plan.participants is not None else range(clients)

    def block_of(i, t):
        return (plan.schedule[t] + i) % plan.num_blocks if staggered else plan.schedule[t]

    def apply(i, r):
        nonlocal rebases
        for b, e in handed[i].pop(r).items():
            g_new = aggregates[r][b]
            if not torch.equal(local[i][b], e):
                rebases += 1
            local[i][b] = g_new + alpha * (local[i][b] - e)  # θ[b] ← g' + α·(θ[b] − e)
            for q in handed[i]:  # later hand-offs of b still in flight: e₂ ← g' + α·(e₂ − e)
                if b in handed[i][q]:
                    handed[i][q][b] = g_new + alpha * (handed[i][q][b] - e)

    trace = []
    for t in range(plan.rounds):
        moved = sorted({block_of(i, t) for i in members(t)})
        sums = {b: torch.zeros(2, dtype=torch.float64) for b in moved}
        total = dict.fromkeys(moved, 0.0)
        for i in range(clients):
            while applied[i] <= t - 1 - lag:  # sync: round t - 1 applied before round t; parablock: round t - 1 - k
                apply(i, applied[i])
                applied[i] += 1
            if i in members(t):
                b = block_of(i, t)
                s = local[i][b].clone()
                for _ in range(K):
                    local[i][b] = step(local[i], b, i)
                sums[b] += WEIGHTS[i] * (local[i][b] - s)
                total[b] += WEIGHTS[i]
            handed[i][t] = {blk: local[i][blk].clone() for blk in moved}
        aggregates[t] = {}
        for b in moved:
            glob[b] = glob[b] + sums[b] / total[b]  # g' = g + Σ w Δ / Σ w  (η_g = 1)
            aggregates[t][b] = glob[b].clone()
        trace.append([[v.clone() for v in local[i]] for i in range(clients)])
    for i in range(clients):
        while applied[i] < plan.rounds:
            apply(i, applied[i])
            applied[i] += 1
    return trace, glob, local, rebases


def core_run(plan, clients: int):
    """The same federation through the core's client and server objects."""
    live = [[{f"b{b}": v} for b, v in enumerate(initial(plan.num_blocks))] for _ in range(clients)]
    cores = [ClientCore(plan, i, live[i]) for i in range(clients)]
    state = GlobalState([{f"b{b}": v} for b, v in enumerate(initial(plan.num_blocks))])

    def deliver(core):
        for r in core.awaiting():
            g_new = {n: v for b in plan.blocks_of(r) for n, v in state.value_at(b, r, reader=core.client_id).items()}
            core.apply(r, r, g_new)

    trace = []
    for t in range(plan.rounds):
        steps = {b: RoundStep(t, b) for b in plan.blocks_of(t)}
        for core in cores:
            deliver(core)
            if not core.participates():
                core.skip()
                continue
            start = core.begin()
            mine = live[core.client_id]
            with torch.no_grad():
                for _ in range(K):
                    values = [blk[f"b{j}"] for j, blk in enumerate(mine)]
                    mine[start.block][f"b{start.block}"].copy_(step(values, start.block, core.client_id))
            w = WEIGHTS[core.client_id]
            update = core.end(samples=w, tokens=w, shard=w, weighting="samples")
            steps[update.block].add(update.tensors, update.weight, update.kind)
        for b, rs in steps.items():
            state.install(t, b, rs.close(state.values[b]), readers=range(clients))
        trace.append([[blk[f"b{j}"].clone() for j, blk in enumerate(live[i])] for i in range(clients)])
    for core in cores:
        deliver(core)
        assert core.finished
    glob = [state.values[b][f"b{b}"] for b in range(plan.num_blocks)]
    local = [[blk[f"b{j}"] for j, blk in enumerate(live[i])] for i in range(clients)]
    return trace, glob, local


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-12)


CASES = {
    # mode, assignment, blocks, clients, clients_per_round, expect rebases that are not replacements
    "parablock-staggered": ("parablock", "staggered", 4, 3, None, True),
    "parablock-staggered-sampled": ("parablock", "staggered", 4, 4, 3, True),
    "parablock-shared": ("parablock", "shared", 4, 3, None, False),
    "sync-staggered": ("sync", "staggered", 4, 3, None, False),
    # one block: every round trains the block the previous round handed off, and a kept later hand-off moves too
    "parablock-one-block-sampled": ("parablock", "shared", 1, 3, 2, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_core_rebases_a_block_trained_since_its_hand_off_as_the_written_rule(case):
    mode, assignment, num_blocks, clients, per_round, rebasing = CASES[case]
    plan = make_plan(
        mode,
        num_blocks=num_blocks,
        rounds=9,
        schedule="ascending",
        seed=3,
        clients=clients,
        clients_per_round=per_round,
        assignment=assignment,
    )
    want_trace, want_glob, want_local, rebases = spec_run(
        plan, clients, lag=1 if mode == "parablock" else 0, staggered=assignment == "staggered"
    )
    # the case exercises what it is meant to: staggered parablock has rebases with local progress to keep
    assert (rebases > 0) == rebasing, rebases
    got_trace, got_glob, got_local = core_run(plan, clients)
    for t, (want, got) in enumerate(zip(want_trace, got_trace)):
        for i in range(clients):
            for b in range(num_blocks):
                assert close(got[i][b], want[i][b]), f"round {t}, client {i}, block {b}: {got[i][b]} != {want[i][b]}"
    for b in range(num_blocks):
        assert close(got_glob[b], want_glob[b]), f"global block {b}: {got_glob[b]} != {want_glob[b]}"
    for i in range(clients):
        for b in range(num_blocks):
            # every aggregate applied, nothing trained since: each client holds the global
            assert close(got_local[i][b], want_glob[b]) and close(want_local[i][b], want_glob[b])


def test_the_rebase_keeps_the_progress_on_a_block_another_client_moved():
    """Two clients, two blocks, staggered parablock, two rounds, written out by hand.

    Round 0: client 0 trains block 0, client 1 block 1. Round 1: client 0
    trains block 1 (moved by client 1 in round 0, whose aggregate client 0
    has not applied yet). Applying round 0's aggregate of block 1 must
    keep client 0's round-1 progress on it.
    """
    plan = make_plan("parablock", num_blocks=2, rounds=2, schedule="ascending", clients=2, assignment="staggered")
    assert [plan.block_for(0, t) for t in range(2)] == [0, 1] and plan.block_for(1, 0) == 1
    x0 = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([-1.0, 0.5], dtype=torch.float64)}
    c0 = [{"a": x0["a"].clone()}, {"b": x0["b"].clone()}]
    c1 = [{"a": x0["a"].clone()}, {"b": x0["b"].clone()}]
    cores = [ClientCore(plan, 0, c0), ClientCore(plan, 1, c1)]
    with torch.no_grad():
        cores[0].begin()
        c0[0]["a"] += 0.25  # client 0, round 0, block 0
        u00 = cores[0].end(samples=1, tokens=1, shard=1, weighting="uniform")
        cores[1].begin()
        c1[1]["b"] -= 0.5  # client 1, round 0, block 1
        u10 = cores[1].end(samples=1, tokens=1, shard=1, weighting="uniform")
        assert (u00.block, u10.block) == (0, 1)
        e_b = c0[1]["b"].clone()  # client 0's hand-off value of block 1 in round 0 (untouched: x0["b"])
        assert cores[0].awaiting() == []  # parablock: round 1 begins before round 0's aggregate
        assert cores[0].begin().block == 1
        c0[1]["b"] += torch.tensor([0.125, 0.0625], dtype=torch.float64)  # client 0's round-1 progress on block 1
        progress = c0[1]["b"] - e_b
        cores[0].end(samples=1, tokens=1, shard=1, weighting="uniform")
    g_a = x0["a"] + 0.25  # round 0's aggregates: one client per block
    g_b = x0["b"] - 0.5
    cores[0].apply(0, 0, {"a": g_a, "b": g_b})
    assert torch.equal(c0[0]["a"], g_a)  # untouched since the hand-off: replaced
    assert torch.allclose(c0[1]["b"], g_b + progress, rtol=0, atol=1e-15)  # θ ← g' + (θ − e)
    assert not torch.allclose(c0[1]["b"], g_b)
