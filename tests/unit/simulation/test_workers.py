"""The pieces of the simulator's worker processes that need no process: the client map, a round's sums handed on, messages.

The chain that adds a round's updates across workers rests on two facts
pinned here: a :class:`ServerRound` exported after some updates and resumed
elsewhere ends bitwise where one step that added them all ends (also
through the message encoding the workers send), and adding the same
updates as per-worker partial sums does not (float64 addition is not
associative), which is why the workers pass the sums along instead.
"""

from __future__ import annotations

import itertools
import queue
import threading

import pytest
import torch

from pl_parablock.core.aggregate import rule_of
from pl_parablock.core.codecs import NO_COMPRESSION
from pl_parablock.core.tensors import digest
from pl_parablock.errors import ConfigError, DataError, FederationError
from pl_parablock.recipe.load import load_recipe
from pl_parablock.server.validation import MAX_WEIGHT, UpdateLimits
from pl_parablock.simulation.aggregation import ServerRound
from pl_parablock.simulation.workers import Placement, Workers, _empty, _filled, _raise, _skeleton, _tensors, _wire_error, owner_of


def test_the_client_map_is_contiguous_and_balanced():
    for clients, workers in [(5, 2), (1000, 3), (7, 7), (10, 4)]:
        owners = [owner_of(i, workers, clients) for i in range(clients)]
        assert owners == sorted(owners) and set(owners) == set(range(workers))
        counts = [owners.count(w) for w in range(workers)]
        assert max(counts) - min(counts) <= 1


def _updates(n: int, seed: int = 0) -> list[tuple[dict[str, torch.Tensor], float]]:
    g = torch.Generator().manual_seed(seed)
    # values of very different magnitudes, so that the float64 sums round
    return [
        ({"w": torch.randn(64, 8, generator=g) * 10.0 ** (i % 7 - 3), "b": torch.randn(8, generator=g)}, float(3 + 5 * i)) for i in range(n)
    ]


def _round(rule: str = "mean", clip: float | None = None) -> ServerRound:
    limits = UpdateLimits("samples", MAX_WEIGHT, None, clip, NO_COMPRESSION)
    return ServerRound(0, [0], rule=rule_of(rule), limits=limits)


def _through_the_wire(state):
    """What the next worker receives: the message's skeleton and fresh copies of its tensors."""
    return _filled(_skeleton(state), [t.clone() for t in _tensors(state)])


@pytest.mark.parametrize(("rule", "clip", "kind"), [("mean", None, "value"), ("mean", 0.5, "value"), ("median", None, "delta")])
def test_a_round_handed_on_between_workers_ends_bitwise_where_one_step_ends(rule, clip, kind):
    current = {"w": torch.zeros(64, 8), "b": torch.zeros(8)}
    ups = _updates(9)
    one = _round(rule, clip)
    for i, (t, w) in enumerate(ups):
        one.add(i, 0, t, w, kind, "none", current)
    expected = one.close(0, current)

    cuts = [0, 4, 7, 9]  # three workers' runs of clients, in client order
    step = _round(rule, clip)
    for a, b in itertools.pairwise(cuts):
        for i in range(a, b):
            step.add(i, 0, *ups[i], kind, "none", current)
        state = _through_the_wire(step.export())
        step = _round(rule, clip)
        step.resume(state)
    assert digest(step.close(0, current)) == digest(expected)
    assert step.clipped == one.clipped and (clip is None or step.clipped)


def test_partial_sums_per_worker_are_not_the_one_process_sums():
    """The wrong design the chain avoids: each worker sums its own clients, then the partial sums are added."""
    current = {"w": torch.zeros(64, 8), "b": torch.zeros(8)}
    g = torch.Generator().manual_seed(1)
    ups = [({n: torch.randn(t.shape, generator=g) * 10.0 ** (3 * (i % 7) - 9) for n, t in current.items()}, 3.0 + i) for i in range(9)]
    one = _round()
    for i, (t, w) in enumerate(ups):
        one.add(i, 0, t, w, "value", "none", current)
    parts = []
    for a, b in [(0, 4), (4, 9)]:
        part = _round()
        for i in range(a, b):
            part.add(i, 0, *ups[i], "value", "none", current)
        parts.append(part.export()["sums"][0]["values"])
    sums = one.export()["sums"][0]["values"]
    assert not torch.equal(parts[0]["w"][0] + parts[1]["w"][0], sums["w"][0])


def test_a_message_keeps_its_structure_and_its_tensors_bitwise():
    value = {3: {"x": torch.randn(5, dtype=torch.float64), "n": [1, "a", (torch.arange(4), None)]}, "e": 2.5}
    skeleton = _skeleton(value)
    tensors = _tensors(value)
    received = _empty(skeleton)
    for r, t in zip(received, tensors):
        r.copy_(t)
    back = _filled(skeleton, received)
    assert torch.equal(back[3]["x"], value[3]["x"]) and back[3]["x"].dtype == torch.float64
    assert back[3]["n"][:2] == [1, "a"] and torch.equal(back[3]["n"][2][0], torch.arange(4)) and back["e"] == 2.5


def test_an_error_travels_with_its_kind_and_names_the_worker():
    for exc in (FederationError("client 3: refused"), DataError("bad row"), ConfigError("`x` is wrong")):
        with pytest.raises(type(exc)) as caught:
            _raise(_wire_error(exc, 1))
        assert str(exc) in str(caught.value) and "(on worker 1)" in str(caught.value)


def test_workers_are_checked_against_the_clients():
    assert load_recipe(None, ["simulation.workers=2"]).simulation.workers == 2
    with pytest.raises(ConfigError, match=r"simulation.workers.*must be >= 1"):
        load_recipe(None, ["simulation.workers=0"])
    with pytest.raises(ConfigError, match=r"`simulation.workers` is 9 but there are 4 clients"):
        load_recipe(None, ["simulation.workers=9", "federation.clients=4"])
    with pytest.raises(ConfigError, match="simulation.worker_timeout_s"):
        load_recipe(None, ["simulation.worker_timeout_s=0"])
    with pytest.raises(ConfigError, match=r"simulation.placement.*balanced.*fixed"):
        load_recipe(None, ["simulation.placement=even"])


class _Loopback(Workers):
    """Workers whose messages go through in-memory queues (one thread per rank), with the wire's encoding."""

    def __init__(self, rank: int, size: int, queues: dict) -> None:
        super().__init__(rank, size, torch.device("cpu"))
        self.queues = queues

    def _send(self, dst, value, error):
        self.queues[(self.rank, dst)].put((_through_the_wire(value), error))
        return 0

    def _receive(self, src):
        return self.queues[(src, self.rank)].get(timeout=30)


def _chain_on_threads(size: int, runs, add_of) -> dict[int, object]:
    """``Workers.chain`` on ``size`` ranks, one thread each, through in-memory queues; each rank's result."""
    queues = {(a, b): queue.Queue() for a in range(size) for b in range(size)}
    out: dict[int, object] = {}

    def worker(rank: int) -> None:
        out[rank] = _Loopback(rank, size, queues).chain(runs, _round, add_of(rank))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(q.empty() for q in queues.values()), "a message was sent that nobody received"
    return out


def _rounding_updates():
    current = {"w": torch.zeros(64, 8), "b": torch.zeros(8)}
    g = torch.Generator().manual_seed(1)
    ups = [({n: torch.randn(t.shape, generator=g) * 10.0 ** (i % 5 - 4) for n, t in current.items()}, 3.0 + i % 4) for i in range(9)]
    big = {n: torch.randn(t.shape, generator=g) * 1e9 for n, t in current.items()}
    # client 0's and client 8's large values cancel in the mean: how the float64 sums rounded between them shows in float32
    ups[0] = ({n: big[n] + ups[0][0][n] for n in big}, ups[0][1])
    ups[8] = ({n: ups[8][0][n] - big[n] for n in big}, ups[8][1])
    return current, ups


@pytest.mark.parametrize(
    "trainers",
    [
        [0, 0, 0, 1, 1, 1, 2, 2, 2],  # one run per worker, rank 0 first
        [1, 1, 0, 0, 2, 2, 0, 1, 2],  # a worker's clients in two runs; the last run on another worker than rank 0
        [2, 2, 2, 1, 1, 1, 0, 0, 0],  # rank 0 last
    ],
)
def test_the_workers_chain_adds_a_round_in_client_order_bitwise(trainers):
    """Three workers, each adding its runs of the round's clients, end bitwise where one process ends."""
    current, ups = _rounding_updates()
    on_time = [0, 1, 2, 4, 5, 7, 8]  # client 3 and 6 late
    runs: list[tuple[int, list[int]]] = []
    for i in on_time:
        if runs and runs[-1][0] == trainers[i]:
            runs[-1][1].append(i)
        else:
            runs.append((trainers[i], [i]))

    def add_of(rank):
        def add(step: ServerRound, run) -> None:
            assert all(trainers[i] == rank for i in run)
            for i in run:
                step.add(i, 0, *ups[i], "value", "none", current)

        return add

    out = _chain_on_threads(3, runs, add_of)
    step, error = out[0]
    assert error is None and all(out[r] == (None, None) for r in (1, 2))
    wanted = _round()
    for i in on_time:
        wanted.add(i, 0, *ups[i], "value", "none", current)
    assert digest(step.close(0, current)) == digest(wanted.close(0, current))


def test_an_error_in_the_chain_reaches_rank_0_and_nothing_is_added_after_it():
    runs = [(1, [0, 1]), (2, [2]), (1, [3])]
    added: list[int] = []

    def add_of(rank):
        def add(step: ServerRound, run) -> None:
            if rank == 2:
                raise FederationError("client 2: refused")
            added.extend(run)

        return add

    out = _chain_on_threads(3, runs, add_of)
    assert out[0][1] is not None and "client 2: refused (on worker 2)" in out[0][1][1]
    assert added == [0, 1]


def _layout(placement: Placement, clients: int) -> list[int]:
    return [placement.holder[i] for i in range(clients)]


def test_a_round_is_dealt_evenly_in_client_order_and_clients_in_flight_stay():
    p = Placement(1000, 2, window=1)
    assert _layout(p, 1000) == [owner_of(i, 2, 1000) for i in range(1000)]
    sample = [3, 40, 100, 250, 300, 420, 480, 700, 900, 950]  # seven of the ten held by worker 0
    moves = p.place(0, sample)
    assert [p.trainer[i] for i in sample] == [0] * 5 + [1] * 5
    assert moves == [(420, 0, 1), (480, 0, 1)] and p.holder[480] == 1
    assert p.runs([3, 480, 40, 900]) == [(0, [3, 40]), (1, [480, 900])]
    # round 1: 480 and 700 were sampled in round 0 too (a round in flight): they stay where they trained
    moves = p.place(1, [0, 1, 2, 480, 700, 5, 6])
    assert p.trainer[480] == 1 and p.trainer[700] == 1
    assert sorted(p.trainer[i] for i in [0, 1, 2, 5, 6]) == [0, 0, 0, 0, 1]  # four on worker 0, two + one on worker 1
    assert [(i, a, b) for i, a, b in moves] == [(6, 0, 1)]
    # a client not sampled for `window` rounds has nothing in flight: it can move again
    p.place(2, [10])
    moves = p.place(3, [480, 990])
    assert p.trainer[480] == 0 and moves[0] == (480, 1, 0)


@pytest.mark.parametrize(("clients", "workers", "window"), [(1000, 2, 1), (50, 3, 2), (10, 4, 1), (6, 2, 1)])
def test_every_round_is_balanced_and_every_copy_of_the_placement_agrees(clients, workers, window):
    g = torch.Generator().manual_seed(clients)
    a, b = Placement(clients, workers, window), Placement(clients, workers, window)
    held_by = {i: owner_of(i, workers, clients) for i in range(clients)}
    last: dict[int, int] = {}
    for t in range(200):
        k = int(torch.randint(1, min(clients, 12) + 1, (1,), generator=g))
        sample = sorted(torch.randperm(clients, generator=g)[:k].tolist())
        in_flight = {i for i in sample if i in last and t - last[i] <= window}  # its core lives on: it must stay
        moves = a.place(t, sample)
        assert b.place(t, list(reversed(sample))) == moves and a.trainer == b.trainer
        for i, src, dst in moves:
            assert held_by[i] == src and src != dst and i not in in_flight
            held_by[i] = dst
        assert all(held_by[i] == a.trainer[i] for i in sample)
        loads = [sum(a.trainer[i] == w for i in sample) for w in range(workers)]
        pinned = [sum(a.trainer[i] == w for i in sample if i in in_flight) for w in range(workers)]
        # the most loaded worker has no more than an even share, unless clients in flight alone put it there
        assert max(loads) <= max(-(-k // workers), max(pinned)), (t, loads, pinned)
        for i in sample:
            last[i] = t


def test_a_fixed_placement_keeps_every_client_where_it_started():
    p = Placement(1000, 2, window=1, balanced=False)
    sample = [3, 40, 100, 250, 300, 420, 480, 700, 900, 950]
    assert p.place(0, sample) == [] and p.place(1, [480, 481, 999]) == []
    assert all(p.trainer[i] == owner_of(i, 2, 1000) for i in [480, 481, 999])
    assert p.runs([999, 480, 481]) == [(0, [480, 481]), (1, [999])]
