from __future__ import annotations

import pytest
import torch

from pl_parablock.core.aggregate import RoundAccumulator
from pl_parablock.core.client import rebase


def test_rebase_adds_local_progress_to_the_aggregate():
    end = torch.tensor([1.0, 2.0])
    local = torch.tensor([1.5, 1.0])  # progress since hand-off: +0.5, -1.0
    new_global = torch.tensor([10.0, 20.0])
    assert torch.equal(rebase(local, end, new_global), torch.tensor([10.5, 19.0]))


def test_rebase_without_progress_is_the_aggregate_bitwise():
    g = torch.randn(1000)
    e = torch.randn(1000)
    assert torch.equal(rebase(e.clone(), e, g), g)


def test_one_value_update_comes_out_bitwise():
    e = {"w": torch.randn(257, 33), "b": torch.randn(33).to(torch.bfloat16)}
    acc = RoundAccumulator()
    acc.add(e, 37.0, "value")
    out = acc.finish({"w": torch.zeros(257, 33), "b": torch.zeros(33, dtype=torch.bfloat16)})
    assert torch.equal(out["w"], e["w"]) and torch.equal(out["b"], e["b"]) and out["b"].dtype == torch.bfloat16


@pytest.mark.parametrize("n,weight", [(2, 8.0), (3, 1000.0), (7, 123.0)])
def test_identical_updates_average_to_themselves_bitwise(n, weight):
    e = {"w": torch.randn(4096)}
    acc = RoundAccumulator()
    for _ in range(n):
        acc.add(e, weight, "value")
    assert torch.equal(acc.finish({"w": torch.zeros(4096)})["w"], e["w"])


def test_weighted_mean_of_values():
    acc = RoundAccumulator()
    acc.add({"w": torch.tensor([1.0, 0.0])}, 1.0, "value")
    acc.add({"w": torch.tensor([4.0, 3.0])}, 2.0, "value")
    assert torch.allclose(acc.finish({"w": torch.zeros(2)})["w"], torch.tensor([3.0, 2.0]))


def test_server_lr_scales_the_mean_delta():
    g = {"w": torch.tensor([1.0, 1.0])}
    acc = RoundAccumulator()
    acc.add({"w": torch.tensor([3.0, 1.0])}, 1.0, "value")  # delta (2, 0)
    acc.add({"w": torch.tensor([0.0, 2.0])}, 1.0, "delta")
    # mean delta = (1, 1); g + 0.5 * (1, 1)
    assert torch.allclose(acc.finish(g, server_lr=0.5)["w"], torch.tensor([1.5, 1.5]))
    assert torch.equal(g["w"], torch.tensor([1.0, 1.0])), "the current global must not be modified"


def test_deltas_alone():
    acc = RoundAccumulator()
    acc.add({"w": torch.tensor([1.0])}, 3.0, "delta")
    acc.add({"w": torch.tensor([-1.0])}, 1.0, "delta")
    assert torch.allclose(acc.finish({"w": torch.tensor([10.0])})["w"], torch.tensor([10.5]))


def test_bad_inputs():
    acc = RoundAccumulator()
    with pytest.raises(ValueError):
        acc.finish({"w": torch.zeros(1)})
    with pytest.raises(ValueError):
        acc.add({"w": torch.zeros(1)}, 0.0, "value")
    with pytest.raises(ValueError):
        acc.add({"w": torch.zeros(1)}, 1.0, "sideways")


def test_pieces_add_up_to_the_whole_tensor_bitwise():
    from pl_parablock.core.aggregate import PIECE_ELEMS, pieces_of

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(PIECE_ELEMS + 999, generator=gen) for _ in range(3)]
    current = {"w": torch.zeros(PIECE_ELEMS + 999)}
    whole, piecewise = RoundAccumulator(), RoundAccumulator()
    for i, x in enumerate(xs):
        whole.add({"w": x}, float(i + 1), "value")
        piecewise.add_pieces(reversed(list(pieces_of({"w": x}))), float(i + 1), "value")  # any piece order
    assert torch.equal(whole.finish(current)["w"], piecewise.finish(current)["w"])
    with pytest.raises(ValueError, match="aligned"):
        RoundAccumulator().add_pieces([("w", 5, torch.zeros(3))], 1.0, "value")
