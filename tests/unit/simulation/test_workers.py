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
from pl_parablock.simulation.workers import Workers, _empty, _filled, _raise, _skeleton, _tensors, _wire_error, owner_of


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


class _Loopback(Workers):
    """Workers whose messages go through in-memory queues (one thread per rank), with the wire's encoding."""

    def __init__(self, rank: int, size: int, clients: int, queues: dict) -> None:
        super().__init__(rank, size, clients, torch.device("cpu"))
        self.queues = queues

    def _send(self, dst, value, error):
        self.queues[(self.rank, dst)].put((_through_the_wire(value), error))

    def _receive(self, src):
        return self.queues[(src, self.rank)].get(timeout=30)


def test_the_workers_chain_adds_a_round_in_client_order_bitwise():
    """Three workers, each adding its contiguous run of the round's clients, end bitwise where one process ends."""
    current = {"w": torch.zeros(64, 8), "b": torch.zeros(8)}
    g = torch.Generator().manual_seed(1)
    ups = [({n: torch.randn(t.shape, generator=g) * 10.0 ** (i % 5 - 4) for n, t in current.items()}, 3.0 + i % 4) for i in range(9)]
    big = {n: torch.randn(t.shape, generator=g) * 1e9 for n, t in current.items()}
    # client 0's and client 8's large values cancel in the mean: how the float64 sums rounded between them shows in float32
    ups[0] = ({n: big[n] + ups[0][0][n] for n in big}, ups[0][1])
    ups[8] = ({n: ups[8][0][n] - big[n] for n in big}, ups[8][1])

    size, on_time = 3, [0, 1, 2, 4, 5, 7, 8]  # client 3 and 6 late: worker 1 holds one of its three
    queues = {(a, b): queue.Queue() for a in range(size) for b in range(size)}
    holders = sorted({owner_of(i, size, len(ups)) for i in on_time})
    out: dict[int, object] = {}

    def worker(rank: int) -> None:
        w = _Loopback(rank, size, len(ups), queues)

        def add(step: ServerRound) -> None:
            for i in on_time:
                if w.owns(i):
                    step.add(i, 0, *ups[i], "value", "none", current)

        out[rank] = w.chain(holders, _round, add)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    step, error = out[0]
    assert error is None and all(out[r] == (None, None) for r in (1, 2))
    wanted = _round()
    for i in on_time:
        wanted.add(i, 0, *ups[i], "value", "none", current)
    assert digest(step.close(0, current)) == digest(wanted.close(0, current))
