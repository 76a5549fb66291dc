"""Client sampling (``federation.clients_per_round``): a fresh seeded draw of ``per_round`` clients in every round.

Written out: round ``t``'s participants are ``per_round`` distinct clients
drawn uniformly without replacement, independently of the other rounds.
So over many rounds each client takes part in about ``per_round / clients``
of them, the sets vary from round to round (two independent draws of 3 of
10 clients coincide with probability 1/120), and every pair of clients
meets about as often as uniform draws make it. The bounds below are five
standard deviations or more wide and the plans are seeded, so the test is
deterministic and not fragile; a sample drawn once and reused breaks every
one of them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from math import comb, sqrt

import pytest

from pl_parablock.core.plan import make_plan


def check_fresh_draws(participants, clients: int, per_round: int) -> None:
    rounds = len(participants)
    sets = [tuple(p) for p in participants]
    for t, p in enumerate(sets):
        assert len(p) == per_round and len(set(p)) == per_round, f"round {t}: {p}"
        assert all(0 <= c < clients for c in p), f"round {t}: {p}"
    # each client: Binomial(rounds, per_round / clients)
    q = per_round / clients
    mean, sd = rounds * q, sqrt(rounds * q * (1 - q))
    counts = Counter(c for p in sets for c in p)
    for c in range(clients):
        assert abs(counts[c] - mean) <= 5 * sd + 1, f"client {c} took part in {counts[c]} of {rounds} rounds (expected about {mean:.0f})"
    # the sets vary: many distinct ones, few rounds equal to the one before
    possible = comb(clients, per_round)
    expected_distinct = possible * (1 - (1 - 1 / possible) ** rounds)
    assert len(set(sets)) >= expected_distinct / 2, f"{len(set(sets))} distinct sets in {rounds} rounds"
    repeats = sum(a == b for a, b in itertools.pairwise(sets))
    assert repeats <= (rounds - 1) / possible + 5 * sqrt((rounds - 1) / possible) + 2, f"{repeats} rounds repeat the previous set"
    # every pair of clients meets about rounds * P(both) times
    both = per_round * (per_round - 1) / (clients * (clients - 1))
    pairs = Counter(pair for p in sets for pair in itertools.combinations(sorted(p), 2))
    for pair in itertools.combinations(range(clients), 2):
        m, s = rounds * both, sqrt(rounds * both * (1 - both))
        assert abs(pairs[pair] - m) <= 5 * s + 1, f"clients {pair} met {pairs[pair]} times (expected about {m:.0f})"


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("mode", ["parablock", "sync", "fedavg"])
def test_every_round_draws_its_own_sample(mode, seed):
    clients, per_round, rounds = 10, 3, 400
    plan = make_plan(mode, num_blocks=1 if mode == "fedavg" else 4, rounds=rounds, seed=seed, clients=clients, clients_per_round=per_round)
    assert plan.participants is not None and len(plan.participants) == rounds
    check_fresh_draws(plan.participants, clients, per_round)
    for t in (0, 1, rounds - 1):  # the plan's per-client answer is the round's set
        for c in range(clients):
            assert plan.participates(c, t) == (c in plan.participants[t])


def test_the_sample_is_seeded():
    a = make_plan("parablock", num_blocks=4, rounds=50, seed=5, clients=8, clients_per_round=2)
    b = make_plan("parablock", num_blocks=4, rounds=50, seed=5, clients=8, clients_per_round=2)
    c = make_plan("parablock", num_blocks=4, rounds=50, seed=6, clients=8, clients_per_round=2)
    assert a.participants == b.participants
    assert a.participants != c.participants


def test_one_client_per_round_still_varies():
    plan = make_plan("sync", num_blocks=3, rounds=300, seed=2, clients=5, clients_per_round=1)
    check_fresh_draws(plan.participants, 5, 1)


def test_no_sampling_means_everyone_every_round():
    for per_round in (None, 4, 6):
        plan = make_plan("parablock", num_blocks=3, rounds=20, seed=0, clients=4, clients_per_round=per_round)
        assert all(plan.participates(c, t) for c in range(4) for t in range(20))
