"""The recipe's server settings reach the server: ``federation.server_optimizer`` (name, lr, betas, tau) and sampling.

Each test builds the recipe with :func:`~pl_parablock.recipe.schema.load_recipe`,
the server from it as the launcher does (:func:`pl_parablock.fit._aggregator`),
joins two clients with a small hand-made model, and pushes known deltas
through the server's own entry points (``join``, ``set_initial_state``,
``submit``, ``wait_round``, ``block_value``). The expected global is the
FedOpt equation (Reddi et al., *Adaptive Federated Optimization*; DESIGN
§1 and §1.1) written out here in float64, with this project's documented
conventions: ``Δ_agg = Σ w_i Δ_i / Σ w_i``; ``m`` starts at 0 and ``v`` at
``τ²``; no bias correction; the global is kept in the parameters' dtype
(float32) after every round. A recipe value the server drops (its lr, a
beta, tau) changes the result far beyond the tolerance.
"""

from __future__ import annotations

import itertools
from collections import Counter
from math import comb, sqrt

import pytest
import torch

from pl_parablock.fit import _aggregator
from pl_parablock.recipe.load import load_recipe

SHAPES = {"l0.w": (2, 3), "l1.w": (4,)}
BLOCK_OF = {"l0.w": 0, "l1.w": 1}
WEIGHTS = {0: 1.0, 1: 3.0}  # samples seen in a round (within the recipe's bound, local_steps x batch_size = 8)
SCALE = [1.0, 0.02, 2.0, 0.05, 0.5, 0.01]  # per round: deltas of very different sizes (yogi's sign(v − Δ²) flips)


def initial() -> dict[str, torch.Tensor]:
    return {n: torch.linspace(-1.0, 1.0, int(torch.tensor(s).prod())).reshape(s).to(torch.float32) for n, s in SHAPES.items()}


def fingerprint(mode: str) -> dict:
    return {
        "mode": mode,
        "partition": [{"name": "layers.0", "params": ["l0.w"]}, {"name": "layers.1", "params": ["l1.w"]}],
        "tensors": {n: {"dtype": "float32", "shape": list(s), "nbytes": 4 * int(torch.tensor(s).prod())} for n, s in SHAPES.items()},
        "hash": "hand-made",
    }


def delta(client: int, t: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * t + 10 * client + BLOCK_OF[name])
    return (torch.randn(SHAPES[name], generator=gen) * SCALE[t % len(SCALE)]).to(torch.float32)


def recipe_of(tmp_path, *overrides: str):
    return load_recipe(
        None,
        [
            "mode=sync",
            "seed=0",
            "train.local_steps=2",
            "train.batch_size=4",
            "federation.clients=2",
            "federation.rounds=6",
            "federation.timeout_s=30",
            f"output_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def run_server(recipe) -> dict[int, dict[str, torch.Tensor]]:
    """Push :func:`delta` of both clients in every round through the recipe's server; the global after each round."""
    agg = _aggregator(recipe, False)
    try:
        reply = agg.join(0, fingerprint(recipe.mode), 5.0)
        assert reply["need_state"]
        agg.set_initial_state(0, initial())
        agg.join(1, fingerprint(recipe.mode), 5.0)
        schedule = reply["schedule"]
        assert schedule == [0, 1, 0, 1, 0, 1]
        after = {}
        for t, block in enumerate(schedule):
            names = [n for n in SHAPES if BLOCK_OF[n] == block]
            version = agg.versions()[block]
            for c in (0, 1):
                header = {"client_id": c, "round": t, "block": block, "kind": "delta", "base_version": version, "weight": WEIGHTS[c]}
                answer = agg.submit(header, {n: delta(c, t, n) for n in names})
                assert answer["status"] == "accepted", answer
            assert agg.wait_round(t, 10.0)
            v, values = agg.block_value(block)
            assert v == t
            after[t] = {n: values[n].clone() for n in names}
        return after
    finally:
        agg.shutdown()


def mean_delta(t: int, name: str) -> torch.Tensor:
    total = sum(WEIGHTS.values())
    return sum(WEIGHTS[c] * delta(c, t, name).double() for c in (0, 1)) / total


def written_out(update) -> dict[int, dict[str, torch.Tensor]]:
    """The global after each round when every round applies ``x ← update(name, x, Δ_agg)`` (float64, kept as float32)."""
    x = initial()
    after = {}
    for t in range(6):
        block = t % 2
        names = [n for n in SHAPES if BLOCK_OF[n] == block]
        for n in names:
            x[n] = update(n, x[n].double(), mean_delta(t, n)).to(torch.float32)
        after[t] = {n: x[n].clone() for n in names}
    return after


def assert_same(got, want) -> None:
    for t in want:
        for n in want[t]:
            assert torch.allclose(got[t][n], want[t][n], rtol=1e-6, atol=1e-7), f"round {t}, {n}: {got[t][n]} != {want[t][n]}"


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        (["federation.server_optimizer.name=sgd", "federation.server_optimizer.lr=0.5"], 0.5),
        # the optimizer's own lr wins over federation.server_lr
        (["federation.server_optimizer.name=sgd", "federation.server_optimizer.lr=0.5", "federation.server_lr=2.0"], 0.5),
        # an optimizer lr left null falls back to federation.server_lr
        (["federation.server_optimizer.name=sgd", "federation.server_lr=0.25"], 0.25),
    ],
    ids=["optimizer-lr", "optimizer-lr-over-server-lr", "server-lr-fallback"],
)
def test_the_recipes_server_sgd_lr_scales_the_mean_delta(tmp_path, overrides, lr):
    got = run_server(recipe_of(tmp_path, *overrides))
    want = written_out(lambda n, x, d: x + lr * d)  # g' = g + η Σ w Δ / Σ w
    assert_same(got, want)


def fedopt(kind: str, lr: float, b1: float, b2: float, tau: float):
    """FedAdam / FedYogi per tensor, from ``m = 0``, ``v = τ²``, without bias correction.

    ``m ← β1 m + (1−β1) Δ``; ``v ← β2 v + (1−β2) Δ²`` (adam) or
    ``v ← v − (1−β2) Δ² sign(v − Δ²)`` (yogi); ``x ← x + η m / (√v + τ)``.
    """
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}

    def update(name: str, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        m0 = m.get(name, torch.zeros_like(x))
        v0 = v.get(name, torch.full_like(x, tau**2))
        m[name] = b1 * m0 + (1 - b1) * d
        if kind == "adam":
            v[name] = b2 * v0 + (1 - b2) * d * d
        else:
            v[name] = v0 - (1 - b2) * d * d * torch.sign(v0 - d * d)
        return x + lr * m[name] / (torch.sqrt(v[name]) + tau)

    return update


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_the_recipes_adaptive_server_optimizer_uses_its_betas_and_tau(tmp_path, kind):
    lr, b1, b2, tau = 0.3, 0.5, 0.75, 0.05
    recipe = recipe_of(
        tmp_path,
        f"federation.server_optimizer.name={kind}",
        f"federation.server_optimizer.lr={lr}",
        f"federation.server_optimizer.betas=[{b1},{b2}]",
        f"federation.server_optimizer.tau={tau}",
    )
    got = run_server(recipe)
    assert_same(got, written_out(fedopt(kind, lr, b1, b2, tau)))
    # the case tells the settings apart: the defaults (betas 0.9, 0.99, tau 1e-3) give another global
    for other in (fedopt(kind, lr, 0.9, b2, tau), fedopt(kind, lr, b1, 0.99, tau), fedopt(kind, lr, b1, b2, 1e-3)):
        far = written_out(other)
        assert any(not torch.allclose(got[t][n], far[t][n], rtol=1e-3, atol=1e-4) for t in far for n in far[t])


def test_yogi_and_adam_differ_here():
    """The deltas make yogi's second moment both grow and shrink, so yogi is not adam in disguise on this data."""
    signs = set()
    v = {n: torch.full(SHAPES[n], 0.05**2, dtype=torch.float64) for n in SHAPES}
    for t in range(6):
        for n in [n for n in SHAPES if BLOCK_OF[n] == t % 2]:
            d2 = mean_delta(t, n) ** 2
            signs.update(torch.sign(v[n] - d2).unique().tolist())
            v[n] = v[n] - 0.25 * d2 * torch.sign(v[n] - d2)
    assert {-1.0, 1.0} <= signs


def test_the_servers_sample_is_drawn_afresh_every_round(tmp_path):
    clients, per_round, rounds = 6, 2, 240
    recipe = recipe_of(
        tmp_path, f"federation.clients={clients}", f"federation.clients_per_round={per_round}", f"federation.rounds={rounds}"
    )
    agg = _aggregator(recipe, False)
    try:
        participants = agg.join(0, fingerprint(recipe.mode), 5.0)["participants"]
    finally:
        agg.shutdown()
    assert participants is not None and len(participants) == rounds
    sets = [tuple(sorted(p)) for p in participants]
    assert all(len(set(p)) == per_round and all(0 <= c < clients for c in p) for p in sets)
    q = per_round / clients
    counts = Counter(c for p in sets for c in p)
    for c in range(clients):
        assert abs(counts[c] - rounds * q) <= 5 * sqrt(rounds * q * (1 - q)) + 1, counts
    assert len(set(sets)) >= comb(clients, per_round) - 2  # 15 possible pairs; 240 fresh draws meet nearly all
    pairs = Counter(sets)
    for pair in itertools.combinations(range(clients), per_round):
        assert pairs[pair] <= 4 * rounds / comb(clients, per_round), pairs


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_the_recipes_server_sgd_lr_scales_a_robust_aggregate(tmp_path, aggregation):
    """Found by this test: a robust rule stepped by ``federation.server_lr``, ignoring ``server_optimizer.lr``."""
    sgd = ["federation.server_optimizer.name=sgd", "federation.server_optimizer.lr=0.5"]
    got = run_server(recipe_of(tmp_path, *sgd, f"federation.aggregation={aggregation}"))
    # two clients: the median and the (nothing-trimmed) trimmed mean are both the unweighted mean of the two deltas
    x, want = initial(), {}
    for t in range(6):
        names = [n for n in SHAPES if BLOCK_OF[n] == t % 2]
        for n in names:
            d = (delta(0, t, n).double() + delta(1, t, n).double()) / 2
            x[n] = (x[n].double() + 0.5 * d).to(torch.float32)
        want[t] = {n: x[n].clone() for n in names}
    assert_same(got, want)
