"""The algorithm core against DESIGN.md §1 written out independently, on exact arithmetic.

Each client's "training" is a fixed affine map of its local block,
``e = a_i s + c_i``, on float64 tensors holding dyadic numbers, so every
value below is exact and any two correct implementations agree bitwise.
:func:`spec_run` is the algorithm as DESIGN.md states it, written plainly
(one dict of blocks per client, the rebase as a formula); :func:`core_run`
drives :class:`~pl_parablock.core.client.ClientCore` and the server's
:class:`~pl_parablock.core.server.RoundStep` / :class:`~pl_parablock.core.server.GlobalState`
as every driver does.

Wrong variants tried on the core (each made a test here fail, then was restored):

* an aggregate applied one round late (``applied_before`` returning ``t - 2 - staleness``):
  ``test_core_matches_the_spec`` (every parablock and sync case) and
  ``test_parablock_applies_round_t_before_round_t_plus_2``;
* ``g'`` dropped from the rebase (``rebase`` returning ``local``): ``test_core_matches_the_spec``
  (parablock, one block) and ``test_rebase_with_progress``;
* the rebase from the wrong ``e`` (the start value ``s`` kept instead of the hand-off value):
  ``test_core_matches_the_spec`` (parablock, one block);
* wrong weights (``client_weight`` returning ``samples`` for every weighting):
  ``test_core_matches_the_spec`` (shard and uniform cases) and ``test_client_weight``.
* a later round that moved a block counted as "this client trained it since" (staggered):
  ``test_core_matches_the_spec`` (three staggered parablock cases);
* a kept later hand-off of a block left unshifted when the aggregate replaces the block:
  ``test_core_matches_the_spec`` (parablock, one block, sampled).
"""

from __future__ import annotations

import pytest
import torch

from pl_parablock.core.client import ClientCore, rebase
from pl_parablock.core.optimizers import make_server_optimizer
from pl_parablock.core.plan import AlgorithmError, client_weight, cyclic_assignment, make_plan
from pl_parablock.core.server import GlobalState, RoundStep, Superseded

SHAPE = (3,)


def train(value: torch.Tensor, client: int, t: int) -> torch.Tensor:
    """One client's K local steps, as an exact map: a client's own contraction plus a client- and round-dependent constant.

    The contraction differs between clients, so the global depends on where
    each client started, not only on the mean: a missed correction shows.
    """
    return value * (0.5, 0.25, 0.75, 0.375, 0.625)[client] + (client + 1) + t / 4


def initial(num_blocks: int) -> list[dict[str, torch.Tensor]]:
    return [{f"b{b}.w": torch.arange(3, dtype=torch.float64) + 8 * b} for b in range(num_blocks)]


SAMPLES = [4, 12, 16, 8, 4]  # per round
SHARDS = [7, 1, 8, 3, 5]


def weight(weighting: str, client: int) -> float:
    return {"samples": SAMPLES[client], "shard": SHARDS[client], "uniform": 1.0, "tokens": SAMPLES[client]}[weighting]


def spec_run(mode, num_blocks, rounds, schedule, clients, per_round, weighting, assignment="shared", seed=0):
    """DESIGN.md §1, written out: the clients' local blocks and the server's global after the run."""
    plan = make_plan(mode, num_blocks=num_blocks, rounds=rounds, schedule=schedule, seed=seed, clients=clients, clients_per_round=per_round)
    lag = 1 if mode == "parablock" else 0
    g = [dict((n, v.clone()) for n, v in blk.items()) for blk in initial(num_blocks)]
    local = [[dict((n, v.clone()) for n, v in blk.items()) for blk in initial(num_blocks)] for _ in range(clients)]
    handed = [dict() for _ in range(clients)]  # round -> {block the round moved: this client's value of it then}
    history = {}  # round -> {block: its global value after the round}

    def block_for(i, t):  # §1.1 Assignment
        return (plan.schedule[t] + i) % num_blocks if assignment == "staggered" else plan.schedule[t]

    def apply(i, r):
        for b, e in handed[i].pop(r).items():
            for n in local[i][b]:
                local[i][b][n] = history[r][b][n] + (local[i][b][n] - e[n])  # the rebase: g' + (theta - e)
            for _q, blocks in handed[i].items():
                if b in blocks:  # a later hand-off of the block moves with it: "progress since the hand-off" excludes the correction
                    blocks[b] = {n: history[r][b][n] + (blocks[b][n] - e[n]) for n in e}

    if mode == "cyclic":  # FedCyBGD: in turn, each client trains its block of the model the previous one left
        for t in range(rounds):
            b, (i,) = plan.schedule[t], plan.participants[t]
            for n in g[b]:
                g[b][n] = train(g[b][n].clone(), i, t)  # its block replaces the global block
        return g, [[{n: v.clone() for n, v in blk.items()} for blk in g] for _ in range(clients)]

    applied = [0] * clients
    for t in range(rounds):
        members = plan.participants[t] if plan.participants else range(clients)
        moved = sorted({block_for(i, t) for i in members})
        zeros = {b: {n: torch.zeros(SHAPE, dtype=torch.float64) for n in g[b]} for b in moved}
        num = {b: {n: v.clone() for n, v in z.items()} for b, z in zeros.items()}  # Σ w e over value updates
        num_d = {b: {n: v.clone() for n, v in z.items()} for b, z in zeros.items()}  # Σ w Δ over delta updates
        total = dict.fromkeys(moved, 0.0)
        w_values = dict.fromkeys(moved, 0.0)
        values_only = dict.fromkeys(moved, True)
        for i in range(clients):
            while applied[i] <= t - 1 - lag:
                apply(i, applied[i])
                applied[i] += 1
            if i not in members:
                handed[i][t] = {blk: {n: v.clone() for n, v in local[i][blk].items()} for blk in moved}
                continue
            b = block_for(i, t)
            start = {n: v.clone() for n, v in local[i][b].items()}
            pending = any(b in blocks for blocks in handed[i].values())
            from_global = all(torch.equal(start[n], g[b][n]) for n in start) and not pending
            for n in local[i][b]:
                local[i][b][n] = train(local[i][b][n], i, t)
            handed[i][t] = {blk: {n: v.clone() for n, v in local[i][blk].items()} for blk in moved}
            e = handed[i][t][b]
            w = weight(weighting, i)
            total[b] += w
            if from_global:
                w_values[b] += w
                for n in num[b]:
                    num[b][n].add_(e[n], alpha=w)
            else:
                values_only[b] = False
                for n in num[b]:
                    num_d[b][n].add_(e[n] - start[n], alpha=w)
        history[t] = {}
        for b in moved:
            for n in g[b]:
                # server: weighted mean of end values, or g + mean delta, value updates counting as e - g
                # (the delta form multiplies by 1 / Σw, as the server does, rather than dividing)
                if values_only[b]:
                    g[b][n] = num[b][n] / total[b]
                else:  # Σ w Δ + Σ w e − (Σ w over values) g, scaled by 1 / Σ w
                    step = num_d[b][n] + num[b][n] - w_values[b] * g[b][n]
                    g[b][n] = g[b][n].clone().add_(step, alpha=1.0 / total[b])
            history[t][b] = {n: v.clone() for n, v in g[b].items()}
    for i in range(clients):
        while applied[i] < rounds:
            apply(i, applied[i])
            applied[i] += 1
    return g, local


def core_run(mode, num_blocks, rounds, schedule, clients, per_round, weighting, assignment="shared", seed=0):
    """The same federation through the core, driven as the reference driver drives it."""
    plan = make_plan(
        mode, num_blocks=num_blocks, rounds=rounds, schedule=schedule, seed=seed, clients=clients, clients_per_round=per_round,
        assignment=assignment,
    )  # fmt: skip
    blocks = [initial(num_blocks) for _ in range(clients)]
    cores = [ClientCore(plan, i, blocks[i]) for i in range(clients)]
    state = GlobalState(initial(num_blocks))

    def deliver(core):
        for r in core.awaiting():
            moved = {n: v for b in plan.blocks_of(r) for n, v in state.value_at(b, r, reader=core.client_id).items()}
            core.apply(r, r, moved)
        if core.catching_up and (core.participates() or core.round >= rounds):  # cyclic: blocks changed since its turn
            for b, v in enumerate(state.versions):
                if v > core.versions[b]:
                    core.adopt(b, v, state.values[b])
            core.caught_up()

    for t in range(rounds):
        steps = {b: RoundStep(t, b) for b in plan.blocks_of(t)}
        for core in cores:
            deliver(core)
            if not core.participates():
                core.skip()
                continue
            start = core.begin()
            for p in core.blocks[start.block].values():
                p.copy_(train(p, core.client_id, t))
            samples = SAMPLES[core.client_id]
            update = core.end(samples=samples, tokens=samples, shard=SHARDS[core.client_id], weighting=weighting)
            steps[update.block].add(update.tensors, update.weight, update.kind)
        for b, step in steps.items():
            state.install(t, b, step.close(state.values[b]), readers=range(clients))
    for core in cores:
        deliver(core)
        assert core.finished
    return state.values, blocks


CASES = [
    ("sync", 4, 9, "ascending", 3, None, "samples"),
    ("parablock", 4, 9, "ascending", 3, None, "samples"),
    ("parablock", 3, 10, "random", 3, None, "samples"),
    ("parablock", 4, 9, "ascending", 3, 2, "samples"),
    ("sync", 3, 9, "random", 3, 2, "shard"),
    ("parablock", 1, 8, "ascending", 3, None, "samples"),
    ("sync", 1, 8, "ascending", 3, None, "uniform"),
    ("parablock", 1, 8, "ascending", 3, 2, "shard"),
    ("fedavg", 1, 6, "ascending", 2, None, "samples"),
    ("cyclic", 4, 10, "ascending", 3, None, "samples"),
    ("cyclic", 3, 9, "descending", 3, None, "samples"),
    ("cyclic", 4, 11, "random", 3, None, "samples"),
    ("sync", 4, 9, "ascending", 3, None, "samples", "staggered"),
    ("parablock", 4, 9, "ascending", 3, None, "shard", "staggered"),
    ("parablock", 3, 10, "random", 5, 3, "samples", "staggered"),  # N > M: several clients share a block
    ("parablock", 2, 8, "ascending", 3, None, "samples", "staggered"),  # a block another client moved trains next round
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_core_matches_the_spec(case):
    """Every client's blocks and the server's global equal DESIGN.md's algorithm written out, bitwise."""
    g_spec, local_spec = spec_run(*case)
    g_core, local_core = core_run(*case)
    for b, blk in enumerate(g_spec):
        for n, v in blk.items():
            assert torch.equal(g_core[b][n], v), (b, n, g_core[b][n], v)
    for i, blocks in enumerate(local_spec):
        for b, blk in enumerate(blocks):
            for n, v in blk.items():
                assert torch.equal(local_core[i][b][n], v), (i, b, n)
    # and the run is not trivial: the clients' blocks moved
    assert not all(torch.equal(g_core[0][n], v) for n, v in initial(case[1])[0].items())


def test_parablock_applies_round_t_before_round_t_plus_2():
    """The aggregate of round t is applied exactly before round t+2 begins (not t+1, not t+3)."""
    plan = make_plan("parablock", num_blocks=3, rounds=5)
    core = ClientCore(plan, 0, initial(3))
    seen = []
    for _ in range(5):
        seen.append(core.awaiting())
        for r in core.awaiting():
            core.apply(r, r, initial(3)[plan.schedule[r]])
        core.begin()
        core.end(samples=1, tokens=1, shard=1, weighting="samples")
    assert seen == [[], [], [0], [1], [2]]
    assert core.awaiting() == [3, 4]
    sync = ClientCore(make_plan("sync", num_blocks=3, rounds=3), 0, initial(3))
    sync.begin()
    sync.end(samples=1, tokens=1, shard=1, weighting="samples")
    assert sync.awaiting() == [0]
    with pytest.raises(AlgorithmError, match="cannot begin"):
        sync.begin()


def test_apply_checks_turn_and_version():
    plan = make_plan("parablock", num_blocks=2, rounds=4)
    core = ClientCore(plan, 0, initial(2))
    for _ in range(2):
        core.begin()
        core.end(samples=1, tokens=1, shard=1, weighting="samples")
    with pytest.raises(AlgorithmError, match="out of turn"):
        core.apply(1, 1, initial(2)[1])
    with pytest.raises(AlgorithmError, match="version"):
        core.apply(0, 1, initial(2)[0])
    core.apply(0, 0, initial(2)[0])


def test_rebase_with_progress():
    local, end, g = torch.tensor([3.0, 5.0]), torch.tensor([2.0, 4.0]), torch.tensor([10.0, 20.0])
    assert torch.equal(rebase(local, end, g), torch.tensor([11.0, 21.0]))


def test_client_weight():
    assert client_weight("samples", samples=8, tokens=100, shard=50) == 8.0
    assert client_weight("tokens", samples=8, tokens=100, shard=50) == 100.0
    assert client_weight("tokens", samples=8, tokens=0, shard=50) == 8.0
    assert client_weight("shard", samples=8, tokens=100, shard=50) == 50.0
    assert client_weight("uniform", samples=8, tokens=100, shard=50) == 1.0
    with pytest.raises(AlgorithmError):
        client_weight("bogus", samples=1, tokens=1, shard=1)


def test_optimizer_state_is_fresh_every_round_unless_kept():
    for keep in (False, True):
        plan = make_plan("fedavg", num_blocks=1, rounds=2, keep_optimizer_state=keep)
        start = ClientCore(plan, 0, initial(1)).begin()
        assert start.fresh_optimizer_state is (not keep)


def test_global_state_holds_a_version_until_its_readers_read_it():
    state = GlobalState(initial(1))
    v0 = {"b0.w": torch.ones(3, dtype=torch.float64)}
    v1 = {"b0.w": 2 * torch.ones(3, dtype=torch.float64)}
    state.install(0, 0, v0, readers=[0, 1])
    state.install(1, 0, v1, readers=[0, 1])
    assert state.value_at(0, 0, reader=0) is v0
    assert state.held_versions(0) == [0, 1]
    state.release(1)  # client 1 rejoined: it adopts the current value
    assert state.held_versions(0) == [1]
    with pytest.raises(Superseded):
        state.value_at(0, 0, reader=1)
    assert state.value_at(0, 1) is v1


def test_global_state_bounds_versions_held_for_a_reader_that_never_comes():
    state = GlobalState(initial(1), max_old=2)
    for t in range(6):
        state.install(t, 0, {"b0.w": torch.full((3,), float(t), dtype=torch.float64)}, readers=[0, 1])
        state.value_at(0, t, reader=0)
    assert state.held_versions(0) == [3, 4, 5]


def test_a_non_finite_aggregate_keeps_the_previous_global():
    state = GlobalState(initial(1))
    before = state.values[0]
    problem = state.install(0, 0, {"b0.w": torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float64)})
    assert "not finite" in problem
    assert state.values[0] is before and state.versions[0] == 0


# ---------------------------------------------------------------------------------------------------- server optimizers


def two_rounds(optimizer):
    """Two rounds of one block, two clients sending deltas; returns the global after each round."""
    g = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    out = []
    for r, deltas in enumerate(([0.5, 0.25, -1.0], [0.125, -0.5, 2.0])):
        step = RoundStep(r, 0, optimizer=optimizer)
        step.add({"w": torch.tensor(deltas, dtype=torch.float64)}, 1.0, "delta")
        step.add({"w": torch.tensor(deltas, dtype=torch.float64) * 3}, 3.0, "delta")
        g = step.close(g)
        out.append(g["w"].clone())
    return out


def test_server_sgd_with_lr_1_is_fedavg_bitwise():
    """sgd, lr 1: the exact weighted mean of value updates (the accumulator's own path), bitwise."""
    g = {"w": torch.tensor([0.1, 0.2, 0.3])}
    a, b = RoundStep(0, 0), RoundStep(0, 0, optimizer=make_server_optimizer("sgd", lr=1.0))
    for step in (a, b):
        step.add({"w": torch.tensor([0.7, 0.3, 0.9])}, 3.0, "value")
        step.add({"w": torch.tensor([0.1, 0.5, 0.2])}, 5.0, "value")
    assert torch.equal(a.close(g)["w"], b.close(g)["w"])


def test_server_optimizers_follow_reddi_et_al():
    """x_{t+1} = x_t + η m_t / (√v_t + τ) with FedAdam, FedYogi, FedAdagrad's v; FedAvgM's m; written out here."""
    lr, b1, b2, tau = 0.5, 0.9, 0.99, 1e-3
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    d = [torch.tensor(v, dtype=torch.float64) * (1 + 9) / 4 for v in ([0.5, 0.25, -1.0], [0.125, -0.5, 2.0])]  # weighted means
    for name in ("momentum", "adam", "yogi", "adagrad"):
        got = two_rounds(make_server_optimizer(name, lr=lr, betas=(b1, b2), tau=tau))
        x, m, v = x0.clone(), torch.zeros(3, dtype=torch.float64), torch.full((3,), tau**2, dtype=torch.float64)
        for t, delta in enumerate(d):
            if name == "momentum":
                m = b1 * m + delta
                x = x + lr * m
            else:
                m = b1 * m + (1 - b1) * delta
                if name == "adam":
                    v = b2 * v + (1 - b2) * delta**2
                elif name == "yogi":
                    v = v - (1 - b2) * delta**2 * torch.sign(v - delta**2)
                else:
                    v = v + delta**2
                x = x + lr * m / (v.sqrt() + tau)
            torch.testing.assert_close(got[t], x, rtol=1e-12, atol=1e-12, msg=f"{name} round {t}")


def test_server_optimizer_state_round_trips_through_tensors():
    opt = make_server_optimizer("adam", lr=0.5)
    two_rounds(opt)
    saved = opt.state_tensors()
    assert set(saved) == {"0/w/m", "0/w/v"}
    again = make_server_optimizer("adam", lr=0.5)
    again.load_state_tensors(saved)
    assert all(torch.equal(again.state[0]["w"][k], opt.state[0]["w"][k]) for k in ("m", "v"))
    with pytest.raises(AlgorithmError, match="unknown server optimizer"):
        make_server_optimizer("lamb")


def test_cyclic_assigns_client_i_in_epoch_e_its_block_and_visits_clients_in_turn():
    """DESIGN §1.1 Cyclic: round t is client t mod N's turn in its epoch t // N; ascending (i + e) mod M."""
    schedule, turns = cyclic_assignment("ascending", clients=3, num_blocks=4, rounds=7)
    assert [c for (c,) in turns] == [0, 1, 2, 0, 1, 2, 0]
    assert schedule == [0, 1, 2, 1, 2, 3, 2]
    down, _ = cyclic_assignment("descending", clients=3, num_blocks=4, rounds=4)
    assert down == [3, 2, 1, 2]
    rand, _ = cyclic_assignment("random", clients=2, num_blocks=3, rounds=6, seed=1)
    assert sorted(rand[0::2]) == [0, 1, 2] and sorted(rand[1::2]) == [0, 1, 2]  # no repeat inside M epochs
    with pytest.raises(AlgorithmError):
        make_plan("cyclic", num_blocks=4, rounds=4, clients=3, clients_per_round=2)


def test_a_cyclic_client_fetches_only_before_its_turn():
    """Skipped rounds fetch nothing except the one right before the client's turn; then it catches up once."""
    plan = make_plan("cyclic", num_blocks=4, rounds=6, clients=3)
    core = ClientCore(plan, 2, initial(4))
    assert core.skip() is None  # round 0 (client 0's): nothing to fetch yet
    update = core.skip()  # round 1 (client 1's) comes right before client 2's turn: wait for it
    assert update is not None and update.round == 1 and update.kind == "none"
    assert core.awaiting() == [1] and core.catching_up
    core.apply(1, 1, initial(4)[plan.schedule[1]])
    with pytest.raises(AlgorithmError, match="changed since its last turn"):
        core.begin()
    core.caught_up()
    assert core.begin().block == plan.schedule[2]
