"""Codecs and error feedback (DESIGN §1.1 "The global is exact"), on tensors and the algorithm core alone.

Wrong variants tried on the product (each made a test here fail, then was restored):

* the residual not kept (``r ← x − D`` dropped, in :class:`ErrorFeedback`, both sides):
  ``test_error_feedback_sends_the_whole_sum_in_the_end`` and ``test_the_server_keeps_its_broadcast_error``;
* the server's global set to the exact aggregate instead of ``g + D``:
  ``test_every_reader_forms_the_servers_global_from_the_broadcast``;
* a client forming ``g + D`` from its live (training) block instead of its
  copy of the global: ``test_a_client_training_the_block_forms_g_plus_d_from_its_copy_of_the_global``;
* topk's decoder without the index bounds check: ``test_forged_parts_are_refused``.
"""

from __future__ import annotations

import math

import pytest
import torch

from pl_parablock.core.client import ClientCore
from pl_parablock.core.codecs import (
    CODECS,
    CodecError,
    Compression,
    ErrorFeedback,
    advance,
    block_problem,
    decode_block,
    encode_block,
    make_codec,
)
from pl_parablock.core.plan import make_plan
from pl_parablock.core.server import GlobalState

TOLERANCE = {"none": 0.0, "bf16": 4e-3, "fp16": 1e-3, "int8": 1e-2, "fp8": 7e-2, "int4": 0.15}
BYTES = {"none": 1.0, "bf16": 0.5, "fp16": 0.5, "int8": 0.26, "fp8": 0.26, "int4": 0.14, "topk": 0.03}


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 33, generator=g), "b": torch.randn(7, generator=g)}


def shapes(ts):
    return {n: tuple(t.shape) for n, t in ts.items()}


@pytest.mark.parametrize("name", list(CODECS))
def test_each_codec_round_trips_within_its_precision_and_its_bytes(name):
    codec = make_codec(name, **({"fraction": 0.01} if name == "topk" else {}))
    x = tensors()
    parts = encode_block(codec, x)
    assert not block_problem(codec, [(n, t.dtype, tuple(t.shape)) for n, t in parts.items()], shapes(x))
    y = decode_block(codec, parts, shapes(x))
    assert all(y[n].dtype == torch.float32 and y[n].shape == x[n].shape for n in x)
    nbytes = sum(t.numel() * t.element_size() for t in parts.values())
    assert nbytes <= BYTES[name] * sum(t.numel() * 4 for t in x.values()) + 64
    if name == "topk":  # the largest magnitudes are kept (within int8's step), the rest are zero
        flat, got = x["w"].reshape(-1), y["w"].reshape(-1)
        kept = got != 0
        assert int(kept.sum()) == math.ceil(0.01 * flat.numel())
        assert flat.abs()[kept].min() >= flat.abs()[~kept].max()
        assert torch.allclose(got[kept], flat[kept], atol=float(flat.abs().max()) / 127)
    else:
        for n in x:
            assert float((y[n] - x[n]).abs().max()) <= TOLERANCE[name] * float(x[n].abs().max())
    again = decode_block(codec, parts, shapes(x))  # deterministic: every holder decodes the same bits
    assert all(torch.equal(again[n], y[n]) for n in x)


def test_bad_codec_settings_are_refused_with_the_setting_named():
    with pytest.raises(CodecError, match="unknown codec 'zstd'"):
        make_codec("zstd")
    for fraction in (0, 1.5, -0.1):
        with pytest.raises(CodecError, match=r"fraction must be in \(0, 1\]"):
            make_codec("topk", fraction=fraction)
    with pytest.raises(CodecError, match="group must be a positive integer"):
        make_codec("int8", group=0)


def test_forged_parts_are_refused():
    x = tensors()
    for name, part, forge in [
        ("int8", "w::q", lambda t: t.fill_(-128)),
        ("int8", "w::scale", lambda t: t.fill_(float("nan"))),
        ("int4", "w::q", lambda t: t.fill_(0)),
        ("fp8", "w::q", lambda t: t.fill_(0x7F)),
        ("topk", "w::gaps", lambda t: t.fill_(0)),  # repeated index
        ("topk", "w::gaps", lambda t: t.fill_(100)),  # past the tensor's end
    ]:
        codec = make_codec(name, **({"fraction": 0.05} if name == "topk" else {}))
        parts = encode_block(codec, x)
        forge(parts[part])
        with pytest.raises(CodecError):
            decode_block(codec, parts, shapes(x))
    codec = make_codec("int8")
    parts = encode_block(codec, x)
    del parts["b::scale"]
    with pytest.raises(CodecError, match="missing"):
        decode_block(codec, parts, shapes(x))
    parts = encode_block(codec, x)
    parts["w::q"] = parts["w::q"][:-1]
    with pytest.raises(CodecError, match="values"):
        decode_block(codec, parts, shapes(x))


@pytest.mark.parametrize("name", ["int4", "topk"])
def test_error_feedback_sends_the_whole_sum_in_the_end(name):
    """With error feedback, what was sent plus the residual is what was meant; without, the error piles up."""
    codec = make_codec(name, **({"fraction": 0.05} if name == "topk" else {}))
    sums = {}
    for enabled in (True, False):
        ef = ErrorFeedback(codec, enabled)
        meant = torch.zeros(64, 33)
        sent = torch.zeros(64, 33)
        for step in range(40):
            x = tensors(step)["w"] * 0.01
            meant += x
            sent += ef.compress(0, {"w": x})[1]["w"]
        residual = ef.residuals[0]["w"] if enabled else torch.zeros(64, 33)
        sums[enabled] = float((sent - meant).abs().max())
        if enabled:
            assert torch.allclose(sent + residual, meant, atol=1e-5)
    assert sums[True] * 3 < sums[False]


def test_every_reader_forms_the_servers_global_from_the_broadcast():
    """``g ← g + D``: a reader holding version ``v`` applies the kept ``D`` and holds the server's new version bitwise."""
    c = Compression(make_codec("int8"), make_codec("int8"))
    g0 = tensors(0)
    state = GlobalState([dict(g0)], compression=c)
    held = dict(g0)
    for t in range(4):
        exact = {n: v + 0.01 * tensors(t + 1)[n] for n, v in state.values[0].items()}
        assert state.install(t, 0, exact, readers=[0]) == ""
        base, parts = state.broadcast_at(0, t)
        assert base == t - 1
        d = decode_block(c.download, parts, shapes(g0))
        held = {n: advance(held[n], d[n]) for n in held}
        assert all(torch.equal(held[n], state.values[0][n]) for n in held)
        assert any(not torch.equal(exact[n], state.values[0][n]) for n in held)  # lossy: the global is g + D, not the aggregate


def test_the_server_keeps_its_broadcast_error():
    """``r_b ← Δ_agg + r_b − D``: the global plus the residual is the exact aggregate chain (within float32 rounding)."""
    c = Compression(make_codec("int4"), make_codec("int4"))
    g0 = tensors(0)
    state = GlobalState([dict(g0)], compression=c)
    exact_chain = {n: v.clone() for n, v in g0.items()}
    for t in range(6):
        step = {n: 0.01 * tensors(t + 1)[n] for n in g0}
        exact_chain = {n: exact_chain[n] + step[n] for n in g0}
        state.install(t, 0, {n: state.values[0][n] + step[n] for n in g0})
        assert state.downlink is not None
        r = state.downlink.residuals[0]
        for n in g0:
            assert torch.allclose(state.values[0][n] + r[n], exact_chain[n], atol=1e-5)


def test_a_non_finite_aggregate_keeps_the_value_and_sends_no_broadcast():
    c = Compression(make_codec("int8"), make_codec("int8"))
    g0 = tensors(0)
    state = GlobalState([dict(g0)], compression=c)
    bad = {n: torch.full_like(v, float("nan")) for n, v in g0.items()}
    assert "not finite" in state.install(0, 0, bad)
    assert state.broadcast_at(0, 0) is None  # the reader gets the (unchanged) value
    assert all(torch.equal(state.values[0][n], g0[n]) for n in g0)


def test_a_client_training_the_block_forms_g_plus_d_from_its_copy_of_the_global():
    """One block, parablock: the block trains again before its aggregate arrives, so ``g`` must come from the client's copy."""
    c = Compression(make_codec("int8"), make_codec("int8"))
    plan = make_plan("parablock", num_blocks=1, rounds=5, clients=1)
    live = {n: t.clone() for n, t in tensors(0).items()}
    core = ClientCore(plan, 0, [live], compression=c)
    state = GlobalState([{n: t.clone() for n, t in live.items()}], compression=c)
    shp = shapes(live)
    for t in range(plan.rounds):
        for r in core.awaiting():
            base, parts = state.broadcast_at(0, r)
            g = core.compressed_aggregate(r, decode_block(c.download, parts, shp), {0: base})
            version_r = state.value_at(0, r, reader=0)
            assert all(torch.equal(g[n], version_r[n]) for n in g)
            core.apply(r, r, g)
        core.begin()
        with torch.no_grad():
            for n, p in live.items():
                p.add_(0.05 * tensors(t + 7)[n])  # local training
        up = core.end(samples=1, tokens=1, shard=1, weighting="samples")
        assert up.kind == "delta" and up.codec == "int8"
        up.encode()
        from pl_parablock.core.codecs import decode_update
        from pl_parablock.core.server import RoundStep

        step = RoundStep(t, 0)
        step.add(decode_update(c, up.codec, up.tensors, state.values[0]), up.weight, "delta")
        state.install(t, 0, step.close(state.values[0]), readers=[0])
    for r in core.awaiting():
        base, parts = state.broadcast_at(0, r)
        core.apply(r, r, core.compressed_aggregate(r, decode_block(c.download, parts, shp), {0: base}))
    assert core.finished
    assert all(torch.equal(live[n], state.values[0][n]) for n in live)


def test_a_broadcast_for_a_version_the_client_does_not_hold_asks_for_a_resync():
    from pl_parablock.errors import ResyncNeeded

    c = Compression(make_codec("int8"), make_codec("int8"))
    plan = make_plan("sync", num_blocks=1, rounds=2, clients=1)
    live = {n: t.clone() for n, t in tensors(0).items()}
    core = ClientCore(plan, 0, [live], compression=c)
    core.begin()
    core.end(samples=1, tokens=1, shard=1, weighting="samples")
    with pytest.raises(ResyncNeeded, match="applies to version 3"):
        core.compressed_aggregate(0, {n: torch.zeros_like(t) for n, t in live.items()}, {0: 3})
