"""A client's resumable state: what error feedback dropped survives a checkpoint (DESIGN §1.1 "The global is exact").

Wrong variants tried: ``ClientCore.state_dict`` without ``upload_residuals``
(the 0.1 behaviour) fails the first test; ``keep_residuals`` keeping nothing
fails the second.
"""

from __future__ import annotations

import io

import torch

from pl_parablock.core.client import ClientCore
from pl_parablock.core.codecs import Compression, decode_block, make_codec
from pl_parablock.core.plan import make_plan


def block(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 300, generator=g), "b": torch.randn(300, generator=g)}


def hand_off(core: ClientCore, live: dict[str, torch.Tensor], step: int):
    core.begin()
    with torch.no_grad():
        for n, p in live.items():
            p.add_(0.01 * block(100 + step)[n])
    up = core.end(samples=1, tokens=1, shard=1, weighting="samples")
    up.encode()
    return up


def test_upload_residuals_survive_the_checkpoint_and_enter_the_next_update():
    """``D = Q(Δ + r)`` after a restart uses the ``r`` saved before it, bitwise as if no restart happened."""
    c = Compression(make_codec("int8"), make_codec("none"))
    plan = make_plan("sync", num_blocks=1, rounds=3, clients=1)
    live = {n: t.clone() for n, t in block(0).items()}
    start = {n: t.clone() for n, t in live.items()}
    core = ClientCore(plan, 0, [live], compression=c)
    hand_off(core, live, 0)
    assert core.uplink is not None and core.uplink.residuals[0]["w"].abs().sum() > 0, "int8 dropped something"
    delta = {n: live[n] - start[n] for n in live}

    buf = io.BytesIO()
    torch.save(core.state_dict(), buf)  # as Lightning saves a callback's state
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    restarted = ClientCore(plan, 0, [{n: t.clone() for n, t in live.items()}], compression=c)
    restarted.load_state_dict(saved)
    assert restarted.uplink is not None
    assert all(torch.equal(restarted.uplink.residuals[0][n], core.uplink.residuals[0][n]) for n in live)

    # and that r is what int8 dropped of round 0's Δ, stated independently: r = Δ − decode(Q(Δ))
    r = {n: delta[n] - decode_block(c.upload, *_q(c, delta))[n] for n in live}
    assert all(torch.equal(restarted.uplink.residuals[0][n], r[n]) for n in live)

    # the next update of the block is the same on both: Q(Δ + r) with the restored r
    core.apply(0, 0, {n: t.clone() for n, t in live.items()})  # the aggregate of one client's update: its own block
    a, b = hand_off(core, live, 1), hand_off(restarted, restarted.blocks[0], 1)
    assert a.tensors is not None and b.tensors is not None
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def _q(c: Compression, x: dict[str, torch.Tensor]):
    from pl_parablock.core.codecs import encode_block

    return encode_block(c.upload, x), {n: tuple(t.shape) for n, t in x.items()}


def test_a_rejoin_keeps_the_residuals_of_the_core_it_replaces():
    c = Compression(make_codec("int8"), make_codec("none"))
    plan = make_plan("sync", num_blocks=1, rounds=3, clients=1)
    live = {n: t.clone() for n, t in block(0).items()}
    core = ClientCore(plan, 0, [live], compression=c)
    hand_off(core, live, 0)
    fresh = ClientCore(plan, 0, [live], compression=c)
    fresh.keep_residuals(core)
    assert fresh.uplink is not None and core.uplink is not None
    assert fresh.uplink.residuals == core.uplink.residuals and fresh.uplink.residuals
